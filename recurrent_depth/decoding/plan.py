"""What one compiled generation is specialised on (`Plan`), the per-row settings it is not specialised on
(`RowSettings`, traced arrays), and the checks of every input before it compiles."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from recurrent_depth.decoding.exit_criteria import CriterionSet, ExitCriterion, criterion_id
from recurrent_depth.decoding.kv_cache import CacheStrategy
from recurrent_depth.decoding.sampling import Sampler, SamplingRows
from recurrent_depth.model.lm import RecurrentDepthLM


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static settings of one compiled generation."""

    max_new_tokens: int
    cache_steps: int  # iterations per token the cache has room for (the num_steps argument may be lower)
    init_scale: float
    sampler: Sampler
    strategy: CacheStrategy
    left_padded: bool
    continuous: bool = False
    criterion: ExitCriterion = ExitCriterion()
    min_steps: int = 0
    check_every: int = 1
    return_logits: bool = False
    stream: Callable | None = None  # host function called after every decoding step (see `emit`)
    # True: every row brings its own settings (`RowSettings`), so every criterion, sampling filter, continuous
    # thinking and random initial state compile in (the serving engine's programs); the scalars above are then
    # unused.  False: they are every row's setting, and what they leave out compiles to nothing.
    per_row: bool = False

    @property
    def criteria(self) -> CriterionSet | None:
        """The exit criteria the program evaluates; None: fixed depth only."""
        if self.per_row:
            return CriterionSet()
        return None if self.criterion.name is None else CriterionSet((self.criterion.name,))

    @property
    def sample_like(self) -> Sampler | None:
        """The Sampler every row follows (see SamplingRows.__call__); None: any mix."""
        return None if self.per_row else self.sampler

    @property
    def may_continue(self) -> bool:
        return self.per_row or self.continuous

    @property
    def random_init(self) -> bool:
        return self.per_row or self.init_scale != 0

    def rows(self, batch: int, num_steps) -> RowSettings:
        """This plan's scalars as every row's settings (numpy arrays; num_steps may be traced)."""
        full = lambda value, dtype: np.full((batch,), value, dtype)  # noqa: E731
        steps = (full(num_steps, np.int32) if isinstance(num_steps, (int, np.integer))
                 else jnp.broadcast_to(jnp.asarray(num_steps, jnp.int32), (batch,)))
        return RowSettings(num_steps=steps, criterion=full(criterion_id(self.criterion.name), np.int32),
                           threshold=full(self.criterion.threshold, np.float32),
                           min_steps=full(self.min_steps, np.int32), check_every=full(self.check_every, np.int32),
                           continuous=full(self.continuous, bool), init_scale=full(self.init_scale, np.float32),
                           sampling=self.sampler.rows(batch))


@flax.struct.dataclass
class RowSettings:
    """Each row's settings as arrays [batch]: traced, so that one compilation serves every mix (`generate` gives
    every row its scalars, the serving engine each slot its request's)."""

    num_steps: jax.Array  # int32 iterations per token (with an exit criterion the most); <= Plan.cache_steps
    criterion: jax.Array  # int32 exit criterion as exit_criteria.criterion_id (0: fixed depth)
    threshold: jax.Array  # float32 its threshold
    min_steps: jax.Array  # int32 the criterion is first checked after iteration min_steps + 1,
    check_every: jax.Array  # int32 then every check_every iterations
    continuous: jax.Array  # bool: a token's iterations start from the previous token's final state
    init_scale: jax.Array  # float32 scale of the random initial state (0: zeros)
    sampling: SamplingRows


