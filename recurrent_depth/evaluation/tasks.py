"""Evaluation tasks: perplexity, multiple choice, generative (GSM8K protocol), reasoning-gym problems and the
demo's shell game.

A task is given on the command line as `KIND:TARGET[:KEY=VALUE...]` (see `parse_task`); each reads and checks its
data when built, before any model is loaded, and `evaluate(lm, depth)` returns its metrics at one depth.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import ClassVar

import numpy as np
from etils import epath

from recurrent_depth.data import shell_game
from recurrent_depth.data.chat_template import render_chat
from recurrent_depth.data.tokenizer import apply_chat_template
from recurrent_depth.evaluation import answers, records
from recurrent_depth.evaluation.engine import Depth, EvalModel, Generations, generate_text

GEN_STOP_STRINGS = ("Question:", "</s>", "<|im_end|>")  # lm-eval's gsm8k `until`


@dataclasses.dataclass
class TaskResult:
    metrics: dict[str, float]  # higher-level numbers for the table, results.json and the plots
    samples: list[dict]  # one record per example (written to samples/<task>/<setting>.jsonl)


class Task(abc.ABC):
    """A named evaluation over one data source."""

    kind: str
    OPTIONS: ClassVar[dict[str, type]] = {}  # KEY=VALUE options of the command-line spec and their types

    def __init__(self, name: str):
        self.name = name

    @abc.abstractmethod
    def evaluate(self, lm: EvalModel, depth: Depth) -> TaskResult: ...

    @abc.abstractmethod
    def info(self) -> dict:
        """What was evaluated (source, size, options), for results.json."""


def _with_steps(metrics: dict, depth: Depth, steps, tokens) -> dict:
    """Adds the mean iterations per token under adaptive exit (steps [n] per-token means over tokens [n])."""
    if depth.adaptive:
        metrics["mean_steps"] = float(np.average(steps, weights=np.maximum(tokens, 1e-9)))
    return metrics


class PerplexityTask(Task):
    """Loss (nats per token), perplexity and bits per byte of text documents, each scored on its own with
    lm-eval's rolling windows (every token predicted once, BOS first, windows as long as the context)."""

    kind = "perplexity"
    OPTIONS: ClassVar[dict[str, type]] = {"field": str, "limit": int}

    def __init__(self, name: str, path: str, field: str = "text", limit: int | None = None):
        super().__init__(name)
        self.path, self.field = str(path), field
        self.documents = [d for d in records.documents(path, field, limit) if d]
        if not self.documents:
            raise records.TaskFileError(f"{path} holds no text")

    def info(self) -> dict:
        return {"kind": self.kind, "path": self.path, "documents": len(self.documents),
                "bytes": sum(len(d.encode("utf-8")) for d in self.documents)}

    def evaluate(self, lm: EvalModel, depth: Depth) -> TaskResult:
        pairs, owner = [], []
        for i, doc in enumerate(self.documents):
            windows = rolling_windows(lm.tokenizer.encode(doc), lm.tokenizer.bos_id, lm.config.max_seq_len)
            pairs += windows
            owner += [i] * len(windows)
        scores = lm.loglikelihood(pairs, depth, desc=f"{self.name} {depth.label}")
        tokens = np.asarray([len(c) for _, c in pairs])
        nll = -np.bincount(owner, scores.logprob, len(self.documents))
        num_tokens, num_bytes = tokens.sum(), sum(len(d.encode("utf-8")) for d in self.documents)
        loss = float(nll.sum() / num_tokens)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                   "bits_per_byte": float(nll.sum() / num_bytes / math.log(2))}
        samples = [{"document": i, "tokens": int(t), "nll": float(v)}
                   for i, (t, v) in enumerate(zip(np.bincount(owner, tokens, len(self.documents)), nll))]
        return TaskResult(_with_steps(metrics, depth, scores.steps, tokens), samples)


