"""Evaluation across test-time iteration counts: `python eval.py [--checkpoint=DIR] [--tasks=...]`.

With no flags it evaluates the workdir that `python train.py` wrote (the demo: held-out shell-game problems at
1-32 iterations and with adaptive exit) and writes eval_results/.

DIR is a train.py workdir (its newest checkpoint), a parameter checkpoint or a Hugging Face checkpoint directory
(e.g. huginn-0125, whose tokenizer.json is found there).  Every task is evaluated at every `--num_steps` count and,
with `--exit_criterion`, once more under adaptive exit (at most `--max_exit_steps` iterations, default the largest
count).  Prints a table and writes to `--output`: results.json (one entry per setting), samples/ (per example)
and plots/ (one PNG per task and metric against iterations, log-2 axis).

Tasks (`--tasks`, comma-separated), each `KIND:TARGET[:KEY=VALUE...]`:
  ppl:FILE   perplexity of a .txt file (one document) or .jsonl (`text` of each record): loss, perplexity,
             bits_per_byte.  Options: field=text, limit=N.
  mc:FILE    multiple choice, JSONL in ARC, HellaSwag, PIQA, SciQ, OpenBookQA, WinoGrande or MMLU format (detected
             from the fields) or generic {context, choices, gold}: acc, acc_norm (as lm-eval).
             Options: format=NAME, limit=N.
  gen:FILE   {question, answer} JSONL (GSM8K's format), greedy generation, exact match of the strict (`#### N`)
             and flexible (last number) extractions.  Options: k=SHOTS, fewshot=FILE (else the first k records
             are the examples), chat=true (huginn-0125's chat template, examples as turns), system=TEXT,
             max_new_tokens=256, limit=N.
  shell:MIN-MAX  held-out problems of the demo's shell game (recurrent_depth.data.shell_game) with MIN..MAX
             swaps: acc.  Options: size=512, seed=0, chat=true (the chat variant's prompt, configs/sft_demo.py).
  rg:NAME    a reasoning-gym dataset (basic_arithmetic, gsm_symbolic, ...) generated offline with seed and size,
             scored by its own checker.  Options: size=100, seed=0, k, chat, system, max_new_tokens=64, and any
             dataset setting (e.g. max_terms=3).
Every task takes name=LABEL.  Example (the paper's GSM8K protocol with system prompt, at five depths):

  python eval.py --checkpoint=huginn-0125 --num_steps=1,4,8,16,32 --chat_template \
    --system_prompt="You are a helpful assistant that can assist users with mathematical reasoning." \
    --tasks=gen:gsm8k_test.jsonl:k=8:fewshot=gsm8k_train.jsonl,mc:arc_easy.jsonl,rg:basic_arithmetic
"""

import sys

import ml_collections
from absl import flags, logging

from recurrent_depth.cli import app
from recurrent_depth.runtime.host_memory import use_huge_pages

FLAGS = flags.FlagValues()
_CHECKPOINT = flags.DEFINE_string("checkpoint", "workdir", "train.py workdir, parameter checkpoint or Hugging Face "
                                  "checkpoint directory.", flag_values=FLAGS)
_TASKS = flags.DEFINE_list("tasks", None, "Tasks, KIND:TARGET[:KEY=VALUE...] each (see the module docstring; "
                           "default: the run config's eval.tasks).", flag_values=FLAGS)
_NUM_STEPS = flags.DEFINE_list("num_steps", None, "Iteration counts (default: the config's eval.num_steps, "
                               "else 1,4,8,16,32).", flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", "eval_results", "Directory for results.json, samples/ and plots/.",
                              flag_values=FLAGS)
_CONFIG = flags.DEFINE_string("config", None, "Config file the checkpoint must match (also: tokenizer, sharding "
                              "rules, default iteration counts).", flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece .model or tokenizer.json (default: the "
                                 "checkpoint's tokenizer.json or the config's data.tokenizer).", flag_values=FLAGS)
_EXIT_CRITERION = flags.DEFINE_enum("exit_criterion", None, ["entropy-diff", "latent-diff", "kl", "minp-kl",
                                                             "argmax-stability", "cosine", "none"],
                                    "Also evaluate with adaptive per-token exit by this criterion (default: the "
                                    "run config's eval.exit_criterion; none: fixed counts only).", flag_values=FLAGS)
_EXIT_THRESHOLD = flags.DEFINE_float("exit_threshold", None, "Exit threshold (default: the criterion's).",
                                     flag_values=FLAGS)
_MAX_EXIT_STEPS = flags.DEFINE_integer("max_exit_steps", None, "Most iterations under adaptive exit (default: the "
                                       "largest --num_steps).", flag_values=FLAGS)
_MESH = flags.DEFINE_string("mesh", "1,-1,1", "Mesh (data, fsdp, tensor); -1 is the rest of the devices.",
                            flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Sequences per batch, rounded up to the batch shards "
                                   "(default: the run config's eval.batch_size, else 8).", flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Parameter and compute dtype "
                           "(default: the checkpoint's own; a Hugging Face config.json's torch_dtype, bfloat16 for "
                           "huginn-0125).", flag_values=FLAGS)
_INIT_SCALE = flags.DEFINE_float("init_scale", 0.0, "Scale of the random initial state (0: zero state).",
                                 flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initial state when init_scale > 0.", flag_values=FLAGS)
_CHAT_TEMPLATE = flags.DEFINE_bool("chat_template", False, "Prompt generative tasks in the chat template.",
                                   flag_values=FLAGS)
_SYSTEM_PROMPT = flags.DEFINE_string("system_prompt", None, "System prompt for generative tasks.", flag_values=FLAGS)
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Start jax.distributed by auto-detection (TPU pods, SLURM); "
                               "JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID also start it.",
                               flag_values=FLAGS)


def main(argv: list[str] | None = None) -> int:
    return app.run(_evaluate, FLAGS, argv, doc=__doc__, prog="eval.py")


def _evaluate(args: list[str]) -> None:
    app.positional(args)
    logging.set_verbosity(logging.WARNING)
    from recurrent_depth.evaluation import evaluate_checkpoint  # jax loads here, after use_huge_pages
    from recurrent_depth.runtime.distributed import initialize_distributed

    initialize_distributed(ml_collections.ConfigDict({"coordinator_address": None, "num_processes": None,
                                                      "process_id": None, "auto": _MULTIHOST.value}))
    # Bad input (FileNotFoundError, ValueError, ImportError) is `eval.py: error: ...` with status 1.
    num_steps = None if _NUM_STEPS.value is None else [int(r) for r in _NUM_STEPS.value]
    evaluate_checkpoint(_CHECKPOINT.value, _TASKS.value, num_steps=num_steps, output=_OUTPUT.value,
                        config=_CONFIG.value, tokenizer=_TOKENIZER.value, mesh=_MESH.value,
                        batch_size=_BATCH_SIZE.value, dtype=_DTYPE.value, init_scale=_INIT_SCALE.value,
                        seed=_SEED.value, exit_criterion=_EXIT_CRITERION.value,
                        exit_threshold=_EXIT_THRESHOLD.value, max_exit_steps=_MAX_EXIT_STEPS.value,
                        chat_template=_CHAT_TEMPLATE.value, system_prompt=_SYSTEM_PROMPT.value)


if __name__ == "__main__":
    use_huge_pages()
    sys.exit(main())