def prompt_arrays(model: RecurrentDepthLM, prompts, lengths, padding_side: str, max_new_tokens: int):
    """Checks the prompts; returns (ids [batch, prompt_len] int32 padded on padding_side, lengths [batch],
    max_new_tokens as an int)."""
    cfg = model.config
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
    if isinstance(prompts, (list, tuple)):
        if lengths is not None:
            raise ValueError("lengths is only for prompts given as one padded array")
        if not prompts:
            raise ValueError("prompts is empty")
        rows = [np.asarray(p).reshape(-1) for p in prompts]
        if any(len(row) and not np.issubdtype(row.dtype, np.integer) for row in rows):
            raise ValueError("prompts must hold integer token ids")
        lengths = np.asarray([len(r) for r in rows], np.int64)
        ids = np.zeros((len(rows), max(1, int(lengths.max()))), np.int64)
        for i, row in enumerate(rows):
            if padding_side == "left":
                ids[i, ids.shape[1] - len(row):] = row
            else:
                ids[i, :len(row)] = row
    else:
        ids = np.asarray(prompts)
        if ids.ndim != 2:
            raise ValueError(f"prompts must be a list of token-id sequences or a [batch, length] array, "
                             f"got shape {ids.shape}")
        lengths = np.full(ids.shape[:1], ids.shape[1]) if lengths is None else np.asarray(lengths).reshape(-1)
        if lengths.shape != ids.shape[:1] or np.any(lengths > ids.shape[1]):
            raise ValueError(f"lengths must give one length <= {ids.shape[1]} per prompt, got {lengths}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"prompts must hold integer token ids, got dtype {ids.dtype}")
    if np.any(lengths < 1):
        raise ValueError(f"every prompt needs at least one token; prompt(s) {np.flatnonzero(lengths < 1).tolist()} "
                         f"are empty")
    if int(lengths.max()) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt length {int(lengths.max())} + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's context (max_seq_len={cfg.max_seq_len})")
    idx = np.arange(ids.shape[1])[None, :]
    real = idx >= ids.shape[1] - lengths[:, None] if padding_side == "left" else idx < lengths[:, None]
    bad = real & ((ids < 0) | (ids >= cfg.vocab_size))
    if np.any(bad):
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got {ids[bad].tolist()[:5]}")
    return jnp.asarray(np.where(real, ids, 0), jnp.int32), jnp.asarray(lengths, jnp.int32), max_new_tokens


def stop_array(model: RecurrentDepthLM, stop_tokens) -> jax.Array:
    """Stop tokens as an int32 array padded with -1 to a multiple of 8 (so that their number rarely recompiles;
    -1 only ever meets the -1 of rows that have already finished)."""
    stop_tokens = [int(t) for t in stop_tokens]
    if any(not 0 <= t < model.config.vocab_size for t in stop_tokens):
        raise ValueError(f"stop tokens must lie in [0, {model.config.vocab_size}), got {stop_tokens}")
    return jnp.asarray(stop_tokens + [-1] * (max(8, -(-len(stop_tokens) // 8) * 8) - len(stop_tokens)), jnp.int32)


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def make_plan(model: RecurrentDepthLM, max_new_tokens: int, num_steps, max_steps, init_scale, sampler, cache_strategy,
          padding_side, **rest) -> tuple[Plan, jax.Array]:
    """Checks the settings shared by both generation functions; returns the static part of their compilation
    and num_steps for a traced argument."""
    cfg = model.config
    num_steps = positive_int("num_steps", cfg.mean_recurrence if num_steps is None else num_steps)
    max_steps = num_steps if max_steps is None else positive_int("max_steps", max_steps)
    if num_steps > max_steps:
        raise ValueError(f"num_steps ({num_steps}) exceeds max_steps ({max_steps})")
    init_scale = float(cfg.init_scale if init_scale is None else init_scale)
    if init_scale < 0:
        raise ValueError(f"init_scale must be >= 0, got {init_scale}")
    plan = Plan(max_new_tokens=max_new_tokens, cache_steps=max_steps, init_scale=init_scale, sampler=sampler,
                 strategy=CacheStrategy.parse(cache_strategy), left_padded=padding_side == "left", **rest)
    return plan, np.int32(num_steps)  # numpy, not jax: a traced argument placed by jit, on any platform