def rolling_windows(tokens: list[int], prefix: int, window: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs predicting every token once, in chunks of `window` tokens, with at most
    `window` inputs each; the last chunk gets a full window of context (lm-eval's rolling windows)."""
    seq = [prefix] + list(tokens)
    pairs = []
    for start in range(1, len(seq), window):
        end = min(start + window, len(seq))
        first = max(0, end - 1 - window)
        pairs.append((seq[first:start], seq[start:end]))
    return pairs


class MultipleChoiceTask(Task):
    """Accuracy of the choice with the highest summed log-likelihood (acc) and of the highest per character
    of the choice text (acc_norm), both as lm-eval computes them."""

    kind = "multiple_choice"
    OPTIONS: ClassVar[dict[str, type]] = {"format": str, "limit": int}

    def __init__(self, name: str, path: str, format: str | None = None, limit: int | None = None):
        super().__init__(name)
        self.path, self.format = str(path), format
        self.questions = records.multiple_choice(path, format, limit)

    def info(self) -> dict:
        return {"kind": self.kind, "path": self.path, "format": self.format, "questions": len(self.questions)}

    def evaluate(self, lm: EvalModel, depth: Depth) -> TaskResult:
        pairs = [lm.encode_pair(c, x) for q in self.questions for c, x in zip(q.contexts, q.continuations)]
        scores = lm.loglikelihood(pairs, depth, desc=f"{self.name} {depth.label}")
        samples, start, correct, correct_norm = [], 0, 0, 0
        for q in self.questions:
            lls = scores.logprob[start:start + len(q.continuations)]
            start += len(q.continuations)
            pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / np.asarray(q.lengths)))
            correct, correct_norm = correct + (pred == q.gold), correct_norm + (pred_norm == q.gold)
            samples.append({"line": q.line, "loglikelihoods": lls.tolist(), "pred": pred, "pred_norm": pred_norm,
                            "gold": q.gold})
        metrics = {"acc": correct / len(self.questions), "acc_norm": correct_norm / len(self.questions)}
        tokens = np.asarray([len(x) for _, x in pairs])
        return TaskResult(_with_steps(metrics, depth, scores.steps, tokens), samples)


