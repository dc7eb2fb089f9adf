"""The serving engine: equality with `generate`, continuous batching of mixed requests, cancellation, no
compilation after warm-up, request errors, a full queue, a mesh, a dying loop.

Compilation dominates: one engine (4 slots, 64 positions, at most 8 iterations; 2 prefill buckets) serves every
test but the mesh one, and the comparisons with `generate` use three settings.
"""

import collections
import dataclasses
import math
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_depth import generate
from recurrent_depth.runtime.sharding import make_mesh
from recurrent_depth.serving.engine import DEFAULT_CACHE_STRATEGY, Engine
from recurrent_depth.serving.requests import (
    DepthParams,
    Done,
    QueueFull,
    Request,
    RequestError,
    SamplingParams,
    Token,
)

# The engine of tests/serving/serving_helpers.py (ENGINE) with a second, shorter prefill bucket: the programs they
# share (the decode steps, the move, the empty slots, the admits of 64 positions) compile once, here, and come from
# the persistent compilation cache there.
MAX_LEN, MAX_STEPS, BUCKETS = 64, 8, (16, 64)
TIMEOUT = 120  # seconds a request may take (the machine may be busy)
_rng = np.random.default_rng(0)


def prompt(n: int) -> tuple[int, ...]:
    return tuple(int(t) for t in _rng.integers(3, 500, n))


PROMPT = prompt(10)
# A dozen requests of mixed lengths, depths, exit criteria, sampling, continuous thinking and init scales.
MIXED = [
    Request(prompt(5), 10, depth=DepthParams(num_steps=4)),
    Request(prompt(17), 6, depth=DepthParams(num_steps=8, exit_criterion="entropy-diff", exit_threshold=0.01)),
    Request(prompt(1), 12, depth=DepthParams(num_steps=6, exit_criterion="latent-diff", exit_threshold=0.1,
                                             continuous=True)),
    Request(prompt(9), 8, SamplingParams(temperature=0.8, top_k=20, seed=3), DepthParams(num_steps=3)),
    Request(prompt(12), 9, depth=DepthParams(num_steps=8, exit_criterion="kl", min_steps=2)),
    Request(prompt(3), 5, depth=DepthParams(num_steps=8, exit_criterion="minp-kl", exit_threshold=1e-2, check_every=2,
                                             init_scale=0.0)),
    Request(prompt(20), 7, SamplingParams(temperature=1.0, top_p=0.9, seed=11),
            DepthParams(num_steps=5, exit_criterion="cosine", exit_threshold=0.05)),
    Request(prompt(7), 11, depth=DepthParams(num_steps=8, exit_criterion="argmax-stability", exit_threshold=2)),
    Request(prompt(15), 4, SamplingParams(temperature=0.7, min_p=0.1, seed=5), DepthParams(num_steps=2)),
    Request(prompt(4), 10, depth=DepthParams(num_steps=1)),
    Request(prompt(10), 8, SamplingParams(temperature=0.9, top_k=50, top_p=0.95, min_p=0.02, seed=42),
            DepthParams(exit_criterion="entropy-diff", continuous=True, init_scale=0.5)),
    Request(prompt(25), 6, depth=DepthParams(num_steps=7, exit_criterion="latent-diff", exit_threshold=0.2,
                                             min_steps=1, check_every=3)),
]


class Collector:
    """A request's events; `wait` returns them once Done came."""

    def __init__(self, log=None, name=None):
        self.events, self.done, self.log, self.name = [], threading.Event(), log, name

    def __call__(self, event):
        self.events.append(event)
        if self.log is not None:
            self.log.append((self.name, event))
        if isinstance(event, Done):
            self.done.set()

    def wait(self):
        assert self.done.wait(TIMEOUT), f"no Done within {TIMEOUT} s: {self.events}"
        assert sum(isinstance(e, Done) for e in self.events) == 1 and isinstance(self.events[-1], Done)
        return self

    @property
    def tokens(self):
        return [e.id for e in self.events if isinstance(e, Token)]

    @property
    def steps(self):
        return [e.steps for e in self.events if isinstance(e, Token)]

    @property
    def result(self):
        return self.tokens, self.steps, self.events[-1]


def run(engine, *requests):
    """Submits the requests together; returns their Collectors once all are done."""
    collectors = [Collector() for _ in requests]
    for request, collector in zip(requests, collectors):
        engine.submit(request, collector)
    return [c.wait() for c in collectors]


