"""The OpenAI API's request bodies as the server reads them, and the engine requests they become.

A body is parsed from JSON (`parse_body`), validated by pydantic (strict types: a string is not a number, no NaN
or infinity) and then by what the model and the engine allow (`Limits`); anything wrong is an `APIError` with
OpenAI's error body naming the parameter, which the `openai` client raises as `BadRequestError` (400),
`NotFoundError` (404) or `RateLimitError` (429).  Fields of OpenAI's API that this server does not implement are
refused by name when they ask for something (`tools`, `logprobs`, `echo`, `best_of` > n, `logit_bias`, ...), and so
is any field OpenAI's API does not have.  The recurrence fields (`num_steps`, `exit_criterion`, ...) are top-level
fields of the body (`extra_body` in the `openai` client).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from recurrent_depth.data.chat_template import chat_stop_ids, render_chat
from recurrent_depth.data.tokenizer import Tokenizer
from recurrent_depth.decoding.exit_criteria import DEFAULT_THRESHOLDS
from recurrent_depth.serving.requests import DepthParams, Request, SamplingParams

MAX_N = 128  # choices per prompt (OpenAI's limit)
MAX_STOPS = 4  # stop strings per request (OpenAI's limit)
SEED_MODULUS = 2 ** 32  # seeds are taken modulo this, as the engine keys them (jax.random.key(seed) below it)
# reasoning_effort -> this fraction of --max_steps iterations per token (at least 1)
REASONING_EFFORT = {"low": 0.25, "medium": 0.5, "high": 1.0}
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens of /v1/completions; chat: the rest of the context


class APIError(Exception):
    """An error answered with OpenAI's body `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, *, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None) -> APIError:
    return APIError(400, message, param, code="invalid_value" if param else None)


def unsupported(param: str, what: str = "") -> APIError:
    return APIError(400, f"`{param}` is not supported by this server{what}", param, code="unsupported_parameter")


