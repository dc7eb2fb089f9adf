// The playground: a chat (or completion) box that streams the reply from the server's OpenAI API over
// server-sent events and colours each token by the iterations of the core block it used.  Plain JavaScript, no
// build step.
"use strict";

// The colour scale from 1 iteration to the server's --max_steps: viridis, linear between these five stops
// (tests/serving/test_playground.py computes the same colours).
const STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

const $ = (id) => document.getElementById(id);
const state = { card: null, maxSteps: 32, history: [], controller: null };

function iterationColour(iterations, maxSteps) {
  const t = maxSteps > 1 ? Math.min(Math.max((iterations - 1) / (maxSteps - 1), 0), 1) : 1;
  const x = t * (STOPS.length - 1);
  const i = Math.min(Math.floor(x), STOPS.length - 2);
  const f = x - i;
  return STOPS[i].map((c, k) => Math.round(c + (STOPS[i + 1][k] - c) * f));
}

function paint(span, iterations) {
  const mean = iterations.reduce((a, b) => a + b, 0) / iterations.length;
  const [r, g, b] = iterationColour(mean, state.maxSteps);
  span.style.backgroundColor = `rgb(${r}, ${g}, ${b})`;
  span.style.color = 0.299 * r + 0.587 * g + 0.114 * b > 150 ? "#1d2330" : "#ffffff";
  span.dataset.iterations = iterations.join(",");
  span.title = iterations.length === 1 ? `${iterations[0]} iterations`
    : `${iterations.length} tokens: ${iterations.join(", ")} iterations`;
}

function drawLegend() {
  const n = state.maxSteps;
  const stops = [];
  for (let k = 0; k <= 10; k++) {
    const [r, g, b] = iterationColour(1 + (n - 1) * k / 10, n);
    stops.push(`rgb(${r}, ${g}, ${b}) ${k * 10}%`);
  }
  $("legend-bar").style.background = `linear-gradient(to right, ${stops.join(", ")})`;
  $("legend-min").textContent = "1";
  $("legend-mid").textContent = n > 2 ? String(Math.round((1 + n) / 2)) : "";
  $("legend-max").textContent = String(n);
}

function setStatus(kind, text) {
  $("status").dataset.state = kind;
  $("status").textContent = text;
}

async function pollHealth() {
  try {
    const res = await fetch("/health");
    const body = await res.json();
    if (res.ok) { setStatus("ok", "ready"); return; }
    if (body.status === "error") { setStatus("error", `engine stopped: ${body.error}`); return; }
    setStatus("warming", "warming up…");
  } catch (err) {
    setStatus("error", "server unreachable");
  }
  setTimeout(pollHealth, 2000);
}

async function loadModel() {
  const res = await fetch("/v1/models");
  const card = (await res.json()).data[0];
  const info = card.recurrent_depth;
  state.card = card;
  state.maxSteps = info.max_steps;
  $("model-name").textContent = card.id;
  const steps = $("num-steps");
  steps.max = String(info.max_steps);
  steps.value = String(info.default_num_steps);
  $("num-steps-value").textContent = steps.value;
  $("max-tokens").value = String(Math.max(1, Math.min(256, Math.floor(info.max_len / 2))));
  const select = $("exit-criterion");
  for (const [name, threshold] of Object.entries(info.exit_criteria)) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    option.dataset.threshold = String(threshold);
    select.appendChild(option);
  }
  if (!info.chat) {
    $("mode").value = "completion";
    $("mode").querySelector('option[value="chat"]').disabled = true;
  }
  if (!info.text) {
    $("send").disabled = true;
    addError("This model has no tokenizer: it serves token-id prompts through the API only.");
  }
  drawLegend();
  document.body.dataset.ready = "true";
}

