"""An OpenAI-compatible server for a checkpoint, with a playground page at `/`:

  python -m recurrent_depth.cli.serve --checkpoint=DIR [--port=8000] [--host=127.0.0.1] [--slots=8] \\
      [--max_len=N] [--max_steps=N] [--mesh=1,-1,1] [--dtype=bfloat16] [--cache_strategy=S] [--max_queue=64] \\
      [--model_name=NAME] [--tokenizer=PATH]

DIR is a Hugging Face checkpoint directory (e.g. huginn-0125, its tokenizer.json is used), a parameter checkpoint or
a train.py workdir (the tokenizer its run config names), as for eval.py; parameters load in the checkpoint's own
dtype unless --dtype says otherwise, sharded over the (data, fsdp, tensor) --mesh.  A checkpoint without a
tokenizer serves token-id prompts only.  The server listens at once; /health answers 503 until the engine has
compiled (warm-up), then 200.  Endpoints: POST /v1/completions, POST /v1/chat/completions (streaming or not),
GET /v1/models, /health, /metrics, and the playground at /.  Ctrl-C stops it.  Exit status: 0, 1 for bad input (a
one-line message), 2 for usage errors.
"""

from __future__ import annotations

import sys

from absl import flags

from recurrent_depth.checkpoint.loading import checkpoint_run_config, find_tokenizer, load_model
from recurrent_depth.checkpoint.params import param_shardings
from recurrent_depth.cli import app
from recurrent_depth.evaluation.runner import DEFAULT_MESH, parse_mesh
from recurrent_depth.runtime import sharding
from recurrent_depth.runtime.paths import as_path
from recurrent_depth.serving.app import create_app, listen, serve
from recurrent_depth.serving.engine import Engine

PROG = "python -m recurrent_depth.cli.serve"
FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", None, "HF checkpoint directory, parameter checkpoint or train.py workdir",
                    flag_values=FLAGS)
flags.DEFINE_string("tokenizer", None, "SentencePiece .model or tokenizer.json (default: the checkpoint's; none "
                    "found: token-id prompts only)", flag_values=FLAGS)
flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every interface)", flag_values=FLAGS)
flags.DEFINE_integer("port", 8000, "port to listen on (0: a free one)", lower_bound=0, upper_bound=65535,
                     flag_values=FLAGS)
flags.DEFINE_integer("slots", 8, "requests generating at once (each slot holds a KV cache of --max_len tokens; "
                     "rounded up to a multiple of the mesh's data x fsdp devices)", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("max_len", None, "tokens per slot, prompt and completion (default: the model's context)",
                     lower_bound=2, flag_values=FLAGS)
flags.DEFINE_integer("max_steps", None, "the most core iterations a request may ask per token (num_steps); the "
                     "cache and the decode step are sized for it (default: the engine's)", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_string("mesh", ",".join(map(str, DEFAULT_MESH)), "mesh (data, fsdp, tensor); -1 is the rest of the "
                    "devices", flag_values=FLAGS)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "parameter and compute dtype (default: the "
                  "checkpoint's own; a Hugging Face config.json's torch_dtype, bfloat16 for huginn-0125)",
                  flag_values=FLAGS)
flags.DEFINE_string("cache_strategy", None, "KV cache strategy (default: the engine's, latest-compress-4: the "
                    "memory of 4 core-layer entries per position whatever the depth)", flag_values=FLAGS)
flags.DEFINE_integer("admit_batch", 4, "waiting requests prefilled together (one admit between two decode steps; "
                     "each prefill length compiles one admit of 1 and one of admit_batch)", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_list("spans", None, "attention spans of the decode programs, ending at --max_len: each decode step "
                  "reads the smallest that holds its requests, one compiled program per span (default: --max_len and "
                  "its halvings down to an eighth)", flag_values=FLAGS)
flags.DEFINE_integer("max_queue", 64, "requests waiting for a slot before the server answers 429", lower_bound=0,
                     flag_values=FLAGS)
flags.DEFINE_string("model_name", None, "the model's name in the API (default: the checkpoint directory's name)",
                    flag_values=FLAGS)
flags.DEFINE_enum("log_level", "info", ["critical", "error", "warning", "info", "debug"], "uvicorn's log level",
                  flag_values=FLAGS)
flags.mark_flag_as_required("checkpoint", flag_values=FLAGS)


def load(args: flags.FlagValues):
    """(engine not yet started, tokenizer or None, model name) of the flags; ValueError/FileNotFoundError for bad
    input."""
    checkpoint = as_path(args.checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    run_config = checkpoint_run_config(checkpoint, None)
    try:
        tokenizer = find_tokenizer(checkpoint, args.tokenizer, run_config)
    except FileNotFoundError:
        if args.tokenizer:
            raise
        tokenizer = None  # token-id prompts only
    mesh = sharding.make_mesh(parse_mesh(args.mesh))
    has_rules = run_config is not None and run_config.get("mesh") is not None
    rules = sharding.rules_from_config(run_config.mesh.rules) if has_rules else sharding.DEFAULT_RULES
    model, params = load_model(checkpoint, dtype=args.dtype, shardings=param_shardings(mesh, rules))
    options = {} if args.cache_strategy is None else {"cache_strategy": args.cache_strategy}
    if args.spans is not None:
        try:
            options["spans"] = [int(span) for span in args.spans]
        except ValueError:
            raise ValueError(f"--spans must be a comma-separated list of lengths, got {','.join(args.spans)}") from None
    engine = Engine(model, params, slots=args.slots, max_len=args.max_len, max_steps=args.max_steps,
                    max_queue=args.max_queue, mesh=mesh, rules=rules, admit_batch=args.admit_batch, **options)
    name = args.model_name or checkpoint.name or str(checkpoint)
    return engine, tokenizer, name


def main(argv: list[str] | None = None) -> int:
    return app.run(_serve, FLAGS, argv, doc=__doc__, prog=PROG)


def _serve(args: list[str]) -> int:
    app.positional(args)
    try:  # before the (slow) model load: a taken port fails at once
        sock = listen(FLAGS.host, FLAGS.port)
    except OSError as err:
        raise ValueError(f"cannot listen on {FLAGS.host}:{FLAGS.port}: {err.strerror or err}") from None
    with sock:
        engine, tokenizer, name = load(FLAGS)
        host, port = sock.getsockname()[:2]
        what = "text and token-id prompts" if tokenizer is not None else "token-id prompts only (no tokenizer)"
        print(f"serving {name!r} ({what}) on http://{host}:{port} with {engine.slots} slots of {engine.max_len} "
              f"tokens, at most {engine.max_steps} iterations per token; /health is 503 until the warm-up "
              "compilation is done", flush=True)
        serve(create_app(engine, tokenizer=tokenizer, model_name=name, warm_up=True, stop_engine=True), sock,
              log_level=FLAGS.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
