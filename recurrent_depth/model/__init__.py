"""The model: its config, the Huginn layers and attention, the recurrent-depth Linen module, and FLOP counts."""

from etils import epy

with epy.lazy_api_imports(globals()):
    from recurrent_depth.model.config import ModelConfig
    from recurrent_depth.model.lm import HiddenStates, ModelOutput, RecurrentDepthLM, init_params
