"""recurrent-depth: Huginn-style recurrent-depth language models in JAX/Flax.

The public names load on first use (PEP 562), so that `recurrent_depth.host_memory` can run before jax is imported.
"""

import importlib

_EXPORTS = {
    "ConfigError": "config", "ModelConfig": "config",
    "GenerateOutput": "decoding", "SpeculativeOutput": "decoding", "generate": "decoding",
    "speculative_generate": "decoding",
    "ModelOutput": "model", "RecurrentDepthLM": "model", "init_params": "model",
    "ParallelOutput": "parallel_decoding", "parallel_generate": "parallel_decoding",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'recurrent_depth' has no attribute {name!r}")
    return getattr(importlib.import_module(f"recurrent_depth.{_EXPORTS[name]}"), name)


def __dir__():
    return sorted(list(globals()) + __all__)
