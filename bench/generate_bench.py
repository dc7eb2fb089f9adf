"""Generation throughput at the "bench-small" shape; prints one JSON line.

  python bench/generate_bench.py [--repeats=3]

bench-small: hidden 512, 8 heads, (2, 4, 2) layers, MLP 1536, vocab 32768, float32, r = 8 iterations per token,
32-token prompts, 32 new tokens (greedy, random initial state), one device.  For batch 1 and 16 and the cache
strategies `full` and `compress-4`: generated tokens per second over the whole call (prefill included) and
without the prefill (from the time of a 1-token call), the best of --repeats after a compiling call; the first
call's time (compilation) and the bytes of the KV cache.

Roofline: each decoding step reads every weight once (`weight_mib_per_step`, 36 layer applications at r = 8
plus the head) and does batch x forward FLOPs; it cannot be faster than the larger of the bytes over this
machine's memory bandwidth (`memory_gb_per_s`, measured before each row) and the FLOPs over its measured
matmul peak (the prefill likewise).
`roofline_*` are those bounds in tokens/s and `decode_of_roofline` the fraction of it decoding reaches.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import numpy as np
from absl import flags

from recurrent_depth import ModelConfig, RecurrentDepthLM, generate, init_params
from recurrent_depth.cli import app
from recurrent_depth.decoding.kv_cache import CacheStrategy, KVCache
from recurrent_depth.model import flops

PROMPT_LEN, NEW_TOKENS, NUM_STEPS = 32, 32, 8
FLAGS = flags.FlagValues()
flags.DEFINE_integer("repeats", 3, "timed calls per setting after the compiling one (the best counts)",
                     flag_values=FLAGS)


def bench_model():
    config = ModelConfig(vocab_size=32768, hidden_size=512, num_heads=8, intermediate_size=1536,
                         num_prelude_layers=2, num_core_layers=4, num_coda_layers=2, max_seq_len=256,
                         mean_recurrence=NUM_STEPS, mean_backprop_depth=4)
    model = RecurrentDepthLM(config)
    return model, init_params(model, jax.random.key(0))


def timed(model, params, prompts, strategy: str, new_tokens: int, repeats: int):
    """(first call's seconds, best of `repeats` further calls) for one generate setting."""
    call = lambda: generate(model, params, prompts, max_new_tokens=new_tokens,  # noqa: E731
                            num_steps=NUM_STEPS, cache_strategy=strategy)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    assert int(out.num_tokens.sum()) == len(prompts) * new_tokens
    return times[0], min(times[1:])


def roofline(config, batch: int, bandwidth: float, peak: float) -> tuple[float, float]:
    """(fastest whole call, fastest decoding step) in seconds: each pass is bound by its weight bytes over the
    memory bandwidth or by its FLOPs over the matmul peak, whichever is slower."""
    weights = flops.decode_weight_bytes(config, NUM_STEPS) / bandwidth
    token_flops = flops.forward_flops_per_token(config, PROMPT_LEN + NEW_TOKENS, NUM_STEPS)
    head_flops = 2 * config.hidden_size * config.vocab_size  # the prefill applies the head at one position
    step = max(weights, batch * token_flops / peak)
    prefill = max(weights, batch * (PROMPT_LEN * (token_flops - head_flops) + head_flops) / peak)
    return prefill + (NEW_TOKENS - 1) * step, step


def run(model, params, batch: int, strategy: str, repeats: int, peak: float) -> dict:
    bandwidth = flops.measure_memory_bandwidth()  # per row: it moves with the other tenants of the host
    prompts = np.random.default_rng(batch).integers(0, model.config.vocab_size, (batch, PROMPT_LEN))
    first_call, total = timed(model, params, prompts, strategy, NEW_TOKENS, repeats)
    _, prefill = timed(model, params, prompts, strategy, 1, repeats)  # the prompt and the first token
    cache = KVCache.nbytes_for(model.config, batch, PROMPT_LEN + NEW_TOKENS, CacheStrategy.parse(strategy), NUM_STEPS)
    bound_total, bound_step = roofline(model.config, batch, bandwidth, peak)
    decode = batch * (NEW_TOKENS - 1) / (total - prefill)
    return {"batch": batch, "cache": strategy, "tokens_per_s": round(batch * NEW_TOKENS / total, 1),
            "decode_tokens_per_s": round(decode, 1),
            "roofline_tokens_per_s": round(batch * NEW_TOKENS / bound_total, 1),
            "roofline_decode_tokens_per_s": round(batch / bound_step, 1),
            "decode_of_roofline": round(decode * bound_step / batch, 3), "memory_gb_per_s": round(bandwidth / 1e9, 1),
            "prefill_s": round(prefill, 3), "first_call_s": round(first_call, 2), "cache_mib": round(cache / 2**20, 2)}


def main(argv: list[str] | None = None) -> int:
    return app.run(_bench, FLAGS, argv, doc=__doc__, prog="bench/generate_bench.py")


def _bench(positional: list[str]) -> None:
    app.positional(positional)
    model, params = bench_model()
    peak = flops.measure_matmul_peak()
    results = [run(model, params, batch, strategy, FLAGS.repeats, peak)
               for batch in (1, 16) for strategy in ("full", "compress-4")]
    print(json.dumps({"bench": "generate", "shape": "bench-small", "num_steps": NUM_STEPS, "prompt_len": PROMPT_LEN,
                      "new_tokens": NEW_TOKENS, "dtype": "float32", "device": jax.devices()[0].device_kind,
                      "weight_mib_per_step": round(flops.decode_weight_bytes(model.config, NUM_STEPS) / 2**20, 1),
                      "matmul_peak_tflops": round(peak / 1e12, 4),
                      "results": results}))


if __name__ == "__main__":
    sys.exit(main())
