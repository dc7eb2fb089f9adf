"""Training: `python train.py [--config=configs/demo.py] [--workdir=workdir] [--config.some.field=value ...]`.

With no flags it trains the demo (configs/demo.py: a small model on the built-in shell game, about 15 minutes on
two CPU cores) into ./workdir; `python eval.py` then evaluates it.
"""

from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from recurrent_depth.runtime.host_memory import use_huge_pages

_CONFIG = config_flags.DEFINE_config_file("config", str(Path(__file__).parent / "configs" / "demo.py"),
                                          "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Directory for metrics, checkpoints and logs.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax and XLA are chatty at INFO
    from recurrent_depth.training.loop import train  # jax loads here, after use_huge_pages

    train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    use_huge_pages()
    app.run(main)
