"""Training: `python train.py --config=configs/tiny.py --workdir=DIR [--config.some.field=value ...]`."""

from absl import app, flags, logging
from ml_collections import config_flags

from recurrent_depth.train_loop import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Directory for metrics, checkpoints and logs.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax and XLA are chatty at INFO
    train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