@pytest.fixture(scope="module")
def engine(tiny):
    model, params = tiny
    eng = Engine(model, params, slots=4, max_len=MAX_LEN, max_steps=MAX_STEPS, buckets=BUCKETS, max_queue=12,
                 spans=(MAX_LEN,))
    assert not eng.ready and eng.stats().compiles == 0
    eng.start()
    assert eng.ready and eng.error is None
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def mixed(engine):
    """(each MIXED request run alone, all of them run together through the 4 slots, compile events meanwhile)."""
    alone = [run(engine, request)[0].result for request in MIXED]
    compiles = []
    listener = lambda name, *_, **__: compiles.append(name) if "/jax/core/compile" in name else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        together = [c.result for c in run(engine, *MIXED)]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return alone, together, compiles


def _generate(tiny, request, **kw):
    """decoding.generate's output for a request alone: (tokens, steps) up to the end."""
    model, params = tiny
    s, d = request.sampling, request.depth
    out = generate(model, params, [list(request.prompt)], max_new_tokens=request.max_tokens, num_steps=d.num_steps,
                   max_steps=MAX_STEPS, cache_strategy=DEFAULT_CACHE_STRATEGY, exit_criterion=d.exit_criterion,
                   exit_threshold=d.exit_threshold, min_steps=d.min_steps, check_every=d.check_every,
                   continuous=d.continuous, init_scale=d.init_scale, temperature=s.temperature, top_k=s.top_k,
                   top_p=s.top_p, min_p=s.min_p, seed=s.seed, stop_tokens=request.stop_ids, **kw)
    n = int(out.num_tokens[0])
    return np.asarray(out.tokens[0, :n]).tolist(), np.asarray(out.steps[0, :n]).tolist()


# ---- equality with generate ------------------------------------------------------------------------------------
def test_the_initial_state_depends_on_the_row_key_and_position_only(tiny):
    """What lets a bucket-padded prefill, and a slot among others, draw generate's initial state."""
    model, params = tiny
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(3), jnp.arange(3))
    positions = jnp.asarray([[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 2], [7, 8, 9, 10, 11, 12]])  # row 1 left-padded
    e = jnp.zeros((3, 6, model.config.hidden_size))
    draw = lambda *args: model.apply({"params": params}, *args, method=model.initial_state)  # noqa: E731
    full = draw(e, jnp.asarray([1.0, 1.0, 0.5]), positions, keys)
    np.testing.assert_array_equal(draw(e[:1, :3], 1.0, positions[:1, :3], keys[1:2])[0], full[1, 3:])  # unpadded
    np.testing.assert_allclose(draw(e[:1], 1.0, positions[2:], keys[2:])[0] * 0.5, full[2], rtol=1e-6)  # alone
    assert not np.allclose(full[0, :3], full[1, 3:])  # another key
    np.testing.assert_array_equal(draw(e, 0.0, positions, keys), np.zeros(e.shape))


@pytest.mark.parametrize("request_", [
    Request(PROMPT, 10, depth=DepthParams(num_steps=4)),  # fixed depth, the model's init_scale (1)
    Request(PROMPT, 10, depth=DepthParams(exit_criterion="kl", exit_threshold=0.05, min_steps=1, check_every=2,
                                          continuous=True, init_scale=0.5)),
    Request(PROMPT, 10, SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, seed=1234),
            DepthParams(num_steps=7, exit_criterion="latent-diff", exit_threshold=0.2)),
], ids=["fixed", "kl-continuous", "sampled-latent"])
def test_a_request_equals_generate_token_for_token(engine, tiny, request_):
    tokens, steps, done = run(engine, request_)[0].result
    assert (tokens, steps) == _generate(tiny, request_)
    assert done == Done("length", prompt_steps=steps[0]) and len(tokens) == request_.max_tokens
    assert len(set(steps)) > 1 or request_.depth.exit_criterion is None  # (the exits do differ per token)
    if request_.depth.exit_criterion is None:  # a stop id ends it, emitted as the last token
        stopped = dataclasses.replace(request_, stop_ids=(tokens[3], 1))
        tokens_, steps_, done = run(engine, stopped)[0].result
        end = 1 + next(i for i, t in enumerate(tokens) if t in stopped.stop_ids)
        assert (tokens_, steps_) == (tokens[:end], steps[:end]) == _generate(tiny, stopped)
        assert done.reason == "stop"