class _Body(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = None
    # beyond OpenAI's sampling, as vLLM has them
    top_k: int | None = None
    min_p: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # the recurrence: iterations of the core block per token
    num_steps: int | None = None
    exit_criterion: str | None = None
    exit_threshold: float | None = None
    min_steps: int | None = None
    check_every: int | None = None
    continuous: bool | None = None
    init_scale: float | None = None
    reasoning_effort: str | None = None
    # what the response reports
    return_iterations: bool = False
    return_token_ids: bool = False
    # accepted and ignored (they ask nothing of the model)
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # refused when they ask for something (see `unsupported_fields`)
    logprobs: Any = None
    logit_bias: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None


class CompletionBody(_Body):
    prompt: Any = None
    echo: Any = None
    best_of: Any = None
    suffix: Any = None


class ChatBody(_Body):
    messages: Any = None
    max_completion_tokens: int | None = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    verbosity: Any = None


def parse_body(raw: bytes, kind: type[_Body]) -> _Body:
    """The request body as `kind`; APIError 400 naming the field for malformed JSON, wrong types, unknown fields."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON: {err}", None) from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}", None)
    try:
        return kind.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(p) for p in first["loc"]]
        param = loc[0] if loc else None
        if first["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {param}", param,
                           code="unknown_parameter") from None
        raise APIError(400, f"invalid value for `{param}`: {first['msg']}", param, code="invalid_type") from None


def unsupported_fields(body: _Body) -> None:
    """APIError 400 for a field of OpenAI's API that asks for something this server does not do."""
    asked = {"logit_bias": bool(body.logit_bias), "frequency_penalty": bool(body.frequency_penalty),
             "presence_penalty": bool(body.presence_penalty)}
    if isinstance(body, CompletionBody):
        asked.update(logprobs=body.logprobs is not None, echo=bool(body.echo), suffix=bool(body.suffix),
                     best_of=body.best_of is not None and body.best_of != body.n)
    else:
        formats = body.response_format is not None and body.response_format not in ({"type": "text"}, "text")
        asked.update(logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs is not None,
                     tools=bool(body.tools), functions=bool(body.functions), response_format=formats,
                     tool_choice=body.tool_choice not in (None, "none", "auto"),
                     function_call=body.function_call not in (None, "none", "auto"),
                     audio=body.audio is not None, prediction=body.prediction is not None,
                     modalities=body.modalities not in (None, ["text"]))
    for name, is_asked in asked.items():
        if is_asked:
            raise unsupported(name)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the served model and engine allow: the context (tokens per slot), the depth cap, the tokenizer."""

    max_len: int
    max_steps: int
    vocab_size: int
    tokenizer: Tokenizer | None = None
    chat: bool = False  # whether the tokenizer renders conversations


@dataclasses.dataclass
class Job:
    """What one HTTP request asks: the engine requests (one per choice, prompt-major), the prompts' lengths, and
    how its output is reported."""

    requests: list[Request]
    prompt_tokens: list[int]  # per prompt
    n: int
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    return_iterations: bool
    return_token_ids: bool
    text_stop_ids: tuple[int, ...]  # ids whose text is left out of the output (the stops, EOS)


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise bad_request(message, param)


def effort_steps(effort: str, max_steps: int) -> int:
    """The iterations per token `reasoning_effort` asks for: a fraction of the server's cap (at least 1)."""
    return max(1, round(REASONING_EFFORT[effort] * max_steps))


def depth_params(body: _Body, limits: Limits) -> DepthParams:
    """The recurrence fields, checked against the cap; reasoning_effort sets num_steps when it is not given."""
    num_steps = body.num_steps
    if body.reasoning_effort is not None:
        _check(body.reasoning_effort in REASONING_EFFORT, f"reasoning_effort must be one of "
               f"{sorted(REASONING_EFFORT)}, got {body.reasoning_effort!r}", "reasoning_effort")
        if num_steps is None:
            num_steps = effort_steps(body.reasoning_effort, limits.max_steps)
    if num_steps is not None:
        _check(num_steps >= 1, f"num_steps must be at least 1, got {num_steps}", "num_steps")
        _check(num_steps <= limits.max_steps, f"num_steps ({num_steps}) is above this server's cap, "
               f"--max_steps={limits.max_steps}", "num_steps")
    criterion = None if body.exit_criterion in (None, "none") else body.exit_criterion
    _check(criterion is None or criterion in DEFAULT_THRESHOLDS, f"unknown exit_criterion {body.exit_criterion!r};"
           f" expected 'none' or one of {sorted(DEFAULT_THRESHOLDS)}", "exit_criterion")
    if body.exit_threshold is not None:
        _check(criterion is not None, "exit_threshold needs an exit_criterion", "exit_threshold")
        _check(body.exit_threshold >= 0, f"exit_threshold must be non-negative, got {body.exit_threshold}",
               "exit_threshold")
    _check(body.min_steps is None or body.min_steps >= 0, f"min_steps must be non-negative, got {body.min_steps}",
           "min_steps")
    _check(body.check_every is None or body.check_every >= 1,
           f"check_every must be at least 1, got {body.check_every}", "check_every")
    _check(body.init_scale is None or body.init_scale >= 0,
           f"init_scale must be non-negative, got {body.init_scale}", "init_scale")
    return DepthParams(num_steps=num_steps, exit_criterion=criterion, exit_threshold=body.exit_threshold,
                       min_steps=body.min_steps or 0, check_every=body.check_every or 1,
                       continuous=bool(body.continuous), init_scale=body.init_scale)


def sampling_params(body: _Body, choice: int) -> SamplingParams:
    """OpenAI's sampling defaults (temperature 1, no filters); choice i of a request samples from seed + i."""
    temperature = 1.0 if body.temperature is None else body.temperature
    _check(temperature >= 0, f"temperature must be non-negative, got {temperature}", "temperature")
    _check(body.top_p is None or 0 < body.top_p <= 1, f"top_p must be in (0, 1], got {body.top_p}", "top_p")
    _check(body.top_k is None or body.top_k >= -1, f"top_k must be positive (0 or -1: off), got {body.top_k}",
           "top_k")
    _check(body.min_p is None or 0 <= body.min_p <= 1, f"min_p must be in [0, 1], got {body.min_p}", "min_p")
    return SamplingParams(temperature=float(temperature), top_k=body.top_k if body.top_k and body.top_k > 0 else None,
                          top_p=body.top_p if body.top_p is not None and body.top_p < 1 else None,
                          min_p=body.min_p or None, seed=(body.seed + choice) % SEED_MODULUS)


def _stops(body: _Body, limits: Limits) -> tuple[str, ...]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    _check(len(stops) <= MAX_STOPS, f"at most {MAX_STOPS} stop strings, got {len(stops)}", "stop")
    _check(all(stops), "stop strings must not be empty", "stop")
    _check(not stops or limits.tokenizer is not None, "stop strings need a tokenizer; this model serves token ids "
           "only (use stop_token_ids)", "stop")
    return tuple(stops)


def _prompts(prompt: Any, limits: Limits) -> list[list[int]]:
    """OpenAI's prompt forms: a string, a list of token ids, or a list of either (one choice group each)."""
    def ids(value: Any) -> list[int]:
        if isinstance(value, str):
            _check(limits.tokenizer is not None, "this model has no tokenizer: give the prompt as token ids",
                   "prompt")
            return list(limits.tokenizer.encode(value))
        _check(isinstance(value, list) and all(type(t) is int for t in value),
               "prompt must be a string, a list of token ids, or a list of these", "prompt")
        _check(all(0 <= t < limits.vocab_size for t in value),
               f"prompt token ids must be in [0, {limits.vocab_size})", "prompt")
        return list(value)

    _check(prompt is not None, "prompt is required", "prompt")
    many = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
    prompts = [ids(p) for p in prompt] if many else [ids(prompt)]
    _check(all(prompts), "a prompt must have at least one token", "prompt")
    return prompts


def _content(message: dict, i: int) -> str:
    """A message's text: a string, or OpenAI's list of text parts."""
    content = message.get("content")
    if isinstance(content, list):
        _check(all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content), "only text content parts are supported", f"messages[{i}].content")
        return "".join(p["text"] for p in content)
    _check(isinstance(content, str), "message content must be a string or a list of text parts",
           f"messages[{i}].content")
    return content


