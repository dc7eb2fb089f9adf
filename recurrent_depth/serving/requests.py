"""What a request asks of the serving engine and what comes back: the contract between the HTTP layer
(`recurrent_depth.serving.app`) and the engine (`recurrent_depth.serving.engine`), in token ids only."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


class RequestError(ValueError):
    """A request the engine cannot serve as asked (an HTTP 400); `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is full (an HTTP 429)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; the filters are off when None (as `decoding.sampling.Sampler`)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int = 0  # a request's randomness depends on its seed and token index only


@dataclasses.dataclass(frozen=True)
class DepthParams:
    """How many iterations of the core block each token gets (as `decoding.generate.generate`'s arguments)."""

    num_steps: int | None = None  # None: the model's mean_recurrence; at most the engine's max_steps
    exit_criterion: str | None = None  # None: fixed depth; else one of exit_criteria.DEFAULT_THRESHOLDS
    exit_threshold: float | None = None  # None: the criterion's default
    min_steps: int = 0
    check_every: int = 1
    continuous: bool = False
    init_scale: float | None = None  # None: the model's init_scale


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]  # token ids
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    depth: DepthParams = DepthParams()
    stop_ids: tuple[int, ...] = ()  # a token among these ends the sequence (and is emitted)


@dataclasses.dataclass(frozen=True)
class Token:
    """One generated token and the iterations of the core block it used."""

    id: int
    steps: int


@dataclasses.dataclass(frozen=True)
class Done:
    """The end of a request: 'stop' (a stop id), 'length' (max_tokens), 'cancelled', or 'error' (`error` says)."""

    reason: str
    prompt_steps: int = 0  # iterations the prompt's prefill used
    error: str | None = None


Event = Token | Done
OnEvent = Callable[[Event], None]  # called from the engine's thread, in order; must not block
