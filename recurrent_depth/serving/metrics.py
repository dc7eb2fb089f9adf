"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own per app.

Measured by the HTTP layer: requests by endpoint and finish reason, rejected requests by status, prompt and
generated tokens, time to first token, inter-token latency, request duration and the iterations of the core block
each generated token used.  Read from the engine at each scrape (`Engine.stats()`): requests running and waiting,
slots and their use, the engine's counters (requests, tokens, core iterations, slot iterations, compilations),
and the fraction of the core work that early-exited slots spent waiting for the others
(`exited_waiting / slot_iterations`: a batch's decode step runs until its deepest slot is done).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "recurrent_depth_"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
ITERATION_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _EngineCollector:
    """The engine's state and counters, read when Prometheus scrapes."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        get = lambda name: float(getattr(stats, name, 0) or 0)
        running, slots = get("running"), get("slots") or float(self.engine.slots)
        gauges = [("requests_running", "Requests in a slot, generating", running),
                  ("requests_waiting", "Requests queued for a slot", get("waiting")),
                  ("slots", "Slots of the engine (requests generating at once)", slots),
                  ("slot_use", "Fraction of the slots in use", running / slots if slots else 0.0),
                  ("exited_waiting_fraction", "Fraction of the slots' core iterations that early-exited slots spent "
                   "waiting for the batch's deepest slot (exited_waiting / slot_iterations)",
                   get("exited_waiting") / get("slot_iterations") if get("slot_iterations") else 0.0),
                  ("engine_ready", "1 once the engine is warm and its loop runs", float(bool(self.engine.ready)))]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        counters = [("engine_requests", "Requests the engine finished", "requests_done"),
                    ("engine_tokens", "Tokens the engine generated", "tokens"),
                    ("core_iterations", "Core-block iterations the decode steps ran (per batch step)",
                     "core_iterations"),
                    ("slot_iterations", "Core-block iterations summed over the slots in use", "slot_iterations"),
                    ("exited_waiting_iterations", "Slot iterations spent by slots whose token had already exited",
                     "exited_waiting"),
                    ("compiles", "Compilations of the engine's programs", "compiles")]
        for name, doc, field in counters:
            yield CounterMetricFamily(PREFIX + name, doc, value=get(field))


class Metrics:
    """What the HTTP layer measures, and the engine's collector, in one registry."""

    def __init__(self, engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(PREFIX + "requests", "Requests answered, by endpoint and finish reason",
                                ["endpoint", "finish_reason"], registry=registry)
        self.rejected = Counter(PREFIX + "requests_rejected", "Requests refused, by HTTP status", ["status"],
                                registry=registry)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens prefilled", registry=registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", registry=registry)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Between consecutive tokens of a choice",
                             buckets=LATENCY_BUCKETS, registry=registry)
        self.duration = Histogram(PREFIX + "request_duration_seconds", "From a request's arrival to its last token",
                                  buckets=DURATION_BUCKETS, registry=registry)
        self.iterations = Histogram(PREFIX + "iterations_per_token", "Core-block iterations each generated token "
                                    "used", buckets=ITERATION_BUCKETS, registry=registry)
        registry.register(_EngineCollector(engine))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
