"""The OpenAI-compatible server (recurrent_depth.serving.app) on 127.0.0.1, driven by the real `openai` client: one
server of the tiny Huginn fixture with a word-level tokenizer and a real engine (4 slots) for the module.  Output
equals `generate`'s, streamed equals non-streamed, concurrent equals alone; disconnects free slots, bad requests get
OpenAI's error body naming the parameter while the server keeps serving; /health, /metrics, /v1/models; the CLI."""

import concurrent.futures
import http.client
import json
import math
import socket
import threading
import time

import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from recurrent_depth.cli import serve as serve_cli
from recurrent_depth.cli.app import run as run_cli
from recurrent_depth.data.chat_template import chat_stop_ids, render_chat
from recurrent_depth.decoding.generate import generate
from recurrent_depth.serving.app import BackgroundServer, create_app, listen

from serving_helpers import ENGINE, WORDS, Served, get, post

PROMPT = "kan lor mis nut pes"
ABORTED = "recurrent_depth_requests_total{endpoint=completions,finish_reason=abort}"
DEPTH = {"num_steps": 6, "init_scale": 0.0}  # a deterministic initial state, as generate's init_scale=0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The live server; the engine's warm-up is held until /health has answered 503."""
    gate = threading.Event()
    served = Served(tmp_path_factory.mktemp("serve") / "tiny-words", gate=gate)
    try:
        served.before = {"health": get(served.url + "/health"),
                         "completion": post(served.url + "/v1/completions", {"prompt": PROMPT})}
        gate.set()
        served.wait_ready()
        served.compiles = served.engine.stats().compiles
        served.client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield served
    finally:
        gate.set()
        served.close()


def _ids(served, text):
    return served.tokenizer.encode(text)


def _text(served, tokens, stops):
    return served.tokenizer.decode([t for t in tokens if t not in stops])


def test_health_is_503_until_the_engine_is_warm(served):
    status, body = served.before["health"]
    assert status == 503 and json.loads(body) == {"status": "warming up"}
    status, body = served.before["completion"]
    assert status == 503 and body["error"]["code"] == "engine_not_ready"
    assert get(served.url + "/health") == (200, b'{"status":"ok"}')


def test_models(served):
    models = served.client.models.list().data
    assert [m.id for m in models] == ["tiny-words"]
    card = json.loads(get(served.url + "/v1/models/tiny-words")[1])
    assert card["max_model_len"] == ENGINE["max_len"] and card["recurrent_depth"]["max_steps"] == ENGINE["max_steps"]
    assert card["recurrent_depth"]["chat"] and card["recurrent_depth"]["reasoning_effort"] == {
        "low": 2, "medium": 4, "high": 8}
    with pytest.raises(openai.NotFoundError):
        served.client.models.retrieve("gpt-4")


