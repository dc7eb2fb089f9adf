"""recurrent-depth: Huginn-style recurrent-depth language models in JAX/Flax."""

from recurrent_depth.config import ConfigError, ModelConfig
from recurrent_depth.decoding import GenerateOutput, SpeculativeOutput, generate, speculative_generate
from recurrent_depth.model import ModelOutput, RecurrentDepthLM, init_params

__all__ = ["ConfigError", "GenerateOutput", "ModelConfig", "ModelOutput", "RecurrentDepthLM", "SpeculativeOutput",
           "generate", "init_params", "speculative_generate"]
