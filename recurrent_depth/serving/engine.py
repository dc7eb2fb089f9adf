"""The serving engine: a fixed set of slots that decode together, requests joining and leaving between steps.

JetStream's prefill / insert / generate pattern, for a recurrent-depth model with per-request adaptive depth:

* Each slot owns rows of one KV cache (`decoding.kv_cache.KVCache`, batch = slots) and a latent state, and holds
  its request's settings as arrays (`decoding.plan.RowSettings`: iterations, exit criterion and threshold,
  min_steps, check_every, continuous thinking, init_scale, temperature / top-k / top-p / min-p) and its key.
* Waiting requests are prefilled together, up to `admit_batch` of them (their prompts right-padded to one of a
  few bucket lengths), and inserted into free slots in the same compiled program ("admit"; one program per bucket
  for one request and one for `admit_batch`, unused rows padding).  Between two decode steps the engine admits
  until its free slots or its queue run out.
* One compiled decode step advances every active slot by one token: the prelude, then the core block one iteration
  at a time while some slot still iterates (each slot exits by its own criterion or depth cap), then the coda for
  the slots that exit, then each slot samples with its own setting.  Since the settings are arrays, this one
  program (and the admit program of each bucket) serves every mix of requests: warm-up compiles them all, and
  nothing compiles afterwards.
* A step's cost is that of the slots it computes, busy or not, so it computes only a window of the leading slots
  (one, two, three or four quarters of them, the smallest that holds the busy ones: one program each); requests
  move down into the freed slots below to keep the busy ones leading.  On a mesh that shards the slots every step
  computes them all (a window would move rows between devices).  Likewise attention reads only the first `span`
  positions of each slot, the smallest of a few spans (max_len and its halvings) that holds the step's longest
  request: short requests in a long buffer do not pay for the whole of it.  One program per window and span.
* Randomness depends on the request only: its seed gives the key of `generate`'s row 0 (fold_in(key(seed), 0)),
  token n draws its initial state and its sample from split(fold_in(that key, n)), and the initial state's noise
  of a position depends on the key and the position only (not on padding or the other slots).  A request's
  output therefore equals `decoding.generate` on its prompt alone (same settings, max_steps and cache strategy).
* The loop runs in a background thread: drop cancelled requests (freeing their slots before the next step), admit,
  decode, hand each token to its request's callback, free finished slots.  A Python exception in the loop ends
  it: `error` says why, `ready` turns False and every pending request gets Done('error').

Sharded over a mesh like evaluation (`runtime.sharding`'s logical rules): parameters as in training (FSDP over
`embed`, tensor parallelism over heads / mlp / vocab), the slot dimension is the `batch` axis of the cache, the
latent state and the settings (data x fsdp), cache heads over `tensor`.  Data parallelism beyond one mesh is
several engine processes.

The default cache strategy is `latest-compress-4` (see `decoding.kv_cache`): a ring of 4 core-layer entries per
position (for huginn-0125's 4 core layers: each layer's entry from the position's last iteration; the paper's
"KV budget" of one recurrence, whose MT-Bench score matched the full cache), with `latest` filling the gaps of
tokens that exited early when the core has fewer layers.  Memory per position is then 4 + prelude + coda entries
whatever the depth, where `full` needs max_steps x core_layers core entries (130 at 32 iterations for
huginn-0125: about 91 GB for 8 slots of 4096 positions in bfloat16, against about 5.5 GB).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from recurrent_depth.decoding.exit_criteria import CRITERIA, DEFAULT_THRESHOLDS, criterion_id
from recurrent_depth.decoding.kv_cache import CacheStrategy, Chunk, KVCache, KVGroup
from recurrent_depth.decoding.passes import Runner, prefill, token_keys
from recurrent_depth.decoding.plan import Plan, RowSettings
from recurrent_depth.decoding.sampling import Sampler, SamplingRows
from recurrent_depth.model.lm import RecurrentDepthLM, init_params
from recurrent_depth.runtime import sharding
from recurrent_depth.serving.requests import DepthParams, Done, Event, QueueFull, Request, RequestError, Token

DEFAULT_CACHE_STRATEGY = "latest-compress-4"
MIN_BUCKET = 16  # the shortest prefill length; longer buckets double up to max_len

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    running: int  # requests in a slot
    waiting: int  # requests queued for a slot
    slots: int
    requests_done: int  # requests that got their Done (any reason)
    tokens: int  # Token events
    core_iterations: int  # the sum of Token.steps
    slot_iterations: int  # per decode step: its iterations (the deepest active slot's) x active slots
    exited_waiting: int  # the part of slot_iterations that slots which had exited spent waiting for the deepest
    compiles: int  # compilations since construction (all at warm-up; must not grow after start)
    moves: int  # requests moved to a lower slot, to keep the decode window small


@flax.struct.dataclass
class Slots:
    """The device state of every slot ([slots, ...] each): its cache rows, where it stands, its request's settings."""

    cache: KVCache
    pos: jax.Array  # int32 buffer index (and RoPE position) of the next input token
    token: jax.Array  # int32 the next input token: the last one generated
    latent: jax.Array  # [slots, 1, embed] the last token's final state (continuous thinking)
    index: jax.Array  # int32 number of the next token to generate (its keys)
    keys: jax.Array  # [slots, 2] uint32 key data of each request's key (generate's row 0)
    rows: RowSettings