def test_greedy_output_and_iterations_equal_generate(served):
    """A completion and a chat under adaptive exit, token for token and iteration for iteration against one
    `generate` call on both prompts (the chat's in the tokenizer's template, ending at its stop ids); usage
    counts them."""
    tok = served.tokenizer
    stops = chat_stop_ids(tok)  # the chat's stops; the completion asks for the same ones
    depth = {**DEPTH, "num_steps": 8, "exit_criterion": "kl", "exit_threshold": 0.05}
    messages = [{"role": "system", "content": "lor"}, {"role": "user", "content": "pes ras sit"}]
    prompts = [_ids(served, PROMPT), render_chat(tok, messages, add_generation_prompt=True)[0]]
    ref = generate(served.model, served.params, prompts, max_new_tokens=10, stop_tokens=stops,
                   max_steps=ENGINE["max_steps"], cache_strategy=served.engine.cache_strategy, **depth)
    extra = {**depth, "return_iterations": True, "return_token_ids": True}
    completion = served.client.completions.create(
        model="tiny-words", prompt=PROMPT, max_tokens=10, temperature=0,
        extra_body={**extra, "stop_token_ids": [t for t in stops if t != tok.eos_id]})
    chat = served.client.chat.completions.create(model="tiny-words", messages=messages, max_completion_tokens=10,
                                                 temperature=0, extra_body=extra)
    for row, (out, text) in enumerate([(completion, completion.choices[0].text),
                                       (chat, chat.choices[0].message.content)]):
        count = int(ref.num_tokens[row])
        tokens, steps = np.asarray(ref.tokens[row, :count]).tolist(), np.asarray(ref.steps[row, :count]).tolist()
        choice = out.choices[0]
        assert choice.token_ids == tokens and choice.iterations == steps, row
        assert len(set(steps)) > 1, steps  # the exit criterion made the depth vary
        assert text == _text(served, tokens, stops)
        assert choice.finish_reason == ("stop" if tokens[-1] in stops else "length")
        usage = out.usage
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
            len(prompts[row]), count, len(prompts[row]) + count)
        assert usage.total_iterations == sum(steps)
        assert math.isclose(usage.mean_iterations, sum(steps) / count, rel_tol=1e-3)
        assert 1 <= usage.prompt_iterations <= depth["num_steps"]  # where exit stopped the prompt's last position
    assert chat.choices[0].message.role == "assistant"
    fixed = served.client.completions.create(model="tiny-words", prompt=PROMPT, max_tokens=3,
                                             extra_body={**DEPTH, "return_iterations": True})
    assert fixed.choices[0].iterations == [DEPTH["num_steps"]] * 3
    assert fixed.usage.prompt_iterations == DEPTH["num_steps"]


def _stream_text(chunks, chat):
    text, iterations, finish, usage = "", [], None, None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += (choice.delta.content or "") if chat else choice.text
            iterations += getattr(choice, "iterations", None) or []
            finish = choice.finish_reason or finish
    return text, iterations, finish, usage


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_streamed_equals_non_streamed(served, chat):
    if chat:
        create = served.client.chat.completions.create
        kw = {"messages": [{"role": "system", "content": "kan lor"}, {"role": "user", "content": PROMPT}]}
    else:
        create, kw = served.client.completions.create, {"prompt": PROMPT}
    kw.update(model="tiny-words", max_tokens=12, temperature=0.8, seed=3,
              extra_body={**DEPTH, "exit_criterion": "entropy-diff", "return_iterations": True})
    whole = create(**kw)
    choice = whole.choices[0]
    text, iterations, finish, usage = _stream_text(create(stream=True, stream_options={"include_usage": True},
                                                          **kw), chat)
    assert text == (choice.message.content if chat else choice.text) and text
    assert iterations == choice.iterations and finish == choice.finish_reason
    assert usage.model_dump() == whole.usage.model_dump()


def test_stop_strings_cut_the_text(served):
    kw = dict(model="tiny-words", prompt=PROMPT, max_tokens=12, temperature=0, seed=0, extra_body=dict(DEPTH))
    full = served.client.completions.create(**kw).choices[0].text
    words = full.split()
    assert len(words) >= 4, full
    stop = f" {words[2]}"
    cut = full[:full.index(stop)]
    out = served.client.completions.create(stop=[stop, "never"], **kw)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (cut, "stop")
    text, _, finish, _ = _stream_text(served.client.completions.create(stop=stop, stream=True, **kw), chat=False)
    assert (text, finish) == (cut, "stop")


