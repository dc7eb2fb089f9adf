"""Training: the run config and its validation, losses, optimizers, the depth sampler, the sharded step, the loop
behind train.py, and its telemetry."""

from etils import epy

with epy.lazy_api_imports(globals()):
    from recurrent_depth.training.config import base_config
    from recurrent_depth.training.loop import train
    from recurrent_depth.training.step import Trainer, TrainState
    from recurrent_depth.training.validation import validate_run_config
