"""Internal: one measurement of the ORIGINAL PyTorch Huginn for bench/fullsize.py, in this process.

  /path/to/torch-venv/bin/python bench/fullsize_original.py SPEC.json RESULT.json

bench/fullsize.py runs it (see its docstring for what is measured) under its --original_python, an interpreter with
torch, transformers 4.x and numpy: this file imports nothing else, neither this package nor absl, so it takes its
two files as positional arguments rather than flags.  SPEC names the checkpoint, the folder of the original's
`raven_modeling_minimal.py` and `raven_config_minimal.py` (unmodified, imported from there as a package, as
bench/original_train_bench.py does; the project contains none of the original's code), the measurement and its
settings; RESULT receives the figures as JSON, or {"error": ...}.

What runs is the original's own path: `RavenForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)`, its forward
`model(input_ids, num_steps=r, init_scale=0.0)` under torch.no_grad, and its `generate(input_ids, GenerationConfig(
max_new_tokens=n, do_sample=False, eos_token_id=None), num_steps=r, init_scale=0.0, cache_lookup_strategy=...)`
(Hugging Face's greedy loop with the original's HuginnDynamicCache), on the CPU with torch's default threads.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import sys
import time
import types


def load_original(directory: pathlib.Path):
    """The original's modeling module, imported from `directory` as a package (it imports its config relatively)."""
    package = types.ModuleType("huginn_original")
    package.__path__ = [str(directory)]
    sys.modules["huginn_original"] = package
    return importlib.import_module("huginn_original.raven_modeling_minimal")


def _rss_gb(field: str = "VmRSS") -> float:
    for line in pathlib.Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return sig(int(line.split()[1]) * 1024 / 1e9)
    return 0.0


def _timed(call, repeats: int):
    """(first call's seconds, best of `repeats` further calls, the last output)."""
    start = time.perf_counter()
    out = call()
    first, times = time.perf_counter() - start, []
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return first, min(times), out


class Stamps:
    """A streamer for Hugging Face's generate that notes when each put() comes: the prompt, then every token."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def generate_figures(call, repeats: int, batch: int, new_tokens: int) -> dict:
    """The generation figures from `call()` -> (start, end, the times each token arrived, tokens): the first call
    (compiling) and the fastest of `repeats` more.  bench/fullsize.py uses it for this project's side too."""
    first_start, first_end, _, _ = call()
    runs = [call() for _ in range(repeats)]
    start, end, stamps, tokens = min(runs, key=lambda run: run[1] - run[0])
    if len(stamps) != new_tokens:
        raise RuntimeError(f"{len(stamps)} tokens arrived, not {new_tokens}")
    decode = batch * (new_tokens - 1) / (stamps[-1] - stamps[0]) if new_tokens > 1 else None
    return {"first_call_s": round(first_end - first_start, 2), "generate_s": round(end - start, 3),
            "first_token_s": round(stamps[0] - start, 3), "tokens_per_s": sig(batch * new_tokens / (end - start)),
            "decode_tokens_per_s": None if decode is None else sig(decode), "tokens": tokens}


def sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def measure(spec: dict) -> dict:
    import numpy as np
    import torch
    import transformers

    torch.set_grad_enabled(False)
    original = load_original(pathlib.Path(spec["original"]))
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_arg = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # 4.56 renamed it
    start = time.perf_counter()
    model = original.RavenForCausalLM.from_pretrained(spec["dir"], **{dtype_arg: torch.bfloat16})
    model.eval()
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # the tied head counts once
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    result = {"load_s": round(time.perf_counter() - start, 2), "params_gb": sig(nbytes / 1e9),
              "per_device_gb": [sig(nbytes / 1e9)], "rss_after_load_gb": _rss_gb(),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "torch_threads": torch.get_num_threads()}
    ids = torch.tensor(spec["prompts"], dtype=torch.long)
    batch, prompt_len = ids.shape
    steps = spec["num_steps"]
    if spec["measure"] == "forward":
        first, best, logits = _timed(lambda: model(input_ids=ids, num_steps=steps, init_scale=0.0).logits,
                                     spec["repeats"])
        np.save(spec["logits_out"], logits.float().numpy())
        result.update(first_call_s=round(first, 2), forward_s=round(best, 3),
                      prefill_tokens_per_s=sig(batch * prompt_len / best))
    elif spec["measure"] == "generate":
        n = spec["new_tokens"]
        config = transformers.GenerationConfig(max_new_tokens=n, do_sample=False, use_cache=True, eos_token_id=None,
                                               pad_token_id=0)
        stamps = Stamps()

        def call():
            stamps.times.clear()
            start = time.perf_counter()
            out = model.generate(ids, config, attention_mask=torch.ones_like(ids), streamer=stamps, num_steps=steps,
                                 init_scale=0.0, cache_lookup_strategy=spec["cache"])
            return start, time.perf_counter(), stamps.times[1:], out[:, prompt_len:].tolist()  # [0]: the prompt

        result.update(generate_figures(call, spec["repeats"], batch, n))
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {sys.executable} bench/fullsize_original.py SPEC.json RESULT.json (run by bench/fullsize.py)",
              file=sys.stderr)
        return 2
    spec, out = json.loads(pathlib.Path(argv[0]).read_text()), pathlib.Path(argv[1])
    try:
        result = measure(spec)
    except Exception as error:  # reported to bench/fullsize.py, which names it
        out.write_text(json.dumps({"error": f"{type(error).__name__}: {error}"}))
        raise
    out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
