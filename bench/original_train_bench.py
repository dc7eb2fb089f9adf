"""Train-step throughput of the ORIGINAL PyTorch Huginn implementation at "bench-small"; prints one JSON line.

  /path/to/torch-venv/bin/python bench/original_train_bench.py --original-dir DIR [--steps 5] [--threads N]

The counterpart of bench/train_bench.py's setting that does the original's work, for a side-by-side comparison.
Needs torch and transformers (4.x; 4.56.2 is what the fixtures were made with) in the interpreter that runs it,
not in the project's venv, and DIR holding the original's two files, unmodified, from a checkout of
github.com/seal-rg/recurrent-pretraining: recpre/raven_modeling_minimal.py and recpre/raven_config_minimal.py.
Nothing is downloaded; the project contains none of the original's code.

What it runs (the work of train_bench.py's AdamW setting): vocab 32768, hidden 512, 8 heads, (2, 4, 2) layers
(prelude, core, coda), MLP 1536, max seq 256, mean_recurrence 8, mean_backprop_depth 4, tied embeddings, qk bias,
float32, the original's own weight init. A batch of 4 x 256 random token ids (labels: the next token). Each step
is the original's forward with num_steps=(4, 4): it draws the initial state at random (its default,
truncated normal like the embedding), runs 4 core-block iterations under torch.no_grad, then 4 with gradient,
the coda, the head and the cross-entropy inside the forward; backward; clip grad norm 1.0;
torch.optim.AdamW(lr 1e-4, betas 0.9/0.95, weight decay 0.1). The 4 gradient iterations keep all activations
(the original checkpoints per iteration only when gradient_checkpointing is enabled, which is off by default);
--checkpoint-iterations turns that on, to compare with the project's per-iteration rematerialisation.
One warm-up step, then --steps timed steps; tokens_per_sec = steps * 1024 / their total time.  Like
train_bench.py it runs with glibc's transparent huge pages (recurrent_depth/runtime/host_memory.py, stdlib only),
so that both run under the same allocator; GLIBC_TUNABLES=glibc.malloc.hugetlb=0 turns them off for both.

Unlike every other entry point of the project (absl flags with underscores, recurrent_depth.cli.app), this one
parses its flags with argparse: it runs in the torch venv, where neither this package (only its stdlib-only
host_memory module is imported, from the source tree) nor absl is installed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import sys
import time
import types

ORIGINAL_FILES = ("raven_modeling_minimal.py", "raven_config_minimal.py")
BATCH, SEQ, N_NO_GRAD, K_GRAD = 4, 256, 4, 4


def load_original(directory: pathlib.Path):
    """The original's modeling module, imported from DIR as a package (it imports its config relatively)."""
    missing = [name for name in ORIGINAL_FILES if not (directory / name).is_file()]
    if missing:
        raise SystemExit(f"--original-dir {directory}: missing {', '.join(missing)} (copy them from recpre/ of a "
                         "checkout of github.com/seal-rg/recurrent-pretraining)")
    package = types.ModuleType("huginn_original")
    package.__path__ = [str(directory.resolve())]
    sys.modules["huginn_original"] = package
    try:
        return importlib.import_module("huginn_original.raven_modeling_minimal")
    except ModuleNotFoundError as error:
        raise SystemExit(f"importing the original from {directory} needs {error.name!r} in this interpreter "
                         f"({sys.executable}): pip install torch 'transformers<5'") from error


def bench_model(original):
    config = original.RavenConfig(
        n_embd=512, n_heads=8, n_layers=8, block_size=SEQ, vocab_size=32768, tie_embeddings=True,
        intermediate_size=1536, bias=False, qk_bias=True, n_layers_in_prelude=2, n_layers_in_recurrent_block=4,
        n_layers_in_coda=2, mean_recurrence=N_NO_GRAD + K_GRAD, mean_backprop_depth=K_GRAD, torch_dtype="float32")
    return original.RavenForCausalLM(config)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original-dir", type=pathlib.Path, required=True,
                        help="folder with raven_modeling_minimal.py and raven_config_minimal.py")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--checkpoint-iterations", action="store_true",
                        help="the original's per-iteration activation checkpointing (off in the original's default)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.threads < 0:
        parser.error(f"--threads must be 0 (default) or positive, got {args.threads}")
    original = load_original(args.original_dir)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = bench_model(original).float().train()
    if args.checkpoint_iterations:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)

    def step():
        tokens = torch.randint(0, model.config.vocab_size, (BATCH, SEQ + 1), generator=generator)  # [4, 257]
        out = model(tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(), num_steps=(N_NO_GRAD, K_GRAD))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.item()

    step()  # warm up
    step_seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        step_seconds.append(time.perf_counter() - start)
    print(json.dumps({
        "bench": "original_train_step", "shape": "bench-small",
        "tokens_per_sec": round(args.steps * BATCH * SEQ / sum(step_seconds), 1),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "checkpoint_iterations": args.checkpoint_iterations,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "step_seconds": [round(s, 3) for s in step_seconds],
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }))


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the project, not installed here
    from recurrent_depth.runtime.host_memory import use_huge_pages

    use_huge_pages()
    main()
