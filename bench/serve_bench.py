"""The OpenAI-compatible server under load, against sequential batch-1 `generate`; prints one JSON line per
(shape, concurrency).

  python bench/serve_bench.py [--shape=text_small,bench-small] [--concurrency=1,8,32] [--workdir=workdir_text_small]

The server runs in this process: a `serving.engine.Engine` of --slots slots (default: the largest concurrency)
behind `serving.app.create_app` on 127.0.0.1 (`BackgroundServer`), warmed up (compiled) before anything is timed.
An asyncio client (the `openai` package's AsyncOpenAI) keeps `concurrency` requests in flight (closed loop: each
of its `concurrency` workers sends its next request when its last one has ended) over streamed `POST
/v1/completions` with token-id prompts and `return_iterations` / `return_token_ids` in `extra_body`, and times
every token as its chunk arrives.

Shapes: `text_small` is configs/text_small.py's model, the trained checkpoint of --workdir if it has one (prompts:
beginnings of its held-out documents), else random weights of that shape (random prompts); each line says which
(`weights`).  `bench-small` is the memory-bound shape of bench/parallel_bench.py (hidden 512, (2, 4, 2) layers, MLP
1536, vocab 32768, float32), random weights.  `tiny` (random, hidden 32) is for the tests.

Requests (seeded: request i is the same whatever the count): prompt lengths uniform in --prompt_lens, output
lengths and depth settings in turn from --output_lens (ignore_eos: every request generates exactly that many) and
--criteria (`none` is fixed depth at --max_steps or half of it, drawn; `kl` / `latent-diff`, any of
`decoding.exit_criteria`, exit early by that criterion at its default threshold, capped at --max_steps), greedy
with seed i (the random initial state depends on it).  Concurrency c serves the first max(--min_requests,
--requests_per_client x c) requests.

The engine prefills every prompt at one length, the longest prompt's power of two (at least 16; its other bucket
is --max_len, unused): the prefill's work is the same for all, and both the engine and the baseline compile one
prefill length.  Baseline: the same requests one at a time through `recurrent_depth.decoding.generate` at batch 1
with the same settings (the prompt right-padded to that length, the engine's cache strategy and max_steps, so its
greedy tokens equal the server's), after one compiling call of each distinct setting (output length, criterion):
compile time is excluded.  `identical_to_generate` is the fraction of requests whose streamed tokens
equal `generate`'s.

Per line: output tokens/s and requests/s over the wall time of the whole load, time to first token (from sending
the request) and inter-token latency (between successive tokens of a request) at p50 / p90 / p99 in ms, mean core
iterations per generated token (the prefill's for the first token), the baseline's tokens/s on the same requests
and the ratio; from the engine: the mean number of busy slots (sampled every 10 ms), the fraction of slot
iterations that early-exited slots spent waiting for the deepest slot of their step, and the compilations after
warm-up (0 expected).
"""

import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import openai
from absl import flags

from recurrent_depth import generate
from recurrent_depth.checkpoint.train_state import RUN_CONFIG_FILE, load_workdir_params
from recurrent_depth.cli import app
from recurrent_depth.data.sources import expand_paths, read_documents
from recurrent_depth.data.tokenizer import load_tokenizer
from recurrent_depth.decoding.exit_criteria import DEFAULT_THRESHOLDS
from recurrent_depth.model.config import ModelConfig
from recurrent_depth.model.lm import RecurrentDepthLM, init_params
from recurrent_depth.serving.app import BackgroundServer, create_app
from recurrent_depth.serving.engine import MIN_BUCKET, Engine

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ("text_small", "bench-small", "tiny")
STATS_EVERY_S = 0.01  # how often the busy slots are sampled
FLAGS = flags.FlagValues()
flags.DEFINE_list("shape", ["text_small", "bench-small"], f"shapes to serve, one after the other: {SHAPES}",
                  flag_values=FLAGS)
