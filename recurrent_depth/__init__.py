"""recurrent-depth: Huginn-style recurrent-depth language models in JAX/Flax.

The names below load on first use, so that `recurrent_depth.runtime.host_memory` can run before jax is imported.
"""

from etils import epy

with epy.lazy_api_imports(globals()):
    from recurrent_depth.checkpoint.huggingface import from_huggingface, to_huggingface
    from recurrent_depth.checkpoint.loading import load_model
    from recurrent_depth.decoding.generate import GenerateOutput, SpeculativeOutput, generate, speculative_generate
    from recurrent_depth.decoding.parallel import ParallelOutput, parallel_generate
    from recurrent_depth.errors import CheckpointError, ConfigError
    from recurrent_depth.model.config import ModelConfig
    from recurrent_depth.model.lm import ModelOutput, RecurrentDepthLM, init_params