# ---- continuous batching -----------------------------------------------------------------------------------------
def test_each_request_among_others_equals_it_alone(mixed):
    alone, together, _ = mixed
    for request, a, b in zip(MIXED, alone, together):
        assert a == b, request
        tokens, steps, done = a
        assert len(tokens) == request.max_tokens and done == Done("length", prompt_steps=steps[0])
        assert all(1 <= s <= (request.depth.num_steps or MAX_STEPS) for s in steps)
    assert len({tuple(a[1]) for a in alone}) > 6  # the depths differ


def test_seeded_sampling_alone_equals_sampling_among_others(engine, mixed):
    alone, together, _ = mixed
    sampled = [i for i, r in enumerate(MIXED) if r.sampling.temperature > 0]
    assert [together[i] for i in sampled] == [alone[i] for i in sampled]
    other_seed = dataclasses.replace(MIXED[sampled[0]], sampling=dataclasses.replace(MIXED[sampled[0]].sampling,
                                                                                   seed=4))
    assert run(engine, other_seed)[0].tokens != alone[sampled[0]][0]


def test_nothing_compiles_after_warm_up(engine, mixed):
    *_, compiles = mixed
    assert compiles == []  # jax's own compilation events, during the mixed workload
    # each bucket's admit of one request and of admit_batch (4), the decode step of each window (1, 2, 3 and 4
    # slots), the move between slots, the empty slots
    assert engine.stats().compiles == 2 * len(BUCKETS) + 6


def test_stats_count_tokens_and_iterations(engine, mixed):
    alone, _, _ = mixed
    stats = engine.stats()
    assert stats.slots == 4 and stats.running == 0 and stats.waiting == 0
    assert stats.tokens >= 2 * sum(len(a[0]) for a in alone)
    assert stats.core_iterations >= 2 * sum(sum(a[1]) for a in alone)
    assert stats.requests_done >= 2 * len(MIXED)
    assert 0 < stats.exited_waiting < stats.slot_iterations
    assert stats.moves > 0  # requests moved down into freed slots, and still equalled themselves alone


def test_cancel_frees_the_slot_before_the_next_step(engine):
    log = []
    all_busy, release = threading.Event(), threading.Event()

    class First(Collector):  # once every slot is busy, holds the engine's thread while the test cancels
        def __call__(self, event):
            super().__call__(event)
            if not all_busy.is_set() and len(self.events) >= 2 and engine.stats().running == 4:
                all_busy.set()
                release.wait(TIMEOUT)

    long = [Request(prompt(4), 27, depth=DepthParams(num_steps=8)) for _ in range(4)]
    collectors = [First(log, 0)] + [Collector(log, i) for i in (1, 2, 3)]
    handles = [engine.submit(r, c) for r, c in zip(long, collectors)]
    assert all_busy.wait(TIMEOUT)  # every slot busy: the next requests wait
    tokens_at_cancel = len(collectors[0].tokens)
    waiting, next_ = Collector(log, "waiting"), Collector(log, "next")
    engine.submit(Request(prompt(4), 3), waiting).cancel()
    engine.submit(Request(prompt(4), 3), next_)
    handles[0].cancel()
    release.set()
    assert waiting.wait().events == [Done("cancelled")]
    first = collectors[0].wait()
    assert first.events[-1].reason == "cancelled" and len(first.tokens) == tokens_at_cancel < 27
    next_.wait()
    for c in collectors[1:]:
        c.wait()
    ends = [name for name, event in log if isinstance(event, Done)]
    assert ends.index("next") < min(ends.index(i) for i in (1, 2, 3))  # it took the freed slot at once
    assert engine.stats().running == 0


def test_a_full_queue_raises(engine):
    release = threading.Event()

    class Blocking(Collector):  # holds the engine's thread, so that submissions pile up
        def __call__(self, event):
            super().__call__(event)
            release.wait(TIMEOUT)

    blocker = Blocking()
    engine.submit(Request(prompt(3), 2), blocker)
    for _ in range(200):
        if blocker.events:
            break
        threading.Event().wait(0.05)
    queued = [Collector() for _ in range(engine.max_queue)]
    for c in queued:
        engine.submit(Request(prompt(3), 1), c)
    assert engine.stats().waiting == engine.max_queue
    with pytest.raises(QueueFull):
        engine.submit(Request(prompt(3), 1), Collector())
    release.set()
    for c in [blocker] + queued:
        assert c.wait().events[-1].reason == "length"