def test_n_choices_sample_from_consecutive_seeds(served):
    kw = dict(model="tiny-words", prompt=PROMPT, max_tokens=6, temperature=1.0, extra_body=dict(DEPTH))
    many = served.client.completions.create(n=3, seed=11, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    alone = [served.client.completions.create(seed=11 + i, **kw).choices[0].text for i in range(3)]
    assert [c.text for c in many.choices] == alone
    assert many.usage.prompt_tokens == len(_ids(served, PROMPT))
    assert many.usage.completion_tokens == sum(
        served.client.completions.create(seed=11 + i, **kw).usage.completion_tokens for i in range(3))


def test_concurrent_mixed_requests_equal_their_own_output(served):
    """A dozen requests of mixed lengths, depths, exit criteria and sampling through 4 slots: each equals its
    output alone, tokens and iterations."""
    rng = np.random.default_rng(0)
    criteria = [None, "kl", "entropy-diff", "latent-diff"]
    requests = [dict(prompt=" ".join(rng.choice(WORDS, 2 + 3 * i)), max_tokens=4 + i % 5,
                     temperature=0.0 if i % 2 else 0.9, seed=i,
                     extra_body={"num_steps": 2 + i % 7, "exit_criterion": criteria[i % 4], "init_scale": 0.0,
                                 "return_iterations": True, "return_token_ids": True})
                for i in range(12)]

    def run(kw):
        choice = served.client.completions.create(model="tiny-words", **kw).choices[0]
        return choice.token_ids, choice.iterations, choice.text

    alone = [run(kw) for kw in requests]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        together = list(pool.map(run, requests))
    assert together == alone


def _send(served, body, stream):
    """A request on a raw connection; for a stream, (connection) after its first chunk."""
    connection = http.client.HTTPConnection("127.0.0.1", served.server.port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps({"stream": stream, **body}),
                       {"Content-Type": "application/json"})
    if stream:
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: {")
    return connection


def test_a_client_that_disconnects_frees_its_slot(served):
    """Long requests fill the slots (three streams and one answered whole); their clients go away: the slots free
    at once, far before the requests would have ended, and the next request completes."""
    long = {"prompt": "kan", "max_tokens": ENGINE["max_len"] - 2, "ignore_eos": True, "num_steps": 8}
    before, aborted = served.engine.stats(), _metrics(served).get(ABORTED, 0)
    connections = [_send(served, long, stream=True) for _ in range(ENGINE["slots"] - 1)]
    connections.append(_send(served, long, stream=False))
    deadline = time.monotonic() + 10
    while served.engine.stats().running < ENGINE["slots"]:
        assert time.monotonic() < deadline, served.engine.stats()
        time.sleep(0.005)
    for connection in connections:
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
    deadline = time.monotonic() + 10
    while served.engine.stats().running or served.engine.stats().waiting:
        assert time.monotonic() < deadline, served.engine.stats()
        time.sleep(0.01)
    generated = served.engine.stats().tokens - before.tokens
    assert generated < ENGINE["slots"] * long["max_tokens"] // 2
    assert _metrics(served)[ABORTED] == aborted + ENGINE["slots"]  # each one cancelled, not finished
    out = served.client.completions.create(model="tiny-words", prompt=PROMPT, max_tokens=3, timeout=30)
    assert out.usage.completion_tokens >= 1


def test_a_full_queue_answers_429(served):
    """More choices than slots and queue hold: 429 with OpenAI's body, nothing left behind."""
    n = ENGINE["slots"] + ENGINE["max_queue"] + 1
    with pytest.raises(openai.RateLimitError) as err:
        served.client.completions.create(model="tiny-words", prompt=PROMPT, max_tokens=30, n=n,
                                         extra_body={"ignore_eos": True})
    assert err.value.body["code"] == "queue_full"
    deadline = time.monotonic() + 10
    while served.engine.stats().running or served.engine.stats().waiting:
        assert time.monotonic() < deadline, served.engine.stats()
        time.sleep(0.01)
    assert served.client.completions.create(model="tiny-words", prompt=PROMPT, max_tokens=2).choices[0].text


COMPLETION = {"model": "tiny-words", "prompt": PROMPT, "max_tokens": 4}
CHAT = {"model": "tiny-words", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
BAD = [  # (endpoint, body, status, param)
    ("completions", b'{"prompt": "kan", "max_tokens": 4', 400, None),  # malformed JSON
    ("completions", b"[1, 2]", 400, None),
    ("completions", {**COMPLETION, "max_tokens": "4"}, 400, "max_tokens"),
    ("completions", {**COMPLETION, "temperature": "hot"}, 400, "temperature"),
    ("completions", {**COMPLETION, "stream": "yes"}, 400, "stream"),
    ("completions", {**COMPLETION, "prompt": 3.5}, 400, "prompt"),
    ("completions", {**COMPLETION, "prompt": [1, 600]}, 400, "prompt"),
    ("completions", {**COMPLETION, "prompt": ""}, 400, "prompt"),
    ("completions", {**COMPLETION, "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {**COMPLETION, "max_tokens": -3}, 400, "max_tokens"),
    ("completions", {**COMPLETION, "max_tokens": ENGINE["max_len"]}, 400, "max_tokens"),
    ("completions", {**COMPLETION, "prompt": " ".join(["kan"] * ENGINE["max_len"])}, 400, "prompt"),
    ("completions", {**COMPLETION, "num_steps": ENGINE["max_steps"] + 1}, 400, "num_steps"),
    ("completions", {**COMPLETION, "num_steps": 0}, 400, "num_steps"),
    ("completions", {**COMPLETION, "exit_criterion": "patience"}, 400, "exit_criterion"),
    ("completions", b'{"prompt": "kan", "exit_criterion": "kl", "exit_threshold": NaN}', 400, "exit_threshold"),
    ("completions", b'{"prompt": "kan", "temperature": Infinity}', 400, "temperature"),
    ("completions", {**COMPLETION, "exit_threshold": 0.1}, 400, "exit_threshold"),
    ("completions", {**COMPLETION, "min_steps": -1}, 400, "min_steps"),
    ("completions", {**COMPLETION, "check_every": 0}, 400, "check_every"),
    ("completions", {**COMPLETION, "reasoning_effort": "extreme"}, 400, "reasoning_effort"),
    ("completions", {**COMPLETION, "n": 0}, 400, "n"),
    ("completions", {**COMPLETION, "top_p": 0}, 400, "top_p"),
    ("completions", {**COMPLETION, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("completions", {**COMPLETION, "stop_token_ids": [9999]}, 400, "stop_token_ids"),
    ("completions", {**COMPLETION, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("completions", {**COMPLETION, "echo": True}, 400, "echo"),
    ("completions", {**COMPLETION, "logprobs": 2}, 400, "logprobs"),
    ("completions", {**COMPLETION, "best_of": 3}, 400, "best_of"),
    ("completions", {**COMPLETION, "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("completions", {**COMPLETION, "suffix": "kan"}, 400, "suffix"),
    ("completions", {**COMPLETION, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("completions", {**COMPLETION, "no_such_field": 1}, 400, "no_such_field"),
    ("completions", {**COMPLETION, "model": "gpt-4"}, 404, "model"),
    ("chat", {**CHAT, "messages": "hi"}, 400, "messages"),
    ("chat", {**CHAT, "messages": []}, 400, "messages"),
    ("chat", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content"),
    ("chat", {**CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("chat", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("chat", {**CHAT, "functions": [{"name": "f"}]}, 400, "functions"),
    ("chat", {**CHAT, "logprobs": True}, 400, "logprobs"),
    ("chat", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat", {**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("chat", {**CHAT, "prompt": "kan"}, 400, "prompt"),
    ("chat", {**CHAT, "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize("endpoint, body, status, param", BAD, ids=[f"{e}-{p}-{i}" for i, (e, _, _, p) in
                                                                      enumerate(BAD)])
def test_bad_requests_get_openai_errors_naming_the_parameter(served, endpoint, body, status, param):
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    got, answer = post(served.url + path, body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


def test_the_openai_client_raises_on_bad_requests_and_the_server_keeps_serving(served):
    client = served.client
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-model", prompt=PROMPT)
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"
    for kw, param in [({"max_tokens": 0}, "max_tokens"), ({"extra_body": {"num_steps": 99}}, "num_steps"),
                      ({"extra_body": {"exit_criterion": "soon"}}, "exit_criterion"), ({"echo": True}, "echo"),
                      ({"logprobs": 1}, "logprobs")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny-words", prompt=PROMPT, **kw)
        assert err.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-words", messages=CHAT["messages"], tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert err.value.body["param"] == "tools"
    out = client.chat.completions.create(model="tiny-words", messages=CHAT["messages"], max_tokens=3,
                                         reasoning_effort="low", extra_body={"return_iterations": True})
    assert out.usage.prompt_iterations == 2 and max(out.choices[0].iterations) <= 2


def test_a_model_without_a_tokenizer_serves_token_ids(served):
    """The same engine behind an app without a tokenizer: token-id prompts, token ids out; text is refused."""
    app = create_app(served.engine, tokenizer=None, model_name="ids-only")
    ids = _ids(served, PROMPT)
    with BackgroundServer(app) as server:
        status, out = post(server.url + "/v1/completions", {"prompt": ids, "max_tokens": 5, "temperature": 0,
                                                            **DEPTH})
        assert status == 200 and len(out["choices"][0]["token_ids"]) == out["usage"]["completion_tokens"] > 0
        assert out["choices"][0]["text"] == ""
        many = post(server.url + "/v1/completions", {"prompt": [ids, ids[:2]], "max_tokens": 2, "n": 2,
                                                     "temperature": 0})[1]
        assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
        assert many["usage"]["prompt_tokens"] == len(ids) + 2
        for body, param in [({"prompt": PROMPT}, "prompt"), ({"prompt": ids, "stop": "x"}, "stop")]:
            status, err = post(server.url + "/v1/completions", body)
            assert (status, err["error"]["param"]) == (400, param)
        status, err = post(server.url + "/v1/chat/completions", CHAT | {"model": "ids-only"})
        assert (status, err["error"]["param"]) == (400, "messages")
        card = json.loads(get(server.url + "/v1/models")[1])["data"][0]
        assert not card["recurrent_depth"]["text"] and not card["recurrent_depth"]["chat"]


def _metrics(served) -> dict:
    samples = {}
    for family in text_string_to_metric_families(get(served.url + "/metrics")[1].decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            if "le" not in sample.labels:
                samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def test_metrics(served):
    """After the tests above: sane counts and latencies, and no compilation after warm-up."""
    m = _metrics(served)
    p = "recurrent_depth_"
    assert m[p + "slots"] == ENGINE["slots"] and m[p + "requests_running"] == 0 and m[p + "requests_waiting"] == 0
    assert m[p + "slot_use"] == 0 and m[p + "engine_ready"] == 1
    finished = lambda endpoint: sum(v for k, v in m.items() if k.startswith(  # noqa: E731
        f"{p}requests_total{{endpoint={endpoint},"))
    assert finished("completions") >= 40 and finished("chat") >= 4
    assert m[p + "requests_total{endpoint=completions,finish_reason=abort}"] >= ENGINE["slots"]
    assert m[p + "requests_rejected_total{status=400}"] >= len([b for b in BAD if b[2] == 400])
    assert m[p + "requests_rejected_total{status=429}"] >= 1
    assert m[p + "generation_tokens_total"] >= 100 and m[p + "prompt_tokens_total"] >= 100
    assert m[p + "engine_tokens_total"] >= m[p + "generation_tokens_total"]
    ttft, itl = p + "time_to_first_token_seconds", p + "inter_token_latency_seconds"
    assert m[ttft + "_count"] >= 20 and 0 < m[ttft + "_sum"] / m[ttft + "_count"] < 30
    assert m[itl + "_count"] >= 50 and 0 < m[itl + "_sum"] / m[itl + "_count"] < 5
    iterations = p + "iterations_per_token"
    assert m[iterations + "_count"] == m[p + "generation_tokens_total"]
    assert 1 <= m[iterations + "_sum"] / m[iterations + "_count"] <= ENGINE["max_steps"]
    assert 0 <= m[p + "exited_waiting_fraction"] < 1
    assert m[p + "core_iterations_total"] > 0 and m[p + "slot_iterations_total"] > 0
    assert m[p + "exited_waiting_iterations_total"] <= m[p + "slot_iterations_total"]
    assert m[p + "compiles_total"] == served.compiles  # no compilation after warm-up, across mixed settings


def test_playground_page_is_served(served):
    status, page = get(served.url + "/")
    assert status == 200 and b"/static/playground.js" in page
    for name in ("playground.js", "playground.css"):
        assert get(served.url + f"/static/{name}")[0] == 200


# ---- the command line -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, status, message", [
    ([], 2, "Flag --checkpoint must have a value other than None"),
    (["--checkpoint=x", "--port=70000"], 2, "flag --port=70000: 70000 is not"),
    (["--checkpoint=x", "--slots=0"], 2, "flag --slots=0: 0 is not"),
    (["--checkpoint=x", "--dtype=float8"], 2, "flag --dtype=float8: value should be one of"),
    (["--checkpoint=x", "--no_such_flag"], 2, "Unknown command line flag 'no_such_flag'"),
    (["--checkpoint=x", "extra"], 2, "takes no positional arguments, got ['extra']"),
    (["--checkpoint=/no/such/checkpoint", "--port=0"], 1, "checkpoint /no/such/checkpoint does not exist"),
])
def test_cli_errors_are_one_line(capsys, argv, status, message):
    assert serve_cli.main(argv) == status
    err = capsys.readouterr().err
    assert err.startswith("python -m recurrent_depth.cli.serve: error: ") and message in err, err
    assert err.count("\n") == 1


def test_cli_bad_mesh_and_taken_port(served, capsys):
    checkpoint = f"--checkpoint={served.checkpoint}"
    assert serve_cli.main([checkpoint, "--port=0", "--mesh=1,2"]) == 1
    assert serve_cli.main([checkpoint, f"--port={served.server.port}"]) == 1
    assert serve_cli.main([checkpoint, "--port=0", "--max_len=32", "--spans=16,x"]) == 1
    assert serve_cli.main([checkpoint, "--port=0", "--max_len=32", "--spans=16,24"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert "error: mesh shape must give sizes for" in err[0]
    assert err[1].startswith("python -m recurrent_depth.cli.serve: error: cannot listen on 127.0.0.1:")
    assert err[2].endswith("error: --spans must be a comma-separated list of lengths, got 16,x")
    assert err[3].endswith("error: spans must be positive lengths, the longest max_len (32), got [16, 24]")
    assert len(err) == 4


def test_cli_loads_the_checkpoint_its_tokenizer_and_name(served, capsys):
    """What `serve` builds from its flags, before the warm-up: an engine with the flags' sizes, the checkpoint's
    tokenizer and name; its app answers 503 until the engine starts."""
    loaded = []
    argv = [f"--checkpoint={served.checkpoint}", "--slots=2", "--max_len=32", "--max_steps=4", "--max_queue=3",
            "--admit_batch=3", "--spans=16,32"]
    assert run_cli(lambda args: loaded.append(serve_cli.load(serve_cli.FLAGS)), serve_cli.FLAGS, argv, doc="",
                   prog="serve") == 0
    engine, tokenizer, name = loaded[0]
    # the default mesh puts the slots over all 8 (test) devices: 2 slots round up to 8
    assert (engine.slots, engine.max_len, engine.max_steps, engine.max_queue, engine.admit_batch,
            engine.spans) == (8, 32, 4, 3, 3, (16, 32))
    assert not engine.ready
    assert name == "tiny-words" and tokenizer.encode("kan lor") == served.tokenizer.encode("kan lor")
    with BackgroundServer(create_app(engine, tokenizer=tokenizer, model_name=name)) as server:
        assert get(server.url + "/health")[0] == 503
        status, body = post(server.url + "/v1/chat/completions", CHAT)
        assert status == 503 and body["error"]["code"] == "engine_not_ready"
    # A warm-up that fails leaves the server up, saying why.
    engine.start = lambda: (_ for _ in ()).throw(RuntimeError("out of device memory"))
    with BackgroundServer(create_app(engine, tokenizer=tokenizer, model_name=name, warm_up=True)) as server:
        deadline = time.monotonic() + 10
        while json.loads(get(server.url + "/health")[1])["status"] != "error":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert get(server.url + "/health") == (503, b'{"status":"error","error":"RuntimeError: out of device memory"}')
        status, body = post(server.url + "/v1/chat/completions", CHAT)
        assert status == 503 and body["error"]["code"] == "engine_dead" and "out of device memory" in body["error"][
            "message"]
    assert serve_cli.main(["--help"]) == 0
    assert capsys.readouterr().out.startswith(serve_cli.__doc__.strip())


def test_listen_refuses_a_taken_port():
    with listen("127.0.0.1", 0) as sock:
        with pytest.raises(OSError):
            listen("127.0.0.1", sock.getsockname()[1])