def qa_prompt(question: str, shots: list[tuple[str, str]], chat: bool, system: str | None) -> str:
    """lm-eval's gsm8k prompt: `Question: ...\\nAnswer:` after k solved examples; with `chat`, the examples as
    user/assistant turns in huginn-0125's chat template (lm-eval's --apply_chat_template
    --fewshot_as_multiturn); a system prompt as the system turn or, without chat, as the first paragraph."""
    if chat:
        messages = [{"role": "system", "content": system}] if system else []
        for q, a in shots:
            messages += [{"role": "user", "content": f"Question: {q}\nAnswer:"}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": f"Question: {question}\nAnswer:"})
        return apply_chat_template(messages, add_generation_prompt=True)
    parts = ([system] if system else []) + [f"Question: {q}\nAnswer: {a}" for q, a in shots]
    return "\n\n".join(parts + [f"Question: {question}\nAnswer:"])


def _per_token(out: Generations) -> tuple[np.ndarray, np.ndarray]:
    """(mean iterations per generated token [n], generated tokens [n]) of each prompt."""
    return out.steps / np.maximum(out.num_tokens, 1), out.num_tokens


class GenerativeTask(Task):
    """Question answering by greedy generation, scored by exact match of the strict (`#### N`) and flexible
    (last number) extractions against the reference answer: the GSM8K protocol of the paper (reference §4.1).

    Solved examples for k-shot prompts come from `fewshot` (a JSONL file of the same format) or else from the
    start of the task file, and are then not scored.
    """

    kind = "generative"
    OPTIONS: ClassVar[dict[str, type]] = {"k": int, "fewshot": str, "chat": bool, "system": str,
                                          "max_new_tokens": int, "limit": int}

    def __init__(self, name: str, path: str, k: int = 0, fewshot: str | None = None, chat: bool = False,
                 system: str | None = None, max_new_tokens: int = 256, limit: int | None = None):
        super().__init__(name)
        if k < 0 or max_new_tokens < 1:
            raise ValueError(f"task {name}: k must be >= 0 and max_new_tokens >= 1, got {k} and {max_new_tokens}")
        self.path, self.k, self.fewshot, self.chat, self.system = str(path), k, fewshot, chat, system
        self.max_new_tokens = max_new_tokens
        items = records.questions(path, None if limit is None else limit + (0 if fewshot else k))
        shots = records.questions(fewshot, k) if fewshot and k else items[:k]
        self.items = items if fewshot else items[k:]
        if len(shots) < k or not self.items:
            raise records.TaskFileError(f"task {name}: {len(shots)} solved examples for k={k} and "
                                        f"{len(self.items)} questions left to score")
        self.shots = [(q, a) for _, q, a in shots]

    def info(self) -> dict:
        return {"kind": self.kind, "path": self.path, "questions": len(self.items), "k": self.k,
                "fewshot": self.fewshot, "chat": self.chat, "system": self.system,
                "max_new_tokens": self.max_new_tokens}

    def evaluate(self, lm: EvalModel, depth: Depth) -> TaskResult:
        prompts = [qa_prompt(q, self.shots, self.chat, self.system) for _, q, _ in self.items]
        responses, out = generate_text(lm, prompts, depth, self.max_new_tokens, GEN_STOP_STRINGS,
                                       f"{self.name} {depth.label}")
        samples, strict, flexible = [], 0, 0
        for (line, question, answer), response in zip(self.items, responses):
            s, f = answers.extract_strict(response), answers.extract_flexible(response)
            strict += answers.exact_match(s, answer)
            flexible += answers.exact_match(f, answer)
            samples.append({"line": line, "question": question, "answer": answer, "response": response,
                            "strict": s, "flexible": f})
        n = len(self.items)
        return TaskResult(_with_steps({"exact_match_strict": strict / n, "exact_match_flexible": flexible / n},
                                      depth, *_per_token(out)), samples)


class ReasoningGymTask(Task):
    """Procedurally generated problems of a `reasoning-gym` dataset (fixed seed and size), answered by greedy
    generation and scored by the dataset's own checker on the response's first line (metric `score`, 0-1).

    Any option other than those listed configures the dataset (e.g. `max_terms=3` for basic_arithmetic).
    """

    kind = "reasoning_gym"
    OPTIONS: ClassVar[dict[str, type]] = {"size": int, "seed": int, "k": int, "chat": bool, "system": str,
                                          "max_new_tokens": int}

    def __init__(self, name: str, dataset: str, size: int = 100, seed: int = 0, k: int = 0, chat: bool = False,
                 system: str | None = None, max_new_tokens: int = 64, **config):
        super().__init__(name)
        try:
            import reasoning_gym
        except ImportError as err:
            raise ImportError("reasoning-gym tasks need the reasoning-gym package: pip install "
                              "'recurrent-depth[eval]'") from err
        if size < 1 or k < 0:
            raise ValueError(f"task {name}: size must be >= 1 and k >= 0, got {size} and {k}")
        try:
            self.data = reasoning_gym.create_dataset(dataset, size=size, seed=seed, **config)
            shots = reasoning_gym.create_dataset(dataset, size=k, seed=seed + 1, **config) if k else []
        except (KeyError, TypeError, ValueError, AssertionError) as err:
            raise ValueError(f"task {name}: reasoning-gym cannot build {dataset!r} with {config or 'defaults'}: "
                             f"{err}") from None
        self.dataset, self.size, self.seed, self.k, self.config = dataset, size, seed, k, config
        self.chat, self.system, self.max_new_tokens = chat, system, max_new_tokens
        self.entries = list(self.data)
        self.shots = [(e["question"], str(e["answer"])) for e in shots]

    def info(self) -> dict:
        return {"kind": self.kind, "dataset": self.dataset, "size": self.size, "seed": self.seed, "k": self.k,
                "config": self.config, "chat": self.chat, "system": self.system,
                "max_new_tokens": self.max_new_tokens}

    def evaluate(self, lm: EvalModel, depth: Depth) -> TaskResult:
        prompts = [qa_prompt(e["question"], self.shots, self.chat, self.system) for e in self.entries]
        responses, out = generate_text(lm, prompts, depth, self.max_new_tokens, GEN_STOP_STRINGS + ("\n\n",),
                                       f"{self.name} {depth.label}")
        samples, total = [], 0.0
        for entry, response in zip(self.entries, responses):
            answer = next((line.strip() for line in response.splitlines() if line.strip()), "")
            score = float(self.data.score_answer(answer, entry))
            total += score
            samples.append({"question": entry["question"], "answer": str(entry["answer"]), "response": response,
                            "score": score})
        return TaskResult(_with_steps({"score": total / len(self.entries)}, depth, *_per_token(out)), samples)


class ShellGameTask(Task):
    """Held-out problems of the demo's shell game (recurrent_depth.data.shell_game) with MIN..MAX swaps (lengths evenly
    spread), from a random stream that training never reads.  Metric `acc`: the model's argmax after the last
    swap is the cup that hides the ball.  With `chat`, each problem is the chat variant's prompt (the swaps as the
    user's turn, then the assistant's header; recurrent_depth.data.chat_template) and the answer its next token."""

    kind = "shell_game"
    OPTIONS: ClassVar[dict[str, type]] = {"size": int, "seed": int, "chat": bool}

    def __init__(self, name: str, lengths: str, size: int = 512, seed: int = 0, chat: bool = False):
        super().__init__(name)
        try:
            lo, _, hi = lengths.partition("-")
            self.lengths = (int(lo), int(hi or lo))
        except ValueError:
            raise ValueError(f"task {name}: lengths must be MIN-MAX or one number, got {lengths!r}") from None
        if not 1 <= self.lengths[0] <= self.lengths[1] or size < 1:
            raise ValueError(f"task {name}: need 1 <= MIN <= MAX and size >= 1, got {lengths!r} and {size}")
        self.size, self.seed, self.chat = size, seed, chat
        self.problems = shell_game.held_out_problems(size, seed, self.lengths)

    def info(self) -> dict:
        return {"kind": self.kind, "lengths": list(self.lengths), "size": self.size, "seed": self.seed,
                "chat": self.chat}

    def _prompt(self, tokenizer, swaps: list[int]) -> list[int]:
        if not self.chat:
            return [tokenizer.bos_id, *swaps]
        user = {"role": "user", "content": tokenizer.decode(swaps)}
        return render_chat(tokenizer, [user], add_generation_prompt=True)[0]

    def evaluate(self, lm: EvalModel, depth: Depth) -> TaskResult:
        pairs = [(self._prompt(lm.tokenizer, swaps), [cup]) for swaps, cup in self.problems]
        scores = lm.loglikelihood(pairs, depth, desc=f"{self.name} {depth.label}")
        samples = [{"swaps": lm.tokenizer.decode(swaps), "ball": lm.tokenizer.decode([cup]), "length": len(swaps),
                    "correct": bool(ok)} for (swaps, cup), ok in zip(self.problems, scores.greedy)]
        metrics = {"acc": float(np.mean(scores.greedy))}
        return TaskResult(_with_steps(metrics, depth, scores.steps, np.ones(len(pairs))), samples)


KINDS: dict[str, type[Task]] = {"ppl": PerplexityTask, "perplexity": PerplexityTask, "mc": MultipleChoiceTask,
                                "multiple_choice": MultipleChoiceTask, "gen": GenerativeTask,
                                "generative": GenerativeTask, "rg": ReasoningGymTask,
                                "reasoning_gym": ReasoningGymTask, "shell": ShellGameTask,
                                "shell_game": ShellGameTask}


def _value(text: str, kind: type | None):
    """A KEY=VALUE option's value as `kind` (None: the most specific of int, float, bool, str)."""
    lowered = text.lower()
    if kind is bool or (kind is None and lowered in ("true", "false")):
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected a boolean, got {text!r}")
        return lowered in ("true", "1", "yes")
    for candidate in ((kind,) if kind is not None else (int, float)):
        try:
            return candidate(text)
        except ValueError:
            if kind is not None:
                raise ValueError(f"expected {kind.__name__}, got {text!r}") from None
    return text


def parse_task(spec: str, defaults: dict | None = None) -> Task:
    """A task from `KIND:TARGET[:KEY=VALUE...]`; KIND is ppl, mc, gen or rg (or the long names), TARGET a file
    or, for rg, a reasoning-gym dataset name; option `name=` renames the task.  `defaults` (e.g. chat, system)
    apply to the kinds that have those options."""
    kind, _, rest = spec.partition(":")
    if kind not in KINDS or not rest:
        raise ValueError(f"task {spec!r}: expected KIND:TARGET[:KEY=VALUE...] with KIND one of {sorted(KINDS)}")
    cls = KINDS[kind]
    target, *options = rest.split(":")
    name = f"{kind}:{target if cls in (ReasoningGymTask, ShellGameTask) else epath.Path(target).stem}"
    kwargs = {k: v for k, v in (defaults or {}).items() if k in cls.OPTIONS and v is not None}
    for option in options:
        key, eq, text = option.partition("=")
        if not eq or not key:
            raise ValueError(f"task {spec!r}: option {option!r} is not KEY=VALUE")
        if key == "name":
            name = text
        elif key in cls.OPTIONS or cls is ReasoningGymTask:
            try:
                kwargs[key] = _value(text, cls.OPTIONS.get(key))
            except ValueError as err:
                raise ValueError(f"task {spec!r}: option {key}: {err}") from None
        else:
            raise ValueError(f"task {spec!r}: unknown option {key!r}; {kind} takes {sorted(cls.OPTIONS)} and name")
    return cls(name, target, **kwargs)


def parse_tasks(specs: list[str | Task], defaults: dict | None = None) -> list[Task]:
    """Tasks from their specs (Task objects pass through); names must be unique."""
    tasks = [spec if isinstance(spec, Task) else parse_task(spec, defaults) for spec in specs]
    if not tasks:
        raise ValueError("no tasks given")
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"task names must be unique, got {duplicates} more than once (rename with :name=...)")
    return tasks
