"""Training: `python train.py [--config=configs/demo.py] [--workdir=workdir] [--config.some.field=value ...]`.

With no flags it trains the demo (configs/demo.py: a small model on the built-in shell game, about 15 minutes on
two CPU cores) into ./workdir; `python eval.py` then evaluates it.  Exit status: 0, 1 for bad input (a one-line
message), 2 for usage errors (recurrent_depth.cli.app).
"""

import sys
from pathlib import Path

from absl import flags, logging
from ml_collections import config_flags

from recurrent_depth.cli import app
from recurrent_depth.runtime.host_memory import use_huge_pages

if __name__ == "__main__":
    use_huge_pages()  # re-executes (a plain `python train.py` only); first, before the config flag's file imports jax

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", str(Path(__file__).parent / "configs" / "demo.py"),
                                          "Path to an ml_collections config file.", flag_values=FLAGS,
                                          sys_argv=app.ARGV)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Directory for metrics, checkpoints and logs.", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> int:
    return app.run(_train, FLAGS, argv, doc=__doc__, prog="train.py")


def _train(args: list[str]) -> None:
    app.positional(args)
    logging.set_verbosity(logging.WARNING)  # Orbax and XLA are chatty at INFO
    from recurrent_depth.training.loop import train  # the training stack loads only to train (not for --help)

    train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    sys.exit(main())