flags.DEFINE_list("concurrency", ["1", "8", "32"], "requests in flight, one line each", flag_values=FLAGS)
flags.DEFINE_integer("slots", None, "engine slots (default: the largest --concurrency)", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_string("workdir", str(ROOT / "workdir_text_small"), "a train.py workdir of configs/text_small.py; "
                    "without a checkpoint there, text_small has random weights", flag_values=FLAGS)
flags.DEFINE_integer("admit_batch", 4, "the engine's admit_batch: waiting requests prefilled together",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("max_steps", 8, "the depth cap: the engine's max_steps, fixed-depth requests' num_steps (and "
                     "half of it), adaptive requests' cap", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("max_len", 128, "positions per slot (the engine's max_len)", lower_bound=2, flag_values=FLAGS)
flags.DEFINE_list("prompt_lens", ["8", "32"], "the shortest and longest prompt, in tokens", flag_values=FLAGS)
flags.DEFINE_list("output_lens", ["16", "48"], "output lengths the requests draw from", flag_values=FLAGS)
flags.DEFINE_list("criteria", ["none", "kl", "latent-diff"], "depth settings the requests draw from: none (fixed "
                  f"depth) or exit criteria of {sorted(DEFAULT_THRESHOLDS)} at their default thresholds",
                  flag_values=FLAGS)
flags.DEFINE_integer("requests_per_client", 2, "requests per unit of concurrency", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("min_requests", 4, "requests at any concurrency at least", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the request mix", flag_values=FLAGS)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One request of the mix."""

    prompt: tuple[int, ...]
    max_tokens: int
    num_steps: int
    criterion: str | None  # None: fixed depth
    seed: int


@dataclasses.dataclass
class Served:
    """What the server sent back for one request, with the arrival time of each token."""

    tokens: list
    iterations: list
    sent: float
    arrivals: list


def shape_model(shape: str, workdir: Path):
    """(model, params, weights description, prompt source: documents' token ids or None for random prompts)."""
    if shape == "bench-small":
        config = ModelConfig(vocab_size=32768, hidden_size=512, num_heads=8, intermediate_size=1536,
                             num_prelude_layers=2, num_core_layers=4, num_coda_layers=2, max_seq_len=256,
                             mean_recurrence=8, mean_backprop_depth=4)
    elif shape == "tiny":
        config = ModelConfig(vocab_size=256, hidden_size=32, num_heads=2, intermediate_size=64, num_prelude_layers=1,
                             num_core_layers=1, num_coda_layers=1, max_seq_len=128, mean_recurrence=4,
                             mean_backprop_depth=2)
    else:
        try:
            model, params = load_workdir_params(workdir)
        except FileNotFoundError:
            from recurrent_depth.runtime.config_file import load_config_file

            config = ModelConfig.from_dict(load_config_file(ROOT / "configs" / "text_small.py").model.to_dict())
        else:
            run = json.loads((workdir / RUN_CONFIG_FILE).read_text())
            return model, params, f"trained checkpoint of {workdir}", documents(run)
    model = RecurrentDepthLM(config)
    return model, init_params(model, jax.random.key(0)), "random", None


def documents(run: dict, count: int = 256) -> list[list[int]]:
    """Token ids of up to `count` held-out documents of a run (BOS first), the prompts' source."""
    data = run["data"]
    tokenizer = load_tokenizer(data["tokenizer"]["kind"], data["tokenizer"]["path"])
    source = (data.get("eval_sources") or data["sources"])[0]
    docs = []
    for doc in read_documents(source["kind"], expand_paths(source["paths"])):
        docs.append(([tokenizer.bos_id] if tokenizer.bos_id >= 0 else []) + tokenizer.encode(doc))
        if len(docs) == count:
            break
    return docs


def make_requests(count: int, vocab_size: int, docs, *, seed: int, prompt_lens, output_lens, criteria,
                  max_steps: int) -> list[Spec]:
    """The first `count` requests of the mix: request i has criterion i mod len(criteria) and output length i //
    len(criteria) mod len(output_lens) (so that every prefix mixes them), its prompt (and a fixed depth's num_steps)
    from a generator of its own."""
    specs = []
    for i in range(count):
        rng = np.random.default_rng((seed, i))
        length = int(rng.integers(prompt_lens[0], prompt_lens[1] + 1))
        long_docs = [d for d in docs or () if len(d) >= length]
        if long_docs:
            prompt = long_docs[int(rng.integers(len(long_docs)))][:length]
        else:
            prompt = rng.integers(0, vocab_size, length).tolist()
        criterion = criteria[i % len(criteria)]
        num_steps = max_steps if criterion != "none" else int(rng.choice([max(1, max_steps // 2), max_steps]))
        specs.append(Spec(prompt=tuple(int(t) for t in prompt), max_tokens=output_lens[i // len(criteria)
                                                                                      % len(output_lens)],
                          num_steps=num_steps, criterion=None if criterion == "none" else criterion, seed=i))
    return specs


# ---- the baseline: sequential batch-1 generate ---------------------------------------------------------------


def baseline(model, params, specs: list[Spec], engine: Engine) -> list[dict]:
    """Each request through `generate` alone: {tokens, iterations, seconds}; every distinct setting compiles first."""
    def call(spec: Spec):
        bucket = next(b for b in engine.buckets if b >= len(spec.prompt))
        ids = np.zeros((1, bucket), np.int32)
        ids[0, :len(spec.prompt)] = spec.prompt
        out = generate(model, params, ids, lengths=np.asarray([len(spec.prompt)], np.int32),
                       padding_side="right", max_new_tokens=spec.max_tokens, num_steps=spec.num_steps,
                       max_steps=engine.max_steps, cache_strategy=engine.cache_strategy,
                       exit_criterion=spec.criterion, seed=spec.seed)
        return jax.tree.map(np.asarray, jax.block_until_ready(out))

    warmed = set()
    for spec in specs:  # compile each setting (the shapes and the static criterion) before timing anything
        setting = (next(b for b in engine.buckets if b >= len(spec.prompt)), spec.max_tokens, spec.criterion)
        if setting not in warmed:
            call(spec)
            warmed.add(setting)
    results = []
    for spec in specs:
        start = time.perf_counter()
        out = call(spec)
        seconds = time.perf_counter() - start
        n = int(out.num_tokens[0])
        results.append({"tokens": out.tokens[0, :n].tolist(), "iterations": out.steps[0, :n].tolist(),
                        "seconds": seconds})
    return results


# ---- the load: an asyncio client ----------------------------------------------------------------------------


def extra_body(spec: Spec) -> dict:
    """The fields beyond OpenAI's: the depth, and the tokens and iterations of every chunk."""
    depth = {"num_steps": spec.num_steps} | ({"exit_criterion": spec.criterion} if spec.criterion else {})
    return {"ignore_eos": True, "return_iterations": True, "return_token_ids": True, **depth}


async def send(client: openai.AsyncOpenAI, spec: Spec, model_name: str) -> Served:
    """One streamed completion; each token's arrival time is that of its chunk."""
    served = Served([], [], time.perf_counter(), [])
    stream = await client.completions.create(model=model_name, prompt=list(spec.prompt), max_tokens=spec.max_tokens,
                                             temperature=0, seed=spec.seed, stream=True,
                                             extra_body=extra_body(spec))
    async for chunk in stream:
        now = time.perf_counter()
        for choice in chunk.choices:
            served.tokens += getattr(choice, "token_ids", None) or []
            served.iterations += getattr(choice, "iterations", None) or []
        served.arrivals += [now] * (len(served.tokens) - len(served.arrivals))
    if len(served.tokens) != spec.max_tokens:
        raise RuntimeError(f"asked {spec.max_tokens} tokens, got {len(served.tokens)}")
    return served


async def load(url: str, specs: list[Spec], concurrency: int, engine: Engine, model_name: str):
    """(results in request order, wall seconds, mean busy slots) of `concurrency` clients working through specs."""
    pending = list(enumerate(specs))[::-1]
    results: list[Served | None] = [None] * len(specs)
    busy = []

    async def client_loop(client):
        while pending:
            i, spec = pending.pop()
            results[i] = await send(client, spec, model_name)

    async def watch():
        while True:
            busy.append(engine.stats().running)
            await asyncio.sleep(STATS_EVERY_S)

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600) as client:
        watcher = asyncio.create_task(watch())
        start = time.perf_counter()
        try:
            await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        finally:
            watcher.cancel()
        wall = time.perf_counter() - start
    return results, wall, float(np.mean(busy)) if busy else 0.0


def percentiles(values, prefix: str) -> dict:
    values = np.asarray(values, np.float64) * 1e3
    return {f"{prefix}_p{q}_ms": round(float(np.percentile(values, q)), 1) if values.size else None
            for q in (50, 90, 99)}


def row(specs, served: list[Served], wall: float, reference: list[dict], concurrency: int) -> dict:
    tokens = sum(len(s.tokens) for s in served)
    ttft = [s.arrivals[0] - s.sent for s in served]
    itl = [b - a for s in served for a, b in zip(s.arrivals, s.arrivals[1:])]
    base_tokens = sum(len(r["tokens"]) for r in reference)
    base_speed = base_tokens / sum(r["seconds"] for r in reference)
    speed = tokens / wall
    return {"concurrency": concurrency, "requests": len(specs), "output_tokens": tokens, "wall_s": round(wall, 2),
            "output_tokens_per_s": round(speed, 1), "requests_per_s": round(len(specs) / wall, 2),
            **percentiles(ttft, "ttft"), **percentiles(itl, "itl"),
            "iterations_per_token": round(sum(sum(s.iterations) for s in served) / tokens, 2),
            "generate_tokens_per_s": round(base_speed, 1),
            "generate_iterations_per_token": round(sum(sum(r["iterations"]) for r in reference) / base_tokens, 2),
            "speedup": round(speed / base_speed, 2),
            "identical_to_generate": round(float(np.mean([s.tokens == r["tokens"]
                                                          for s, r in zip(served, reference)])), 3)}


def lengths() -> tuple[tuple[int, int], list[int]]:
    """((shortest, longest) prompt, output lengths) of the flags; ValueError unless they fit --max_len."""
    prompt_lens, output_lens = [int(x) for x in FLAGS.prompt_lens], [int(x) for x in FLAGS.output_lens]
    if (len(prompt_lens) != 2 or not 1 <= prompt_lens[0] <= prompt_lens[1] or not output_lens
            or min(output_lens) < 1 or prompt_lens[1] + max(output_lens) > FLAGS.max_len):
        raise ValueError(f"--prompt_lens={FLAGS.prompt_lens} (shortest, longest) and --output_lens="
                         f"{FLAGS.output_lens} must fit --max_len={FLAGS.max_len} (the longest prompt plus the "
                         "longest output)")
    return (prompt_lens[0], prompt_lens[1]), output_lens


def bench_shape(shape: str, concurrencies: list[int]) -> None:
    model, params, weights, docs = shape_model(shape, Path(FLAGS.workdir))
    slots = FLAGS.slots or max(concurrencies)
    counts = {c: max(FLAGS.min_requests, FLAGS.requests_per_client * c) for c in concurrencies}
    (lo, hi), output_lens = lengths()
    specs = make_requests(max(counts.values()), model.config.vocab_size, docs, seed=FLAGS.seed,
                          prompt_lens=(lo, hi), output_lens=output_lens, criteria=FLAGS.criteria,
                          max_steps=FLAGS.max_steps)
    bucket = min(max(MIN_BUCKET, 1 << (hi - 1).bit_length()), FLAGS.max_len)  # every prompt's prefill length
    engine = Engine(model, params, slots=slots, max_len=FLAGS.max_len, max_steps=FLAGS.max_steps,
                    max_queue=max(64, 2 * max(concurrencies)), buckets=sorted({bucket, FLAGS.max_len}),
                    admit_batch=FLAGS.admit_batch)
    common = {"bench": "serve", "shape": shape, "weights": weights, "slots": engine.slots,
              "admit_batch": engine.admit_batch, "spans": list(engine.spans),
              "max_len": engine.max_len, "max_steps": engine.max_steps, "cache_strategy": engine.cache_strategy,
              "device": jax.devices()[0].device_kind}
    try:
        start = time.perf_counter()
        engine.start()
        warm_up_s = time.perf_counter() - start
        start = time.perf_counter()
        reference = baseline(model, params, specs, engine)
        baseline_s = time.perf_counter() - start
        with BackgroundServer(create_app(engine, model_name=shape)) as server:
            warm = Spec(prompt=specs[0].prompt, max_tokens=2, num_steps=1, criterion=None, seed=0)
            asyncio.run(load(server.url, [warm], 1, engine, shape))  # the HTTP path's first request
            for i, c in enumerate(concurrencies):
                before = engine.stats()
                served, wall, busy = asyncio.run(load(server.url, specs[:counts[c]], c, engine, shape))
                after = engine.stats()
                slot_iterations = after.slot_iterations - before.slot_iterations
                print(json.dumps({**common, **row(specs[:counts[c]], served, wall, reference[:counts[c]], c),
                                  "mean_busy_slots": round(busy, 1),
                                  "exited_waiting": round((after.exited_waiting - before.exited_waiting)
                                                          / max(slot_iterations, 1), 3),
                                  "compiles_after_warm_up": after.compiles - before.compiles,
                                  **({"warm_up_s": round(warm_up_s, 1), "baseline_s": round(baseline_s, 1)}
                                     if i == 0 else {})}), flush=True)
    finally:
        engine.stop()


def main(argv: list[str] | None = None) -> int:
    return app.run(_bench, FLAGS, argv, doc=__doc__, prog="bench/serve_bench.py")


def _bench(positional: list[str]) -> None:
    app.positional(positional)
    unknown = [s for s in FLAGS.shape if s not in SHAPES]
    if unknown:
        raise ValueError(f"--shape: unknown {unknown}; expected any of {SHAPES}")
    unknown = [c for c in FLAGS.criteria if c != "none" and c not in DEFAULT_THRESHOLDS]
    if unknown or not FLAGS.criteria:
        raise ValueError(f"--criteria: unknown {unknown}; expected none or {sorted(DEFAULT_THRESHOLDS)}")
    concurrencies = [int(c) for c in FLAGS.concurrency]
    if not concurrencies or min(concurrencies) < 1:
        raise ValueError(f"--concurrency must be positive integers, got {FLAGS.concurrency}")
    lengths()
    for shape in FLAGS.shape:
        bench_shape(shape, concurrencies)


if __name__ == "__main__":
    sys.exit(main())
