"""Model configuration: a frozen, validated dataclass built from an ml_collections ConfigDict."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from recurrent_depth.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("xla", "cudnn", "splash")
# What a gradient iteration keeps for its backward pass (model.remat_policy), as a jax.checkpoint policy:
# nothing: recompute the whole iteration (the original's per-iteration checkpointing, least memory);
# dots: keep matmul outputs without batch dimensions; names: keep the named attention and MLP outputs;
# matmuls: keep every matmul output (the attention's too) and recompute only elementwise ops: no matmul FLOPs
# repeated, and on CPU the fastest (fewer, smaller saved buffers than everything);
# everything: no rematerialisation (most memory, least compute; no policy).
REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "names": jax.checkpoint_policies.save_only_these_names("attention", "mlp_hidden"),
    "matmuls": jax.checkpoint_policies.dots_saveable,
    "everything": None,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every architectural field of a Huginn-style recurrent-depth model.

    Names follow common JAX usage; the Hugging Face names of the original are in
    `recurrent_depth.checkpoint.huggingface`. Defaults are the released huginn-0125 shape.
    """

    vocab_size: int = 65536  # rows of the embedding (the original's padded vocab)
    hidden_size: int = 5280  # n_embd
    num_heads: int = 55
    head_dim: int | None = None  # None: hidden_size // num_heads (the original requires this)
    intermediate_size: int = 17920  # MLP inner size; the fused gate/up projection is twice this
    num_prelude_layers: int = 2
    num_core_layers: int = 4  # layers in the recurrent block
    num_coda_layers: int = 2
    max_seq_len: int = 4096  # block_size: RoPE positions >= this are not supported
    rope_base: float = 50000.0
    norm_eps: float = 1e-6
    qk_bias: bool = True
    tie_embeddings: bool = True
    mean_recurrence: int = 32  # default test-time iterations
    mean_backprop_depth: int = 8  # iterations with gradient in training (truncated backprop)
    state_init_std: float | None = None  # None: sqrt(2 / (5 hidden)), the 'takase' std
    init_scale: float = 1.0  # multiplies the state-init std; 0 gives a deterministic zero state
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # storage dtype of parameters
    attention_impl: str = "xla"  # xla (any platform), cudnn (NVIDIA GPU), splash (TPU Pallas kernel)
    remat_policy: str = "nothing"  # what a gradient iteration keeps for the backward pass; see REMAT_POLICIES

    def __post_init__(self):
        self.validate()

    # ---- derived quantities -------------------------------------------------
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def num_layers(self) -> int:
        """Physical blocks (prelude + core + coda)."""
        return self.num_prelude_layers + self.num_core_layers + self.num_coda_layers

    @property
    def effective_depth(self) -> int:
        """Expected unrolled depth, used by the 'takase' init of output projections."""
        return self.num_prelude_layers + self.num_core_layers * self.mean_recurrence + self.num_coda_layers

    @property
    def init_std(self) -> float:
        return math.sqrt(2.0 / (5.0 * self.hidden_size))

    @property
    def out_proj_std(self) -> float:
        return math.sqrt(1.0 / (5.0 * self.hidden_size * self.effective_depth))

    @property
    def resolved_state_init_std(self) -> float:
        return self.state_init_std if self.state_init_std is not None else self.init_std

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def stream_dtype(self):
        """Dtype of the residual stream, the norms' outputs and the recurrent state: the wider of the compute and
        parameter dtypes (float32 weights with bfloat16 compute keep a float32 stream, as torch autocast does)."""
        return jnp.promote_types(self.compute_dtype, self.weight_dtype).type

    # ---- validation ----------------------------------------------------------
    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_heads", "intermediate_size", "num_core_layers",
                    "max_seq_len", "mean_recurrence")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        for name in ("num_prelude_layers", "num_coda_layers", "mean_backprop_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"model.{name} must be a non-negative integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size ({self.hidden_size}) must be divisible by "
                              f"model.num_heads ({self.num_heads})")
        if self.head_dim is not None and self.head_dim != self.hidden_size // self.num_heads:
            raise ConfigError(f"model.head_dim must equal hidden_size // num_heads "
                              f"({self.hidden_size // self.num_heads}), got {self.head_dim}")
        if self.resolved_head_dim % 2:
            raise ConfigError(f"model.head_dim ({self.resolved_head_dim}) must be even for rotary embeddings")
        for name in ("rope_base", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive number, got {value!r}")
        if self.state_init_std is not None and not self.state_init_std > 0:
            raise ConfigError(f"model.state_init_std must be positive or None, got {self.state_init_std!r}")
        if not isinstance(self.init_scale, (int, float)) or self.init_scale < 0:
            raise ConfigError(f"model.init_scale must be a non-negative number, got {self.init_scale!r}")
        for name in ("qk_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model.{name} must be a bool, got {getattr(self, name)!r}")
        for name, valid in (("dtype", tuple(DTYPES)), ("param_dtype", tuple(DTYPES)),
                            ("attention_impl", ATTENTION_IMPLS), ("remat_policy", tuple(REMAT_POLICIES))):
            if getattr(self, name) not in valid:
                raise ConfigError(f"model.{name} must be one of {valid}, got {getattr(self, name)!r}")

    # ---- conversion --------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | ml_collections.ConfigDict) -> ModelConfig:
        """Builds a config from a mapping, rejecting unknown fields by name."""
        if isinstance(values, ml_collections.ConfigDict):
            values = values.to_dict()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def model_config_dict(**overrides) -> ml_collections.ConfigDict:
    """A ConfigDict with every ModelConfig field (defaults overridden), for `configs/*.py`."""
    values = ModelConfig().to_dict()
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise ConfigError(f"unknown model config field(s) {unknown}")
    values.update(overrides)
    # Optional fields become typed placeholders so that `--config.model.head_dim=96` works from the command line.
    for name, kind in (("head_dim", int), ("state_init_std", float)):
        values[name] = ml_collections.config_dict.placeholder(kind) if values[name] is None else values[name]
    return ml_collections.ConfigDict(values)
