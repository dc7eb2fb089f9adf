"""Training entry point: `python train.py --config=configs/tiny.py --workdir=DIR [--config.field=value ...]`.

Only the configuration and model construction are wired so far; the training loop arrives with the training issue.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from recurrent_depth.config import ModelConfig

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")


def main(argv):
    del argv
    model_config = ModelConfig.from_dict(_CONFIG.value.model)
    print(model_config)
    sys.exit("train.py: the training loop is not implemented yet (see the training issue).")


if __name__ == "__main__":
    app.run(main)
