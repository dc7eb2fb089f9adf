"""Data and stand-ins shared by the evaluation tests: a byte tokenizer, small task files, a scripted model."""

import json
from pathlib import Path

import numpy as np

from recurrent_depth.evaluation.engine import Generations

from helpers import TINY

ROOT = Path(__file__).parents[2]  # the repository: eval.py
TINY_CHECKPOINT = TINY / "checkpoint"

GSM8K_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                "altogether in April and May.\n#### 72")


class CharTokenizer:
    """UTF-8 bytes as ids 4..259 (0 pad, 1 BOS, 2 EOS): a tokenizer without merges for exact expectations."""

    pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 260

    def encode(self, text):
        return [b + 4 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 4 for i in ids if i >= 4).decode("utf-8", errors="replace")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MC_ROWS = [{"context": "The sky is", "choices": ["blue", "green", "a cat"], "gold": 0},
           {"context": "2 + 2 =", "choices": ["4", "five"], "gold": 1},
           {"context": "Paris is in", "choices": ["France", "Spain", "Peru", "Chad"], "gold": 0}]
GEN_ROWS = [{"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
            {"question": "What is 7-1?", "answer": "#### 6"},
            {"question": "What is 1+1?", "answer": "#### 2"}]


class ScriptedLM:
    """Stands in for EvalModel in generative tasks: answers each prompt with `respond(prompt text)`."""

    def __init__(self, respond):
        self.tokenizer, self.respond, self.prompts = CharTokenizer(), respond, []

    def encode(self, text):
        return [self.tokenizer.bos_id] + self.tokenizer.encode(text)

    def stop_ids(self):
        return [self.tokenizer.eos_id]

    def generate(self, prompts, depth, max_new_tokens, stop_ids, desc=""):
        texts = [self.tokenizer.decode(p) for p in prompts]
        self.prompts += texts
        tokens = [self.tokenizer.encode(self.respond(t)) for t in texts]
        counts = np.asarray([len(t) + 1 for t in tokens])
        return Generations(tokens, counts * 3, counts)
