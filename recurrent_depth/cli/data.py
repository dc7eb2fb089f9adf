"""Building a row store (pre-packed rows of seq_len + 1 tokens, recurrent_depth.data.prepare) from text/JSONL:

  python -m recurrent_depth.cli.data prepare --input='corpus/*.jsonl' --tokenizer=tok.model --output=store/ \\
      --seq_len=1024 [--shards=N] [--text_field=text] [--kind=jsonl] [--workers=N] [--num_processes=P --process_id=p]

--input is comma-separated, each a file or a glob pattern (quoted, so that the shell leaves it alone); --output is
local or gs://.  A rerun after a kill writes only the unfinished shards.  Several machines share the work with
--num_processes/--process_id (or jax.distributed, if the calling program initialized it); the one that finishes
last writes index.json.
"""

from __future__ import annotations

import sys

from absl import flags

from recurrent_depth.cli import app
from recurrent_depth.data.prepare import INPUT_KINDS, prepare
from recurrent_depth.data.tokenizer import load_tokenizer

PROG = "python -m recurrent_depth.cli.data"
FLAGS = flags.FlagValues()
flags.DEFINE_list("input", None, "text/JSONL files or glob patterns, comma-separated", flag_values=FLAGS)
flags.DEFINE_string("tokenizer", None, "a SentencePiece .model or a tokenizer.json", flag_values=FLAGS)
flags.DEFINE_string("output", None, "directory for the store (local or gs://)", flag_values=FLAGS)
flags.DEFINE_integer("seq_len", None, "the run's sequence length (rows hold seq_len + 1 tokens)", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("shards", None, "number of shards (default: one per 128 MiB of input)", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_string("text_field", "text", "the JSONL records' text field", flag_values=FLAGS)
flags.DEFINE_enum("kind", None, INPUT_KINDS, "the input files' kind (default: .jsonl/.json are JSONL, the rest text)",
                  flag_values=FLAGS)
flags.DEFINE_integer("workers", None, "worker processes (default: one per CPU)", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("num_processes", 1, "processes sharing the work (machines)", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("process_id", 0, "this process's index in [0, num_processes)", lower_bound=0, flag_values=FLAGS)
flags.mark_flags_as_required(["input", "tokenizer", "output", "seq_len"], flag_values=FLAGS)
flags.register_multi_flags_validator(["num_processes", "process_id"], lambda f: f["process_id"] < f["num_processes"],
                                     "--process_id must be below --num_processes", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> int:
    return app.run(_data, FLAGS, argv, doc=__doc__, prog=PROG)


def _data(args: list[str]) -> int:
    app.positional(args, commands=("prepare",))
    kind = "huggingface" if FLAGS.tokenizer.endswith(".json") else "sentencepiece"
    try:
        tokenizer = load_tokenizer(kind, FLAGS.tokenizer)
    except app.BAD_INPUT:
        raise
    except Exception as err:  # SentencePiece raises RuntimeError on a bad model, `tokenizers` a bare Exception
        raise ValueError(f"--tokenizer={FLAGS.tokenizer} is not a {kind} tokenizer ({err})") from None
    index, count = FLAGS.process_id, FLAGS.num_processes
    jax = sys.modules.get("jax")  # jax.distributed can only be initialized where jax is imported already
    if jax is not None and jax.distributed.is_initialized() and not (FLAGS["num_processes"].present
                                                                      or FLAGS["process_id"].present):
        index, count = jax.process_index(), jax.process_count()
    store = prepare(FLAGS.input, tokenizer, FLAGS.output, seq_len=FLAGS.seq_len, num_shards=FLAGS.shards,
                    kind=FLAGS.kind, text_field=FLAGS.text_field, process_index=index, process_count=count,
                    workers=FLAGS.workers)
    if store is None:
        print(f"process {index} of {count} wrote its shards to {FLAGS.output}; index.json waits for the others")
    else:
        print(f"wrote {store.rows} rows of {FLAGS.seq_len + 1} tokens ({sum(s['documents'] for s in store.shards)} "
              f"documents, {sum(s['tokens'] for s in store.shards)} tokens) in {len(store.shards)} shard(s) to "
              f"{FLAGS.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