function addMessage(role, text) {
  $("empty")?.remove();
  const div = document.createElement("div");
  div.className = `message ${role}`;
  if (text !== undefined) div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function addError(text) {
  addMessage("error", text).dataset.state = "error";
}

function settings() {
  const body = {
    max_tokens: parseInt($("max-tokens").value, 10) || 64,
    temperature: parseFloat($("temperature").value) || 0,
    seed: parseInt($("seed").value, 10) || 0,
    num_steps: parseInt($("num-steps").value, 10),
    return_iterations: true,
    stream: true,
    stream_options: { include_usage: true },
  };
  const criterion = $("exit-criterion").value;
  if (criterion !== "none") {
    body.exit_criterion = criterion;
    const threshold = $("exit-threshold").value.trim();
    if (threshold !== "") body.exit_threshold = parseFloat(threshold);
  }
  if (state.card) body.model = state.card.id;
  return body;
}

// One assistant reply: spans of text coloured by their tokens' iterations.  A chunk whose token adds no text yet
// (half a character, or the end-of-turn token) passes its iterations on to the next span; what is left at the end
// becomes an end marker.
class Reply {
  constructor(element) {
    this.element = element;
    this.text = "";
    this.pending = [];
    this.iterations = [];
  }

  add(text, iterations) {
    this.iterations.push(...iterations);
    const all = this.pending.concat(iterations);
    if (!text) { this.pending = all; return; }
    const span = document.createElement("span");
    span.className = "tok";
    span.textContent = text;
    if (all.length) paint(span, all); else span.dataset.iterations = "";
    this.pending = [];
    this.element.appendChild(span);
    this.text += text;
  }

  end(usage, seconds) {
    if (this.pending.length) {
      const marker = document.createElement("span");
      marker.className = "tok marker";
      paint(marker, this.pending);
      this.element.appendChild(marker);
      this.pending = [];
    }
    const stats = document.createElement("span");
    stats.className = "stats";
    const parts = [];
    if (usage) {
      parts.push(`${usage.completion_tokens} tokens`, `${usage.mean_iterations.toFixed(2)} iterations per token`,
        `prefill ${usage.prompt_iterations} iterations`);
    }
    parts.push(`${seconds.toFixed(2)} s`);
    const dropped = Number(this.element.dataset.dropped || 0);
    if (dropped) parts.push(`the context was full: the ${dropped} oldest exchange(s) left out`);
    stats.textContent = parts.join(" · ");
    this.element.appendChild(stats);
  }
}

async function streamReply(url, body, reply) {
  state.controller = new AbortController();
  const started = performance.now();
  const res = await fetch(url, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    signal: state.controller.signal,
  });
  if (!res.ok) {
    const error = new Error(`HTTP ${res.status}`);
    error.status = res.status;
    try {
      const body = (await res.json()).error;
      error.message = body.message;
      error.param = body.param;
    } catch (err) { /* not JSON */ }
    throw error;
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const text = choice.delta ? (choice.delta.content || "") : (choice.text || "");
          reply.add(text, choice.iterations || []);
          if (choice.finish_reason) reply.element.dataset.finishReason = choice.finish_reason;
        }
      }
    }
  }
  reply.end(usage, (performance.now() - started) / 1000);
}

// Whether a chat request failed only because the conversation outgrew the context (then the oldest turn goes).
function outgrewContext(err) {
  return err.status === 400 && (err.param === "max_tokens" || err.param === "messages") &&
    /context/.test(err.message) && state.history.length > 1;
}

async function send(event) {
  event?.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || state.controller) return;
  $("prompt").value = "";
  $("send").disabled = true;
  $("stop").disabled = false;
  const chat = $("mode").value === "chat";
  const body = settings();
  let element;
  if (chat) {
    state.history.push({ role: "user", content: text });
    addMessage("user", text);
    element = addMessage("assistant");
  } else {
    body.prompt = text;
    element = addMessage("assistant");
    const prompt = document.createElement("span");
    prompt.className = "prompt-text";
    prompt.textContent = text;
    element.appendChild(prompt);
  }
  element.dataset.state = "streaming";
  const reply = new Reply(element);
  try {
    for (;;) {
      try {
        if (chat) {
          const system = $("system").value.trim();
          body.messages = (system ? [{ role: "system", content: system }] : []).concat(state.history);
        }
        await streamReply(chat ? "/v1/chat/completions" : "/v1/completions", body, reply);
        break;
      } catch (err) {
        if (!chat || !outgrewContext(err)) throw err;
        state.history.splice(0, 2);  // the oldest exchange; the system prompt stays
        element.dataset.dropped = String(Number(element.dataset.dropped || 0) + 1);
      }
    }
    element.dataset.state = "done";
    if (chat) state.history.push({ role: "assistant", content: reply.text });
  } catch (err) {
    const stopped = err.name === "AbortError";
    element.dataset.state = stopped ? "stopped" : "error";
    if (stopped) reply.end(null, 0);
    else {
      if (!element.querySelector(".tok")) element.remove();
      addError(err.message);
      if (chat) state.history.pop();
    }
  } finally {
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    $("messages").lastElementChild?.scrollIntoView({ block: "end" });
  }
}

function init() {
  $("num-steps").addEventListener("input", () => { $("num-steps-value").textContent = $("num-steps").value; });
  $("exit-criterion").addEventListener("change", () => {
    const option = $("exit-criterion").selectedOptions[0];
    const fixed = option.value === "none";
    $("exit-threshold").disabled = fixed;
    $("exit-threshold").placeholder = fixed ? "default" : `default ${option.dataset.threshold}`;
    if (fixed) $("exit-threshold").value = "";
  });
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("reset").addEventListener("click", () => {
    state.history = [];
    $("messages").replaceChildren();
  });
  $("mode").addEventListener("change", () => { $("system").disabled = $("mode").value !== "chat"; });
  loadModel().catch((err) => addError(`cannot read /v1/models: ${err.message}`));
  pollHealth();
}

init();
