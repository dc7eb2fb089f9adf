"""Decoding with bfloat16 weights on CPU holds the weights once: XLA:CPU computes bfloat16 products in float32, and
without `model.layers.use_late` it kept a float32 copy of every weight for the whole decoding loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from recurrent_depth.decoding.generate import lower_generate
from recurrent_depth.model.config import ModelConfig
from recurrent_depth.model.lm import RecurrentDepthLM, init_params

CONFIG = ModelConfig(vocab_size=4096, hidden_size=256, num_heads=4, intermediate_size=1024, max_seq_len=64,
                     mean_recurrence=4, mean_backprop_depth=2, dtype="bfloat16", param_dtype="bfloat16")


def test_generate_converts_one_weight_at_a_time():
    model = RecurrentDepthLM(CONFIG)
    params = jax.eval_shape(lambda key: nn.meta.unbox(init_params(model, key)), jax.random.key(0))
    leaves = jax.tree.leaves(params)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in leaves)
    largest = max(4 * leaf.size for leaf in leaves)  # the largest weight in float32: the tied head's table
    every = sum(4 * leaf.size for leaf in leaves)  # float32 copies of them all
    compiled = lower_generate(model, params, 1, 8, max_new_tokens=4, num_steps=4).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < largest + every // 8, f"workspace {temp} B: float32 weight copies (largest {largest}, all {every})"
