"""recurrent-depth: Huginn-style recurrent-depth language models in JAX/Flax."""

from recurrent_depth.config import ConfigError, ModelConfig
from recurrent_depth.model import ModelOutput, RecurrentDepthLM, init_params

__all__ = ["ConfigError", "ModelConfig", "ModelOutput", "RecurrentDepthLM", "init_params"]