BAD = [
    (dict(prompt=()), "prompt"),
    (dict(prompt=(1, 512)), "prompt"),
    (dict(prompt=(1, -1)), "prompt"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(prompt=prompt(62), max_tokens=3), "max_tokens"),
    (dict(stop_ids=(600,)), "stop_ids"),
    (dict(sampling=SamplingParams(temperature=-0.5)), "temperature"),
    (dict(sampling=SamplingParams(temperature=math.nan)), "temperature"),
    (dict(sampling=SamplingParams(top_k=0)), "top_k"),
    (dict(sampling=SamplingParams(top_p=0.0)), "top_p"),
    (dict(sampling=SamplingParams(top_p=math.nan)), "top_p"),
    (dict(sampling=SamplingParams(min_p=1.5)), "min_p"),
    (dict(depth=DepthParams(num_steps=MAX_STEPS + 1)), "num_steps"),
    (dict(depth=DepthParams(num_steps=0)), "num_steps"),
    (dict(depth=DepthParams(exit_criterion="patience")), "exit_criterion"),
    (dict(depth=DepthParams(exit_criterion="kl", exit_threshold=math.nan)), "exit_threshold"),
    (dict(depth=DepthParams(exit_criterion="kl", exit_threshold=math.inf)), "exit_threshold"),
    (dict(depth=DepthParams(min_steps=-1)), "min_steps"),
    (dict(depth=DepthParams(check_every=0)), "check_every"),
    (dict(depth=DepthParams(init_scale=-1.0)), "init_scale"),
]


@pytest.mark.parametrize("change,param", BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_a_bad_request_names_its_parameter(engine, change, param):
    with pytest.raises(RequestError) as err:
        engine.submit(dataclasses.replace(Request(PROMPT, 4), **change), Collector())
    assert err.value.param == param
    assert engine.stats().waiting == 0


def test_a_mesh_of_eight_devices_gives_the_single_device_output(tiny, mixed):
    """Slots over (data, fsdp), the cache's heads and the parameters over tensor / fsdp (conftest's 8 CPU devices);
    32 positions and one prefill bucket of 32, so every prompt is padded otherwise than on one device; the default
    attention spans (16 and 32 positions, where the other engine reads all 64), so requests change span as they
    grow."""
    alone, _, _ = mixed
    model, params = tiny
    eng = Engine(model, params, slots=4, max_len=32, max_steps=MAX_STEPS, mesh=make_mesh((2, 2, 2)), buckets=(32,))
    eng.start()

    class Used(dict):  # records which decode programs (window, span) the loop runs
        def __getitem__(self, key):
            used.add(key)
            return super().__getitem__(key)

    used, eng._decode = set(), Used(eng._decode)
    try:
        picked = [1, 2, 6, 10]  # adaptive (logit and latent criteria), continuous, sampled
        assert [c.result for c in run(eng, *[MIXED[i] for i in picked])] == [alone[i] for i in picked]
        assert eng._state.cache.core.k.sharding.spec[1] == ("data", "fsdp")
        assert eng.spans == (16, 32) and used == {(4, 16), (4, 32)}  # (MIXED[2] ends alone below 16 positions)
        assert eng.stats().compiles == 5  # the empty slots, the admits of 1 and 4 requests, a decode step per span
    finally:
        eng.stop()


def test_an_exception_ends_the_loop_and_every_pending_request_hears_it(engine):
    """The last test of the module: it kills the shared engine."""
    def broken(*args):
        raise RuntimeError("the device fell over")

    release = threading.Event()

    class Blocking(Collector):  # holds the engine's thread until every request is in
        def __call__(self, event):
            super().__call__(event)
            release.wait(TIMEOUT)

    engine._decode = collections.defaultdict(lambda: broken)  # every window's decode step
    collectors = [Blocking()] + [Collector() for _ in range(5)]
    for c in collectors:
        engine.submit(Request(prompt(3), 5), c)
    release.set()
    for c in collectors:
        done = c.wait().events[-1]
        assert done.reason == "error" and "the device fell over" in done.error
    assert not engine.ready and "the device fell over" in engine.error
    with pytest.raises(RuntimeError, match="not running"):
        engine.submit(Request(prompt(3), 5), Collector())
