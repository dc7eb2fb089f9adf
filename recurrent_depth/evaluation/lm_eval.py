"""lm-evaluation-harness adapter: registers the model as `recurrent_depth` (optional dependency, the `eval` extra).

lm-eval finds models only in its own registry, so this module must be imported first; its command line does that
and then runs lm-eval's:

  python -m recurrent_depth.cli.lm_eval --model recurrent_depth \
      --model_args checkpoint=huginn-0125,num_steps=32,dtype=bfloat16 --tasks arc_easy,hellaswag --batch_size 16

Model args: checkpoint (required), num_steps (default: the model's mean_recurrence), dtype, batch_size,
mesh (data x fsdp x tensor, e.g. 1x-1x1), tokenizer, config, init_scale (0), seed, exit_criterion and
exit_threshold (adaptive exit), max_gen_toks (256), add_bos_token (true).  Like the original's evaluation:
loglikelihood for multiple choice, loglikelihood_rolling for perplexity, generate_until for GSM8K and the like,
with `--apply_chat_template` using huginn-0125's chat format.  Every process of a multi-host run evaluates
every request (the mesh spans them), so lm-eval sees a single rank.
"""

from __future__ import annotations

import collections
import sys

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from recurrent_depth.data.tokenizer import apply_chat_template
from recurrent_depth.evaluation.engine import Depth, generate_text
from recurrent_depth.evaluation.runner import load_eval_model
from recurrent_depth.evaluation.tasks import rolling_windows


@register_model("recurrent_depth")
class RecurrentDepthHarnessLM(LM):
    """A recurrent-depth checkpoint as an lm-eval model, evaluated at one depth."""

    def __init__(self, checkpoint: str, num_steps: int | None = None, dtype: str | None = None,
                 batch_size: int | str = 8, mesh: str = "1x-1x1", tokenizer: str | None = None,
                 config: str | None = None, init_scale: float = 0.0, seed: int = 0,
                 exit_criterion: str | None = None, exit_threshold: float | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool = True, max_batch_size: int | None = None, device: str | None = None):
        super().__init__()
        del max_batch_size, device  # lm-eval passes them to every model; JAX places the work on the mesh
        size = str(batch_size)
        self.lm = load_eval_model(checkpoint, tokenizer=tokenizer, config=config, dtype=dtype, mesh=str(mesh),
                                  batch_size=8 if size.startswith("auto") else int(size), init_scale=init_scale,
                                  seed=seed)
        self.lm.add_bos = add_bos_token
        steps = self.lm.config.mean_recurrence if num_steps is None else int(num_steps)
        self.depth = Depth(steps, exit_criterion, exit_threshold)
        self.max_gen_toks = int(max_gen_toks)
        self.mean_steps: list[float] = []  # mean iterations per scored/generated token of each call

    # ---- lm-eval's three request types -------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding would produce the continuation)."""
        pairs = [self.lm.encode_pair(context, continuation) for context, continuation in
                 (r.args for r in requests)]
        scores = self.lm.loglikelihood(pairs, self.depth, desc="loglikelihood")
        self._note_steps(scores.steps, [len(c) for _, c in pairs])
        out = [(float(lp), bool(g)) for lp, g in zip(scores.logprob, scores.greedy)]
        for request, result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings after BOS, in context-sized windows (each token scored once)."""
        pairs, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            windows = rolling_windows(self.lm.tokenizer.encode(text), self.lm.tokenizer.bos_id,
                                      self.lm.config.max_seq_len)
            pairs += windows
            owner += [i] * len(windows)
        scores = self.lm.loglikelihood(pairs, self.depth, desc="loglikelihood_rolling")
        self._note_steps(scores.steps, [len(c) for _, c in pairs])
        out = np.bincount(owner, scores.logprob, len(requests)).tolist()
        for request, result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations up to the first `until` string (greedy unless do_sample), grouped by settings."""
        groups = collections.defaultdict(list)
        for i, request in enumerate(requests):
            context, kwargs = request.args
            groups[repr(sorted((kwargs or {}).items()))].append((i, context, dict(kwargs or {})))
        out = [""] * len(requests)
        for items in tqdm(groups.values(), desc="generate_until", disable=disable_tqdm or len(groups) == 1):
            kwargs = items[0][2]
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.pop("do_sample", False))
            sampling = {k: kwargs.pop(k) for k in ("temperature", "top_k", "top_p") if k in kwargs}
            sampling = {"temperature": 1.0, **sampling} if sample else {}  # greedy unless do_sample
            if kwargs:
                print(f"recurrent_depth: ignoring generation settings {sorted(kwargs)}", file=sys.stderr)
            texts, generations = generate_text(self.lm, [c for _, c, _ in items], self.depth, max_new, until,
                                               "generate_until", **sampling)
            self._note_steps(generations.steps / np.maximum(generations.num_tokens, 1), generations.num_tokens)
            for (i, _, _), text in zip(items, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    # ---- chat template and bookkeeping -------------------------------------------------------------------
    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return apply_chat_template(chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return "recurrent_depth-" + type(self.lm.tokenizer).__name__

    def chat_template(self, chat_template: bool | str = False) -> str:
        return "huginn-0125" if chat_template else ""

    @property
    def max_length(self) -> int:
        return self.lm.config.max_seq_len

    def _note_steps(self, steps, tokens) -> None:
        if len(tokens) and np.sum(tokens):
            self.mean_steps.append(float(np.average(steps, weights=tokens)))
