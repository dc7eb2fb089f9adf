"""The model side of evaluation: sharded log-likelihood scoring and generation at a given depth.

Requests are sorted by length and batched; each batch is right-padded to a power-of-two length bucket (and to a
full batch with empty rows), with segment ids 0 on padding, so padding never changes a score.  The iteration count
is a traced argument: one compilation per (batch, bucket) shape serves the whole sweep.  The initial latent state
is zero (init_scale 0, the default) or drawn from the seed per position and request (keyed by the request's
tokens), so scores depend neither on the batch, the order of requests, nor the mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
import zlib
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from recurrent_depth.data.chat_template import chat_stop_ids
from recurrent_depth.data.tokenizer import Tokenizer
from recurrent_depth.decoding.exit_criteria import ExitCriterion
from recurrent_depth.decoding.generate import generate
from recurrent_depth.model.lm import RecurrentDepthLM, init_params
from recurrent_depth.runtime import sharding

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Depth:
    """One point of a sweep: `num_steps` iterations, or adaptive exit with at most `num_steps`."""

    num_steps: int
    exit_criterion: str | None = None
    exit_threshold: float | None = None  # resolved to the criterion's default when None

    def __post_init__(self):
        if not isinstance(self.num_steps, int) or isinstance(self.num_steps, bool) or self.num_steps < 1:
            raise ValueError(f"iteration counts must be positive integers, got {self.num_steps!r}")
        if self.exit_criterion is not None:
            criterion = ExitCriterion.make(self.exit_criterion, self.exit_threshold)
            object.__setattr__(self, "exit_threshold", criterion.threshold)

    @property
    def adaptive(self) -> bool:
        return self.exit_criterion is not None

    @property
    def label(self) -> str:
        if not self.adaptive:
            return f"r={self.num_steps}"
        return f"{self.exit_criterion}={self.exit_threshold:g}, max {self.num_steps}"


@dataclasses.dataclass
class Scores:
    """Log-likelihoods of continuations given contexts."""

    logprob: np.ndarray  # [n] float64 summed log-probability of each continuation
    greedy: np.ndarray  # [n] bool: every continuation token is the model's argmax
    steps: np.ndarray  # [n] float64 mean iterations per scored token


@dataclasses.dataclass
class Generations:
    tokens: list[list[int]]  # generated ids per prompt, a final stop token removed
    steps: np.ndarray  # [n] int64 iterations over all tokens generated for the prompt
    num_tokens: np.ndarray  # [n] int64 tokens generated (a final stop token included)


def bucket(length: int, cap: int) -> int:
    """The padded length for `length` tokens: the next power of two (at least MIN_BUCKET), at most `cap`."""
    return min(cap, max(MIN_BUCKET, 1 << max(0, math.ceil(math.log2(max(length, 1))))))


def _to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as a numpy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.sharding.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _put(x, target: NamedSharding) -> jax.Array:
    """An array (the same value on every process) placed with `target`."""
    if isinstance(x, jax.Array) and x.sharding == target:  # e.g. parameters loaded straight into their shards
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, target)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


class EvalModel:
    """A model, its parameters sharded over a mesh like in training, and a tokenizer: what tasks evaluate.

    batch_size is rounded up to a multiple of the mesh's batch shards (data x fsdp under the default rules).
    """

    def __init__(self, model: RecurrentDepthLM, params, tokenizer: Tokenizer, *, mesh: Mesh | None = None,
                 rules=sharding.DEFAULT_RULES, batch_size: int = 8, init_scale: float = 0.0, seed: int = 0,
                 add_bos: bool = True, progress: bool = True):
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{model.config.vocab_size}: they do not belong together")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if init_scale < 0:
            raise ValueError(f"init_scale must be >= 0, got {init_scale}")
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.mesh = mesh if mesh is not None else sharding.make_mesh((1, 1, 1), jax.devices()[:1])
        self.rules = tuple(rules)
        self.init_scale, self.seed, self.add_bos = float(init_scale), seed, add_bos
        self.progress = progress and jax.process_index() == 0
        self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
        shards = math.prod(self.mesh.shape[a] for a in _axes(self.batch_sharding.spec[0]))
        self.batch_size = -(-batch_size // shards) * shards
        boxed = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
        self.param_shardings = sharding.logical_shardings(boxed, self.mesh, self.rules)
        self.params = jax.tree.map(_put, nn.meta.unbox(params), self.param_shardings)
        batch, replicated = self.batch_sharding, sharding.replicated(self.mesh)
        self._score = jax.jit(self._score_fn, out_shardings=replicated,
                              in_shardings=(self.param_shardings,) + (batch,) * 5 + (replicated,) * 2)
        self.compilations = 0  # traces of the scoring function (the sweep should not add any)
        # Generation compiles for iteration counts up to max_steps (a sweep sets its largest count), so that every
        # count of a sweep shares one compilation.
        self.max_steps = 1

    # ---- text --------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, with BOS first (unless the text already starts with it, e.g. a chat prompt)."""
        ids = self.tokenizer.encode(text)
        if self.add_bos and (not ids or ids[0] != self.tokenizer.bos_id):
            ids = [self.tokenizer.bos_id] + ids
        return ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval splits them: trailing spaces of the context move to the
        continuation, which is what the whole string's encoding adds to the context's."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.tokenizer.bos_id], self.tokenizer.encode(continuation)
        context_ids = self.encode(context)
        whole = self.encode(context + continuation)
        return context_ids, whole[len(context_ids):]

    def stop_ids(self) -> list[int]:
        """The ids that end a generation: the chat template's stops (EOS; for huginn-0125 also BOS and
        `<|end_turn|>`, the original's 65504, 65505, 65508), those inside the model's vocabulary."""
        return sorted(i for i in set(chat_stop_ids(self.tokenizer)) if 0 <= i < self.config.vocab_size)

    # ---- scoring -----------------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], depth: Depth,
                      desc: str = "score") -> Scores:
        """Summed log-probability of each continuation after its context (token ids; the context non-empty).

        Inputs longer than the context window keep their last tokens.  Under adaptive exit each continuation
        token is one prompt (its prefix) run until the exit criterion fires on its last position: one pass per
        token, so much slower than fixed depth.
        """
        for i, (context, continuation) in enumerate(requests):
            if not len(context) or not len(continuation):
                raise ValueError(f"request {i}: the context and the continuation need at least one token each")
            if len(continuation) > self.config.max_seq_len:
                raise ValueError(f"request {i}: a continuation of {len(continuation)} tokens exceeds the context "
                                 f"window ({self.config.max_seq_len})")
        window = self.config.max_seq_len
        full = [list(c) + list(x) for c, x in requests]
        _warn_cut(sum(len(f) - 1 > window for f in full), window)
        if depth.adaptive:
            return self._adaptive_loglikelihood(requests, depth, desc)
        n = len(requests)
        logprob, greedy = np.zeros(n), np.zeros(n, bool)
        order = sorted(range(n), key=lambda i: -len(full[i]))
        batches = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        with self._context():
            for rows in tqdm(batches, desc=desc, leave=False, disable=not self.progress):
                length = bucket(min(len(full[rows[0]]) - 1, window), window)
                arrays = np.zeros((4, self.batch_size, length), np.int32)  # ids, targets, weights, segments
                for b, i in enumerate(rows):
                    tokens = full[i][-(window + 1):]
                    m, k = len(tokens) - 1, len(requests[i][1])
                    arrays[0, b, :m], arrays[1, b, :m], arrays[3, b, :m] = tokens[:-1], tokens[1:], 1
                    arrays[2, b, m - k:m] = 1
                keys = np.zeros((self.batch_size, 1), np.uint32)  # initial-state key of each row: its tokens
                keys[:len(rows), 0] = [zlib.crc32(np.asarray(full[i], np.int64).tobytes()) for i in rows]
                args = [_put(a, self.batch_sharding) for a in arrays]
                out = self._score(self.params, *args, _put(keys.view(np.int32), self.batch_sharding),
                                  jnp.int32(self.seed), jnp.int32(depth.num_steps))
                lp, gr = _to_host(out[0]), _to_host(out[1])
                logprob[rows], greedy[rows] = lp[:len(rows)], gr[:len(rows)]
        return Scores(logprob, greedy, np.full(n, float(depth.num_steps)))

    def _score_fn(self, params, ids, targets, weights, segments, keys, seed, num_steps):
        """Per row: (summed target log-probability over weighted positions [b], all weighted targets argmax [b]).
        ids/targets/weights/segments [b, s]; keys [b, 1] initial-state key per row."""
        self.compilations += 1
        kwargs = {"num_steps": num_steps, "segment_ids": segments}
        if self.init_scale == 0:
            kwargs["init_scale"] = 0.0
        else:
            kwargs["input_states"] = self._initial_states(params, keys[:, 0], seed, ids.shape[1])
        logits = self.model.apply({"params": params}, ids, **kwargs).logits  # [b, s, vocab] float32
        target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        logprob = target - jax.nn.logsumexp(logits, axis=-1)  # [b, s]
        hit = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
        return jnp.sum(logprob * weights, axis=-1), jnp.all(hit, axis=-1)

    def _initial_states(self, params, rows, seed, length):
        """The model's random initial state, drawn per (row key [b], position) from the seed.  -> [b, s, embed]."""
        base = jax.random.key(seed)
        keys = jax.vmap(lambda r: jax.vmap(lambda p: jax.random.fold_in(jax.random.fold_in(base, r), p))(
            jnp.arange(length)))(rows)
        e = jnp.zeros((1, 1, self.config.hidden_size), self.config.stream_dtype)

        def draw(key):
            return self.model.apply({"params": params}, e, self.init_scale, method=RecurrentDepthLM.initial_state,
                                    rngs={"state": key})[0, 0]

        return jax.vmap(jax.vmap(draw))(keys)

    def _adaptive_loglikelihood(self, requests, depth: Depth, desc: str) -> Scores:
        """Each continuation token scored from its own prefix with a one-token adaptive generation."""
        prompts, owner, targets = [], [], []
        window = self.config.max_seq_len - 1
        for i, (context, continuation) in enumerate(requests):
            tokens = list(context) + list(continuation)
            for j in range(len(context), len(tokens)):
                prompts.append(tokens[max(0, j - window):j])
                owner.append(i)
                targets.append(tokens[j])
        owner, targets = np.asarray(owner), np.asarray(targets)
        logprob, greedy, steps = np.zeros(len(prompts)), np.zeros(len(prompts), bool), np.zeros(len(prompts))
        for rows, out in self._generate_batches(prompts, depth, 1, [], desc, return_logits=True):
            logits = out.logits[:len(rows), 0]  # [rows, vocab]
            lse = np.logaddexp.reduce(logits.astype(np.float64), axis=-1)
            logprob[rows] = logits[np.arange(len(rows)), targets[rows]] - lse
            greedy[rows] = np.argmax(logits, axis=-1) == targets[rows]
            steps[rows] = out.steps[:len(rows), 0]
        n = len(requests)
        count = np.bincount(owner, minlength=n)
        return Scores(np.bincount(owner, logprob, n), np.bincount(owner, ~greedy, n) == 0,
                      np.bincount(owner, steps, n) / count)

    # ---- generation --------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], depth: Depth, max_new_tokens: int,
                 stop_ids: Sequence[int], desc: str = "generate", **sampling) -> Generations:
        """Up to max_new_tokens per prompt (prompts keep their last tokens if too long); greedy unless
        `sampling` gives decoding.generate's temperature / top_k / top_p (drawn from the seed)."""
        n = len(prompts)
        tokens, steps, counts = [None] * n, np.zeros(n, np.int64), np.zeros(n, np.int64)
        stops = set(stop_ids)
        for rows, out in self._generate_batches(prompts, depth, max_new_tokens, stop_ids, desc, **sampling):
            for b, i in enumerate(rows):
                row = out.tokens[b, :out.num_tokens[b]].tolist()
                tokens[i] = row[:-1] if row and row[-1] in stops else row
                steps[i], counts[i] = out.steps[b].sum(), out.num_tokens[b]
        return Generations(tokens, steps, counts)

    def _generate_batches(self, prompts, depth: Depth, max_new_tokens: int, stop_ids, desc: str,
                          return_logits: bool = False, temperature: float = 0.0, top_k: int | None = None,
                          top_p: float | None = None) -> Iterator[tuple[list[int], object]]:
        """(request indices, host copy of decoding.generate's output) per batch, longest prompts first."""
        if max_new_tokens >= self.config.max_seq_len:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be below the context window "
                             f"({self.config.max_seq_len})")
        room = self.config.max_seq_len - max_new_tokens
        _warn_cut(sum(len(p) > room for p in prompts), room)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        with self._context():
            for rows in tqdm(batches, desc=desc, leave=False, disable=not self.progress):
                length = bucket(min(max(len(prompts[rows[0]]), 1), room), room)
                ids, lengths = np.zeros((self.batch_size, length), np.int32), np.ones(self.batch_size, np.int32)
                for b, i in enumerate(rows):
                    prompt = list(prompts[i])[-length:]
                    if not prompt:
                        raise ValueError(f"prompt {i} is empty")
                    ids[b, length - len(prompt):], lengths[b] = prompt, len(prompt)
                out = generate(self.model, self.params, ids, lengths=lengths, max_new_tokens=max_new_tokens,
                               num_steps=depth.num_steps, max_steps=max(self.max_steps, depth.num_steps),
                               init_scale=self.init_scale, temperature=temperature,
                               top_k=top_k, top_p=top_p, stop_tokens=stop_ids, seed=self.seed,
                               exit_criterion=depth.exit_criterion, exit_threshold=depth.exit_threshold,
                               return_logits=return_logits)
                yield rows, jax.tree.map(_to_host, out)

    def _context(self) -> contextlib.ExitStack:
        """Mesh and logical rules in scope, so the model's activation constraints shard over the mesh."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack


def generate_text(lm: EvalModel, prompts: Sequence[str], depth: Depth, max_new_tokens: int,
                  stop_strings: Sequence[str] = (), desc: str = "generate",
                  **sampling) -> tuple[list[str], Generations]:
    """Responses to text prompts (BOS first), each cut before the first of `stop_strings`; and the generations."""
    out = lm.generate([lm.encode(p) for p in prompts], depth, max_new_tokens, lm.stop_ids(), desc, **sampling)
    texts = []
    for tokens in out.tokens:  # ids past the tokenizer's vocabulary (the model's padding rows) decode to nothing
        text = lm.tokenizer.decode([t for t in tokens if t < lm.tokenizer.vocab_size])
        for stop in filter(None, stop_strings):
            text = text.split(stop)[0]
        texts.append(text)
    return texts, out


def _warn_cut(count: int, length: int) -> None:
    if count:
        warnings.warn(f"{count} input(s) longer than the model's context keep only their last {length} tokens",
                      stacklevel=3)


def _axes(entry) -> tuple[str, ...]:
    """Mesh axis names of one PartitionSpec entry."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)
