"""Parallel sampling against token-by-token generation on the small trained text model; prints one JSON line.

  python bench/parallel_bench.py [--workdir=workdir_text_small] [--repeats=1]
  python bench/parallel_bench.py --shape=bench-small [--repeats=1]   # the memory-bound setting

--shape=bench-small: random weights of the "bench-small" shape (hidden 512, (2, 4, 2) layers, MLP 1536, vocab
32768, float32: a 52 MiB core block, far beyond the CPU's cache, so a batch-1 step is bound by reading the
weights: the premise of parallel sampling), random prompts, batch 1 only, `parallel_generate` with freeze="fixed"
(every position gets its r iterations, whatever the weights) and with the defaults.

The model is configs/text_small.py's; if --workdir holds no checkpoint, the bench builds the corpus (`python -m
recurrent_depth.cli.corpus stdlib`) into it and train.py trains it there first (about 15 CPU minutes, once).
Prompts: 32-token beginnings of held-out documents.  At r = 32 iterations per token (the prefill of both samplers
too), 128 new tokens, greedy, the model's init scale, no stop tokens, batch 1 and 8: `generate` (the `full` cache),
then `parallel_generate` for a few settings.  Per row: tokens/s over the whole call (the best of --repeats after a
compiling call); core passes per token (applications of the core block, each over every position in flight: the
weight reads); iterations per token (core iterations over all positions: the arithmetic); agreement with
`generate`'s tokens: the fraction of identical tokens and the first position where a row differs (mean over the
rows that differ; null: none does).  `generate_self_agreement` compares generate with another seed of the random
initial state: the agreement that noise alone leaves.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import flags

from recurrent_depth import generate, parallel_generate
from recurrent_depth.checkpoint.train_state import RUN_CONFIG_FILE, load_workdir_params
from recurrent_depth.cli import app
from recurrent_depth.data.sources import expand_paths, read_documents
from recurrent_depth.data.tokenizer import load_tokenizer
from recurrent_depth.model.config import ModelConfig
from recurrent_depth.model.lm import RecurrentDepthLM, init_params

ROOT = Path(__file__).resolve().parent.parent
PROMPT_LEN, NEW_TOKENS, NUM_STEPS, BATCHES = 32, 128, 32, (1, 8)
FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", str(ROOT / "workdir_text_small"), "a train.py workdir of configs/text_small.py "
                    "(trained there if it has no checkpoint)", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 1, "timed calls per setting after the compiling one", flag_values=FLAGS)
flags.DEFINE_enum("shape", "text_small", ["text_small", "bench-small"], "the trained text model, or random weights "
                  "of the bench-small shape at batch 1 (memory-bound)", flag_values=FLAGS)
MEMORY_BOUND_SETTINGS = {"parallel freeze fixed": dict(freeze="fixed"), "parallel default": {}}
# name -> parallel_generate settings (the defaults: max_wavefront 128, inner_steps 4, exit_threshold 0.03).
SETTINGS = {
    "parallel default": {},
    "parallel threshold 0.05": dict(exit_threshold=0.05),
    "parallel threshold 0.1": dict(exit_threshold=0.1),
    "parallel inner 8": dict(inner_steps=8),
    "parallel wavefront 32": dict(max_wavefront=32),
    "parallel, cache compress-4": dict(cache_strategy="compress-4"),  # no `latest` fallback reads
}


def trained_model(workdir: Path):
    """(model, params, run config) of the workdir's newest checkpoint.  If it has none: builds the corpus into
    workdir/corpus and trains configs/text_small.py on it there, as a user would (once)."""
    try:
        model, params = load_workdir_params(workdir)
    except FileNotFoundError:
        corpus = workdir / "corpus"
        print(f"no checkpoint in {workdir}: building {corpus} and training configs/text_small.py (once)",
              file=sys.stderr)
        if not (corpus / "tokenizer.model").exists():
            subprocess.run([sys.executable, "-m", "recurrent_depth.cli.corpus", "stdlib", f"--output={corpus}"],
                           cwd=ROOT, check=True)
        config = f"--config={ROOT / 'configs' / 'text_small.py'}:{corpus}"
        subprocess.run([sys.executable, str(ROOT / "train.py"), config, f"--workdir={workdir}"], cwd=ROOT, check=True)
        model, params = load_workdir_params(workdir)
    return model, params, json.loads((workdir / RUN_CONFIG_FILE).read_text())


def prompts(run: dict, count: int) -> np.ndarray:
    """[count, PROMPT_LEN] token ids: BOS and the beginnings of held-out documents (the training corpus's if the
    run has none)."""
    data = run["data"]
    tokenizer = load_tokenizer(data["tokenizer"]["kind"], data["tokenizer"]["path"])
    source = (data.get("eval_sources") or data["sources"])[0]
    rows = []
    for doc in read_documents(source["kind"], expand_paths(source["paths"])):
        ids = ([tokenizer.bos_id] if tokenizer.bos_id >= 0 else []) + tokenizer.encode(doc)
        ids = ids[:PROMPT_LEN]
        if len(ids) == PROMPT_LEN:
            rows.append(ids)
        if len(rows) == count:
            return np.asarray(rows, np.int32)
    raise ValueError(f"fewer than {count} documents of {PROMPT_LEN} tokens in {source['paths']}")


def timed(call, repeats: int):
    """(output, best seconds of `repeats` calls after a compiling one)."""
    out, times = jax.block_until_ready(call()), []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return out, min(times)


def agreement(tokens, reference) -> dict:
    """Fraction of identical tokens and the mean first differing position (None if no row differs)."""
    tokens, reference = np.asarray(tokens), np.asarray(reference)
    same = tokens == reference
    first = [int(np.argmin(row)) for row in same if not row.all()]
    return {"agreement": round(float(same.mean()), 3), "first_difference": None if not first else
            round(float(np.mean(first)), 1), "rows_identical": int(same.all(axis=1).sum())}


def bench_small():
    """(model, params) of the bench-small shape, random weights (float32)."""
    config = ModelConfig(vocab_size=32768, hidden_size=512, num_heads=8, intermediate_size=1536,
                         num_prelude_layers=2, num_core_layers=4, num_coda_layers=2, max_seq_len=256,
                         mean_recurrence=NUM_STEPS, mean_backprop_depth=4)
    model = RecurrentDepthLM(config)
    return model, init_params(model, jax.random.key(0))


def bench(model, params, ids: np.ndarray, repeats: int, settings: dict = SETTINGS) -> list[dict]:
    """The rows of one batch: generate, generate with another seed, then each parallel setting."""
    batch = ids.shape[0]
    run = lambda seed: generate(model, params, ids, max_new_tokens=NEW_TOKENS,  # noqa: E731
                                num_steps=NUM_STEPS, seed=seed)
    reference, seconds = timed(lambda: run(0), repeats)
    base_speed = batch * NEW_TOKENS / seconds
    rows = [{"batch": batch, "sampler": "generate", "tokens_per_s": round(base_speed, 1), "speedup": 1.0,
             "core_passes_per_token": NUM_STEPS, "iterations_per_token": NUM_STEPS,
             "generate_self_agreement": agreement(run(1).tokens, reference.tokens)["agreement"]}]
    for name, kw in settings.items():
        out, seconds = timed(lambda kw=kw: parallel_generate(model, params, ids, max_new_tokens=NEW_TOKENS,
                                                             num_steps=NUM_STEPS, **kw), repeats)
        inner = kw.get("inner_steps", 4)
        passes = NUM_STEPS + inner * np.asarray(out.outer_steps)  # [batch] the prefill's and the outer steps'
        iterations = np.asarray(out.steps_per_sequence)  # the prompt's last position's prefill included
        speed = batch * NEW_TOKENS / seconds
        rows.append({"batch": batch, "sampler": name, "tokens_per_s": round(speed, 1),
                     "speedup": round(speed / base_speed, 2),
                     "core_passes_per_token": round(float(passes.mean()) / NEW_TOKENS, 2),
                     "iterations_per_token": round(float(iterations.mean()) / NEW_TOKENS, 1),
                     "outer_steps": round(float(np.mean(out.outer_steps)), 1),
                     **agreement(out.tokens, reference.tokens)})
    return rows


def main(argv: list[str] | None = None) -> int:
    return app.run(_bench, FLAGS, argv, doc=__doc__, prog="bench/parallel_bench.py")


def _bench(positional: list[str]) -> None:
    app.positional(positional)
    if FLAGS.shape == "bench-small":
        model, params = bench_small()
        ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, PROMPT_LEN), dtype=np.int32)
        sizes = {name: int(sum(x.nbytes for x in jax.tree.leaves(params[part]))) for name, part in
                 (("core_block_bytes", "core"),) if part in params}
        print(json.dumps({"bench": "parallel_sampling", "shape": "bench-small", "num_steps": NUM_STEPS,
                          "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "devices": str(jax.devices()[0]),
                          **sizes, "rows": bench(model, params, ids, FLAGS.repeats, MEMORY_BOUND_SETTINGS)}))
        return
    model, params, run = trained_model(Path(FLAGS.workdir))
    ids = prompts(run, max(BATCHES))
    rows = [row for batch in BATCHES for row in bench(model, params, ids[:batch], FLAGS.repeats)]
    print(json.dumps({"bench": "parallel_sampling", "workdir": str(FLAGS.workdir), "num_steps": NUM_STEPS,
                      "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "devices": str(jax.devices()[0]),
                      "rows": rows}))


if __name__ == "__main__":
    sys.exit(main())