def chat_prompt(messages: Any, limits: Limits) -> list[int]:
    """The conversation in the tokenizer's chat template, ending in the assistant's header."""
    _check(limits.tokenizer is not None and limits.chat, "this model has no chat template: use /v1/completions",
           "messages")
    _check(isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages),
           "messages must be a non-empty list of {role, content} objects", "messages")
    rendered = []
    for i, message in enumerate(messages):
        role = message.get("role")
        role = "system" if role == "developer" else role
        _check(role in ("system", "user", "assistant"), f"unsupported role {role!r} (system, developer, user, "
               "assistant)", f"messages[{i}].role")
        rendered.append({"role": role, "content": _content(message, i)})
    try:
        ids, _ = render_chat(limits.tokenizer, rendered, add_generation_prompt=True)
    except ValueError as err:
        raise bad_request(f"the conversation cannot be encoded: {err}", "messages") from None
    return ids


def make_job(body: _Body, limits: Limits) -> Job:
    """The engine requests of a validated body; APIError 400 naming the parameter for what the model or the
    engine cannot do."""
    unsupported_fields(body)
    _check(1 <= body.n <= MAX_N, f"n must be in [1, {MAX_N}], got {body.n}", "n")
    chat = isinstance(body, ChatBody)
    prompts = [chat_prompt(body.messages, limits)] if chat else _prompts(body.prompt, limits)
    where = "messages" if chat else "prompt"
    longest = max(map(len, prompts))
    _check(longest < limits.max_len, f"the prompt has {longest} tokens; this server's context is {limits.max_len} "
           "tokens including the completion", where)
    name = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(body, name)
    if max_tokens is None:
        max_tokens = limits.max_len - longest if chat else DEFAULT_COMPLETION_TOKENS
    _check(max_tokens >= 1, f"{name} must be at least 1, got {max_tokens}", name)
    _check(longest + max_tokens <= limits.max_len, f"the prompt ({longest} tokens) plus {name} ({max_tokens}) "
           f"exceeds this server's context of {limits.max_len} tokens", name)
    stop_ids = list(body.stop_token_ids or [])
    _check(all(0 <= t < limits.vocab_size for t in stop_ids), f"stop_token_ids must be in [0, {limits.vocab_size})",
           "stop_token_ids")
    tokenizer = limits.tokenizer
    eos = () if tokenizer is None else (chat_stop_ids(tokenizer) if chat else (tokenizer.eos_id,))
    eos = tuple(t for t in eos if 0 <= t < limits.vocab_size)
    stops_ids = tuple(dict.fromkeys([*stop_ids, *(() if body.ignore_eos else eos)]))
    options = body.stream_options or {}
    _check(body.stream or not options, "stream_options needs stream: true", "stream_options")
    unknown = sorted(set(options) - {"include_usage", "include_obfuscation"})
    _check(not unknown, f"unknown stream_options {unknown}", "stream_options")
    if body.seed is None:
        body = body.model_copy(update={"seed": secrets.randbelow(SEED_MODULUS)})
    depth = depth_params(body, limits)
    requests = [Request(prompt=tuple(p), max_tokens=max_tokens, sampling=sampling_params(body, i), depth=depth,
                        stop_ids=stops_ids) for p in prompts for i in range(body.n)]
    return Job(requests=requests, prompt_tokens=[len(p) for p in prompts], n=body.n, stops=_stops(body, limits),
               stream=body.stream, include_usage=bool(options.get("include_usage")),
               return_iterations=body.return_iterations,
               return_token_ids=body.return_token_ids or tokenizer is None,
               text_stop_ids=tuple(dict.fromkeys([*stops_ids, *eos])))


def usage(prompt_tokens: Sequence[int], steps: Sequence[Sequence[int]], prompt_steps: Sequence[int]) -> dict:
    """OpenAI's usage, and the work done: iterations of the core block in all (`total_iterations`), per generated
    token (`mean_iterations`) and the prompt's prefill (`prompt_iterations`: its depth, or where adaptive exit
    stopped the prompt's last position)."""
    completion = sum(map(len, steps))
    total = sum(map(sum, steps))
    return {"prompt_tokens": sum(prompt_tokens), "completion_tokens": completion,
            "total_tokens": sum(prompt_tokens) + completion, "total_iterations": total,
            "mean_iterations": round(total / completion, 4) if completion else 0.0,
            "prompt_iterations": max(prompt_steps, default=0)}
