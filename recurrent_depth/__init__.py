"""recurrent-depth: Huginn-style recurrent-depth language models in JAX/Flax."""

from recurrent_depth.config import ConfigError, ModelConfig
from recurrent_depth.decoding import GenerateOutput, SpeculativeOutput, generate, speculative_generate
from recurrent_depth.model import ModelOutput, RecurrentDepthLM, init_params
from recurrent_depth.parallel_decoding import ParallelOutput, parallel_generate

__all__ = ["ConfigError", "GenerateOutput", "ModelConfig", "ModelOutput", "ParallelOutput", "RecurrentDepthLM",
           "SpeculativeOutput", "generate", "init_params", "parallel_generate", "speculative_generate"]