class Handle:
    """A submitted request; `cancel` frees its slot before the next decode step (it then gets Done('cancelled'))."""

    def __init__(self, engine: Engine):
        self._engine, self.cancelled = engine, False

    def cancel(self) -> None:
        self.cancelled = True
        self._engine._notify()


@dataclasses.dataclass
class _Job:
    request: Request
    on_event: Callable[[Event], None]
    handle: Handle
    rows: RowSettings  # [1] each (numpy)
    key_data: np.ndarray  # [2] uint32
    stops: frozenset
    emitted: int = 0
    prompt_steps: int = 0
    slot: int | None = None


def _slot_axes(slots: Slots):
    """The logical axes of every leaf of Slots (the slot dimension is `batch`)."""
    group = lambda: KVGroup(k=(None, "batch", "act_heads", None, "length"),  # noqa: E731
                            v=(None, "batch", "act_heads", "length", None), valid=(None, "batch", "length"))
    per_slot = ("batch",)
    return Slots(cache=slots.cache.replace(prelude=group(), core=group(), coda=group()), pos=per_slot,
                 token=per_slot, latent=("batch", "length", "act_embed"), index=per_slot, keys=("batch", None),
                 rows=jax.tree.map(lambda _: per_slot, slots.rows))


class Engine:
    """Serves `Request`s with continuous batching over `slots` slots (see the module docstring).

    max_len: positions per slot, prompt and generated tokens together (None: config.max_seq_len).  max_steps: the
    most iterations a request may ask per token (None: config.mean_recurrence).  cache_strategy: see
    `decoding.kv_cache` (default `latest-compress-4`).  max_queue: waiting requests beyond which `submit` raises
    QueueFull.  mesh: a (data, fsdp, tensor) mesh (None: the first device); slots round up to a multiple of its
    batch shards.  rules: the logical sharding rules.  buckets: the prefill lengths (None: 16, 32, ... up to
    max_len).  admit_batch: requests prefilled together in one admit (capped at slots): a batched prefill costs far
    less per prompt than one at a time.  spans: the attention spans of the decode programs (None: max_len and its
    halvings down to an eighth, at least 16), each step reading the smallest that holds its slots' positions.
    """

    def __init__(self, model: RecurrentDepthLM, params, *, slots: int = 8, max_len: int | None = None,
                 max_steps: int | None = None, cache_strategy: str = DEFAULT_CACHE_STRATEGY, max_queue: int = 64,
                 mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES, buckets: Sequence[int] | None = None,
                 admit_batch: int = 4, spans: Sequence[int] | None = None):
        cfg = model.config
        self.model, self.config = model, cfg
        max_len = cfg.max_seq_len if max_len is None else max_len
        max_steps = cfg.mean_recurrence if max_steps is None else max_steps
        for name, value, low in (("slots", slots, 1), ("max_len", max_len, 2), ("max_steps", max_steps, 1),
                                 ("max_queue", max_queue, 0), ("admit_batch", admit_batch, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len ({max_len}) exceeds the model's context (max_seq_len={cfg.max_seq_len})")
        self.mesh = mesh if mesh is not None else sharding.make_mesh((1, 1, 1), jax.devices()[:1])
        self.rules = tuple(rules)
        batch_axes = sharding.batch_sharding(self.mesh, self.rules).spec[0]
        batch_axes = () if batch_axes is None else (batch_axes,) if isinstance(batch_axes, str) else batch_axes
        shards = math.prod(self.mesh.shape[a] for a in batch_axes)
        self.slots = -(-int(slots) // shards) * shards
        self.max_len, self.max_steps, self.max_queue = int(max_len), int(max_steps), int(max_queue)
        self.admit_batch = min(int(admit_batch), self.slots)
        # decode windows (see the module docstring): quarters of the slots, unless the mesh shards them
        quarter = -(-self.slots // 4)
        windows = {*range(quarter, self.slots, quarter), self.slots}
        self._windows = (self.slots,) if shards > 1 else tuple(sorted(windows))
        self.cache_strategy = cache_strategy
        if buckets is None:
            buckets = [b for b in (MIN_BUCKET << i for i in range(32)) if b < max_len] + [max_len]
        self.buckets = tuple(sorted({int(b) for b in buckets}))
        if not self.buckets or self.buckets[0] < 1 or self.buckets[-1] != self.max_len:
            raise ValueError(f"buckets must be positive lengths, the longest max_len ({max_len}), got {buckets}")
        if spans is None:  # max_len and its halvings down to an eighth (at least MIN_BUCKET)
            spans = [self.max_len] + [s for s in (self.max_len >> i for i in range(1, 4)) if s >= MIN_BUCKET]
        self.spans = tuple(sorted({int(s) for s in spans}))
        if not self.spans or self.spans[0] < 1 or self.spans[-1] != self.max_len:
            raise ValueError(f"spans must be positive lengths, the longest max_len ({max_len}), got {spans}")
        self._plan = Plan(max_new_tokens=1, cache_steps=self.max_steps, init_scale=float(cfg.init_scale),
                          sampler=Sampler(), strategy=CacheStrategy.parse(cache_strategy), left_padded=False,
                          per_row=True)
        boxed = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
        self._param_shardings = sharding.logical_shardings(boxed, self.mesh, self.rules)
        self._params = jax.device_put(nn.meta.unbox(params), self._param_shardings)
        self._replicated = sharding.replicated(self.mesh)
        self._slot_sharding = self._named(("batch",))
        self._compiles = 0
        # the settings of an admit's padding rows: one iteration, so that they never prolong the prefill
        self._padding_rows = self._validate(Request(prompt=(0,), max_tokens=1, depth=DepthParams(num_steps=1)))[0]
        # Host state: the loop thread owns the slot table; the lock guards the queue, the counters and the flags.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: collections.deque[_Job] = collections.deque()
        self._table: list[_Job | None] = [None] * self.slots
        self._counts = collections.Counter()
        self._running = 0
        self._thread: threading.Thread | None = None
        self._warm = self._stopping = False
        self._error: str | None = None

    # ---- public surface -----------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Warm, and the loop is alive."""
        return (self._warm and self._error is None and not self._stopping and self._thread is not None
                and self._thread.is_alive())

    @property
    def error(self) -> str | None:
        """Why the loop died (None while it lives)."""
        return self._error

    def start(self) -> None:
        """Compiles every program the engine runs (the admits of each bucket, the decode step of each window, the
        move between slots), creates the slots and starts the loop thread; returns when warm."""
        if self._thread is not None or self._warm:
            raise RuntimeError("the engine was already started")
        try:
            self._compile_all()
            self._state = self._init_program()
        except BaseException as err:
            self._error = f"warm-up failed: {type(err).__name__}: {err}"
            raise
        self._warm = True
        self._thread = threading.Thread(target=self._loop, name="recurrent-depth-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the loop after its current step; pending requests get Done('error', error='the engine stopped')."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Handle:
        """Queues a request; on_event gets its Token events, then one Done, from the engine's thread.  Raises
        RequestError (naming the parameter) for a request the engine cannot serve, QueueFull when max_queue
        requests wait, RuntimeError when the engine is not running (not started, stopped, or dead: see error)."""
        rows, key_data, stops = self._validate(request)
        handle = Handle(self)
        job = _Job(request, on_event, handle, rows, key_data, stops)
        with self._lock:
            if not self.ready:
                raise RuntimeError(f"the engine is not running: {self._error or 'not started or stopped'}")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue})")
            self._waiting.append(job)
            self._wake.notify_all()
        return handle

    def stats(self) -> EngineStats:
        with self._lock:
            c = self._counts
            return EngineStats(running=self._running, waiting=len(self._waiting), slots=self.slots,
                               requests_done=c["done"], tokens=c["tokens"], core_iterations=c["core"],
                               slot_iterations=c["slot"], exited_waiting=c["exited_waiting"],
                               compiles=self._compiles, moves=c["moves"])

    # ---- validation -----------------------------------------------------------------------------------------------
    def _validate(self, request: Request):
        """(RowSettings [1], key data [2], stop ids) of a request, or RequestError."""
        cfg = self.config
        if not isinstance(request, Request):
            raise RequestError(f"expected a Request, got {type(request).__name__}")
        prompt = request.prompt
        if not len(prompt):
            raise RequestError("the prompt is empty", "prompt")
        if not all(_is_int(t) and 0 <= t < cfg.vocab_size for t in prompt):
            raise RequestError(f"prompt token ids must be integers in [0, {cfg.vocab_size})", "prompt")
        if not _is_int(request.max_tokens) or request.max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, got {request.max_tokens!r}", "max_tokens")
        if len(prompt) + request.max_tokens > self.max_len:
            raise RequestError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({request.max_tokens}) exceeds "
                               f"the context of {self.max_len} tokens", "max_tokens")
        if not all(_is_int(t) and 0 <= t < cfg.vocab_size for t in request.stop_ids):
            raise RequestError(f"stop ids must be integers in [0, {cfg.vocab_size})", "stop_ids")
        s, d = request.sampling, request.depth
        if not _is_number(s.temperature) or not math.isfinite(s.temperature) or s.temperature < 0:
            raise RequestError(f"temperature must be a finite number >= 0, got {s.temperature!r}", "temperature")
        if s.top_k is not None and (not _is_int(s.top_k) or s.top_k < 1):
            raise RequestError(f"top_k must be a positive integer, got {s.top_k!r}", "top_k")
        if s.top_p is not None and (not _is_number(s.top_p) or not 0 < s.top_p <= 1):
            raise RequestError(f"top_p must lie in (0, 1], got {s.top_p!r}", "top_p")
        if s.min_p is not None and (not _is_number(s.min_p) or not 0 <= s.min_p <= 1):
            raise RequestError(f"min_p must lie in [0, 1], got {s.min_p!r}", "min_p")
        if not _is_int(s.seed):
            raise RequestError(f"seed must be an integer, got {s.seed!r}", "seed")
        num_steps = min(cfg.mean_recurrence, self.max_steps) if d.num_steps is None else d.num_steps
        if not _is_int(num_steps) or not 1 <= num_steps <= self.max_steps:
            raise RequestError(f"num_steps must be an integer in [1, {self.max_steps}] (the server's max_steps), "
                               f"got {num_steps!r}", "num_steps")
        if d.exit_criterion is not None and d.exit_criterion not in CRITERIA:
            raise RequestError(f"unknown exit criterion {d.exit_criterion!r}; expected one of {list(CRITERIA)}",
                               "exit_criterion")
        threshold = d.exit_threshold
        if threshold is None:
            threshold = DEFAULT_THRESHOLDS.get(d.exit_criterion, 0.0)
        if not _is_number(threshold) or not math.isfinite(threshold):
            raise RequestError(f"exit_threshold must be a finite number, got {d.exit_threshold!r}", "exit_threshold")
        if not _is_int(d.min_steps) or d.min_steps < 0:
            raise RequestError(f"min_steps must be a non-negative integer, got {d.min_steps!r}", "min_steps")
        if not _is_int(d.check_every) or d.check_every < 1:
            raise RequestError(f"check_every must be a positive integer, got {d.check_every!r}", "check_every")
        if not isinstance(d.continuous, (bool, np.bool_)):
            raise RequestError(f"continuous must be a boolean, got {d.continuous!r}", "continuous")
        init_scale = cfg.init_scale if d.init_scale is None else d.init_scale
        if not _is_number(init_scale) or not math.isfinite(init_scale) or init_scale < 0:
            raise RequestError(f"init_scale must be a finite number >= 0, got {d.init_scale!r}", "init_scale")
        one = lambda value, dtype: np.full((1,), value, dtype)  # noqa: E731
        rows = RowSettings(num_steps=one(num_steps, np.int32), criterion=one(criterion_id(d.exit_criterion), np.int32),
                           threshold=one(threshold, np.float32), min_steps=one(d.min_steps, np.int32),
                           check_every=one(d.check_every, np.int32), continuous=one(bool(d.continuous), bool),
                           init_scale=one(init_scale, np.float32),
                           sampling=SamplingRows.of(1, float(s.temperature), s.top_k, s.top_p, s.min_p))
        key_data = np.asarray([0, int(s.seed) % 2**32], np.uint32)  # jax.random.key(seed)'s, for any int seed
        return rows, key_data, frozenset(int(t) for t in request.stop_ids)

    # ---- the compiled programs ------------------------------------------------------------------------------------
    def _named(self, axes) -> NamedSharding:
        return NamedSharding(self.mesh, nn.logical_to_mesh_axes(axes, self.rules))

    @contextlib.contextmanager
    def _context(self):
        """Mesh and logical rules in scope while tracing, so the model's activation constraints shard."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def _empty_slots(self) -> Slots:
        cfg, n = self.config, self.slots
        rows = RowSettings(num_steps=jnp.ones((n,), jnp.int32), criterion=jnp.zeros((n,), jnp.int32),
                           threshold=jnp.zeros((n,), jnp.float32), min_steps=jnp.zeros((n,), jnp.int32),
                           check_every=jnp.ones((n,), jnp.int32), continuous=jnp.zeros((n,), bool),
                           init_scale=jnp.zeros((n,), jnp.float32), sampling=jax.tree.map(jnp.asarray,
                                                                                           SamplingRows.of(n)))
        zeros = jnp.zeros((n,), jnp.int32)
        return Slots(cache=KVCache.create(cfg, n, self.max_len, self._plan.strategy, self.max_steps), pos=zeros,
                     token=zeros, latent=jnp.zeros((n, 1, cfg.hidden_size), cfg.stream_dtype), index=zeros,
                     keys=jnp.zeros((n, 2), jnp.uint32), rows=rows)

    def _admit_fn(self, params, slots: Slots, ids, lengths, rows_at, key_data, rows: RowSettings):
        """Prefills prompts ids [n, bucket] (lengths [n] real tokens, right-padded), samples their first tokens and
        inserts row i into slot rows_at[i] (out of range: a padding row, dropped).  Returns (slots, [2, n]: first
        tokens, the prefills' iterations)."""
        runner = Runner(self.model, params, self._plan)
        wrap = lambda data: jax.random.fold_in(jax.random.wrap_key_data(data), 0)  # noqa: E731
        keys = jax.vmap(wrap)(key_data)  # [n]: generate's row 0 of key(seed)
        k_state, k_sample = token_keys(keys, 0)
        _, res = prefill(runner, ids, lengths, k_state, ids.shape[1], rows)
        token = rows.sampling(res.logits[:, 0], k_sample)
        put = lambda big, small: big.at[rows_at].set(small.astype(big.dtype), mode="drop")  # noqa: E731
        slots = Slots(cache=slots.cache.insert(res.cache, rows_at), pos=put(slots.pos, lengths),
                      token=put(slots.token, token), latent=put(slots.latent, res.latents),
                      index=put(slots.index, jnp.ones_like(lengths)), keys=put(slots.keys, jax.random.key_data(keys)),
                      rows=jax.tree.map(put, slots.rows, rows))
        return slots, jnp.stack([token, res.steps])

    def _window_decode_fn(self, window: int, span: int, params, slots: Slots, active):
        """The decode step of the first `window` slots (active [window]), attending to their first `span`
        positions; the other slots are left as they are."""
        if window == self.slots:
            return self._decode_fn(span, params, slots, active)
        axes = _slot_axes(slots)
        take = lambda x, names: jax.lax.slice_in_dim(x, 0, window, axis=names.index("batch"))  # noqa: E731
        part, out = self._decode_fn(span, params, jax.tree.map(take, slots, axes), active)
        put = lambda x, y, names: jax.lax.dynamic_update_slice_in_dim(x, y, 0, names.index("batch"))  # noqa: E731
        return jax.tree.map(put, slots, part, axes), out

    def _move_fn(self, slots: Slots, src, dst):
        """Slot src's state copied into slot dst (the loop keeps busy slots leading this way)."""
        def move(x, names):
            axis = names.index("batch")
            return jax.lax.dynamic_update_slice_in_dim(x, jax.lax.dynamic_slice_in_dim(x, src, 1, axis), dst, axis)

        return jax.tree.map(move, slots, _slot_axes(slots))

    def _decode_fn(self, span: int, params, slots: Slots, active):
        """One token for every active slot ([slots] bool; each slot's pos below span).  Returns (slots, [2, slots]:
        tokens, iterations)."""
        runner = Runner(self.model, params, self._plan)
        n = active.shape[0]
        k_state, k_sample = token_keys(jax.random.wrap_key_data(slots.keys), slots.index)
        chunk = Chunk(start=slots.pos, real=jnp.ones((n, 1), bool), span=span)
        res = runner.step(slots.cache, slots.token[:, None], chunk, slots.pos[:, None], active,
                          jnp.zeros((n, 1), jnp.int32), k_state, slots.rows, state=slots.latent)
        token = slots.rows.sampling(res.logits[:, 0], k_sample)
        grow = active.astype(jnp.int32)
        slots = slots.replace(cache=res.cache, pos=slots.pos + grow, token=jnp.where(active, token, slots.token),
                              latent=jnp.where(active[:, None, None], res.latents.astype(slots.latent.dtype),
                                               slots.latent), index=slots.index + grow)
        return slots, jnp.stack([token, res.steps])

    def _lower(self, fn, args, in_shardings, out_shardings, donate=()) -> jax.stages.Lowered:
        with self._context():
            return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                           donate_argnums=donate).lower(*args)

    def _compile_all(self) -> None:
        """Lowers every program, then compiles them on a thread each (XLA compiles without the GIL)."""
        spec = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
        with self._context():
            shapes = jax.eval_shape(self._empty_slots)
        slot_shardings = jax.tree.map(self._named, _slot_axes(shapes), is_leaf=lambda x: isinstance(x, tuple))
        params = jax.tree.map(spec, self._params, self._param_shardings)
        slots = jax.tree.map(spec, shapes, slot_shardings)
        rep = self._replicated
        replicated = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)  # noqa: E731
        lowered = {"init": self._lower(self._empty_slots, (), (), slot_shardings)}
        for window, span in itertools.product(self._windows, self.spans):
            active = jax.ShapeDtypeStruct((window,), bool, sharding=self._slot_sharding)
            lowered["decode", window, span] = self._lower(functools.partial(self._window_decode_fn, window, span),
                                                    (params, slots, active),
                                                    (self._param_shardings, slot_shardings, self._slot_sharding),
                                                    (slot_shardings, rep), donate=(1,))
        if len(self._windows) > 1:
            scalar = replicated((), jnp.int32)
            lowered["move"] = self._lower(self._move_fn, (slots, scalar, scalar), (slot_shardings, rep, rep),
                                          slot_shardings, donate=(0,))
        for n, bucket in itertools.product(sorted({1, self.admit_batch}), self.buckets):
            rows = jax.tree.map(lambda x, n=n: replicated((n,), x.dtype), self._padding_rows)
            args = (replicated((n, bucket), jnp.int32), replicated((n,), jnp.int32), replicated((n,), jnp.int32),
                    replicated((n, 2), jnp.uint32), rows)
            in_shardings = (self._param_shardings, slot_shardings, *jax.tree.map(lambda _: rep, args))
            lowered[n, bucket] = self._lower(self._admit_fn, (params, slots, *args), in_shardings,
                                             (slot_shardings, rep), donate=(1,))
        with concurrent.futures.ThreadPoolExecutor(min(len(lowered), os.cpu_count() or 1, 8)) as pool:
            compiled = dict(zip(lowered, pool.map(lambda low: low.compile(), lowered.values())))
        self._compiles += len(compiled)
        self._init_program, self._move = compiled.pop("init"), compiled.pop("move", None)
        self._decode = {key[1:]: compiled.pop(key) for key in list(compiled) if key[0] == "decode"}
        self._admit = compiled

    # ---- the loop -------------------------------------------------------------------------------------------------
    def _notify(self) -> None:
        with self._lock:
            self._wake.notify_all()

    def _loop(self) -> None:
        try:
            active_dev, active_host = None, None
            while True:
                with self._lock:
                    if self._stopping:
                        break
                    cancelled = [job for job in self._waiting if job.handle.cancelled]
                    for job in cancelled:
                        self._waiting.remove(job)
                    if not cancelled and not self._running and not self._waiting:
                        self._wake.wait(timeout=0.5)
                        continue
                for job in cancelled:
                    self._finish(job, Done("cancelled"))
                for job in self._table:
                    if job is not None and job.handle.cancelled:
                        self._finish(job, Done("cancelled", prompt_steps=job.prompt_steps))
                self._admit_some()
                if not self._running:
                    continue
                window = self._compact()
                mask = np.asarray([job is not None for job in self._table[:window]])
                if active_host is None or not np.array_equal(mask, active_host):
                    active_dev, active_host = jax.device_put(mask, self._slot_sharding), mask
                busy = [job for job in self._table[:window] if job is not None]
                last = max(len(job.request.prompt) + job.emitted - 1 for job in busy)  # the deepest input's position
                span = next(span for span in self.spans if span > last)
                self._state, out = self._decode[window, span](self._params, self._state, active_dev)
                tokens, steps = np.asarray(out)
                self._account_step(mask, steps)
                for slot, job in enumerate(self._table[:window]):
                    if job is not None and job.handle.cancelled:  # (cancelled during the step: no more tokens)
                        self._finish(job, Done("cancelled", prompt_steps=job.prompt_steps))
                    elif job is not None:
                        self._emit_token(job, int(tokens[slot]), int(steps[slot]))
        except BaseException as err:  # noqa: BLE001  (the loop dies cleanly: every pending request hears why)
            log.exception("the serving engine's loop died")
            self._error = f"{type(err).__name__}: {err}"
            self._fail_pending(self._error)
            return
        self._fail_pending("the engine stopped")

    def _compact(self) -> int:
        """Moves busy slots beyond the first `running` into the free ones among them; returns the decode window."""
        busy = sum(job is not None for job in self._table)
        if len(self._windows) > 1:
            holes = [i for i in range(busy) if self._table[i] is None]
            movers = [i for i in range(busy, self.slots) if self._table[i] is not None]
            for dst, src in zip(holes, movers):
                self._state = self._move(self._state, *jax.device_put((np.int32(src), np.int32(dst)),
                                                                      self._replicated))
                job = self._table[dst] = self._table[src]
                self._table[src], job.slot = None, dst
                with self._lock:
                    self._counts["moves"] += 1
        return next(window for window in self._windows if window >= busy)

    def _admit_some(self) -> None:
        """Prefills waiting requests into free slots, up to admit_batch per admit, until the free slots or the
        queue run out (prefill first, as vLLM's default scheduler: the batches stay full and first tokens come
        soon; the running requests wait for those admits, at most one per admit_batch free slots)."""
        free = [i for i, job in enumerate(self._table) if job is None]
        while free:
            with self._lock:
                jobs = [self._waiting.popleft() for _ in range(min(self.admit_batch, len(free), len(self._waiting)))]
            if not jobs:
                return
            for job in jobs:
                if job.handle.cancelled:
                    self._finish(job, Done("cancelled"))
            jobs = [job for job in jobs if not job.handle.cancelled]
            if jobs:
                self._admit_jobs(jobs, free[:len(jobs)])
                free = free[len(jobs):]

    def _admit_jobs(self, jobs: list[_Job], slots: list[int]) -> None:
        """One admit: the jobs' prompts in the bucket of the longest, padded to 1 or admit_batch rows."""
        n = 1 if len(jobs) == 1 else self.admit_batch
        bucket = next(b for b in self.buckets if b >= max(len(job.request.prompt) for job in jobs))
        ids, lengths = np.zeros((n, bucket), np.int32), np.ones((n,), np.int32)
        rows_at, key_data = np.full((n,), self.slots, np.int32), np.zeros((n, 2), np.uint32)
        for i, (job, slot) in enumerate(zip(jobs, slots)):
            ids[i, :len(job.request.prompt)] = job.request.prompt
            lengths[i], rows_at[i], key_data[i] = len(job.request.prompt), slot, job.key_data
        rows = jax.tree.map(lambda *x: np.concatenate(x), *[job.rows for job in jobs],
                            *[self._padding_rows] * (n - len(jobs)))
        args = jax.device_put((ids, lengths, rows_at, key_data, rows), self._replicated)
        self._state, out = self._admit[n, bucket](self._params, self._state, *args)
        for job, slot, token, steps in zip(jobs, slots, *np.asarray(out).tolist()):
            job.prompt_steps, job.slot = steps, slot
            self._table[slot] = job
            with self._lock:
                self._running += 1
            self._emit_token(job, token, steps)

    def _account_step(self, mask, steps) -> None:
        used = steps[mask]
        deepest = int(used.max()) if used.size else 0
        with self._lock:
            self._counts["slot"] += deepest * int(mask.sum())
            self._counts["exited_waiting"] += int((deepest - used).sum())

    def _emit_token(self, job: _Job, token: int, steps: int) -> None:
        job.emitted += 1
        with self._lock:
            self._counts["tokens"] += 1
            self._counts["core"] += steps
        if not self._call(job, Token(token, steps)):
            return
        if token in job.stops:
            self._finish(job, Done("stop", prompt_steps=job.prompt_steps))
        elif job.emitted >= job.request.max_tokens:
            self._finish(job, Done("length", prompt_steps=job.prompt_steps))

    def _finish(self, job: _Job, done: Done) -> None:
        """Frees the job's slot (if it has one) and sends its Done."""
        if job.slot is not None and self._table[job.slot] is job:
            self._table[job.slot] = None
            with self._lock:
                self._running -= 1
        with self._lock:
            self._counts["done"] += 1
        self._call(job, done)

    def _call(self, job: _Job, event: Event) -> bool:
        """Hands an event to the job's callback; a callback that raises cancels its request (False)."""
        try:
            job.on_event(event)
            return True
        except Exception:  # noqa: BLE001  (a client's callback must not kill the engine)
            log.exception("a request's on_event raised; the request is dropped")
            job.handle.cancelled = True
            if job.slot is not None and self._table[job.slot] is job:
                self._table[job.slot] = None
                with self._lock:
                    self._running -= 1
            return False

    def _fail_pending(self, error: str) -> None:
        """Done('error') for every request in a slot or waiting (the loop has ended)."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        jobs = [job for job in self._table if job is not None] + waiting
        for job in jobs:
            self._finish(job, Done("error", prompt_steps=job.prompt_steps, error=error))


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))
