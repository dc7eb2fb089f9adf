"""Reading task files: JSONL with line-numbered errors, plain text, and the multiple-choice benchmark formats.

Multiple-choice records become (contexts, continuations, gold) exactly as lm-eval's tasks build them (target
delimiter " "), so that accuracies are comparable with the paper's lm-eval numbers.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable

from etils import epath

from recurrent_depth.data.sources import jsonl_records
from recurrent_depth.errors import TaskFileError
from recurrent_depth.runtime.paths import as_path


def check_file(path: str | os.PathLike) -> epath.Path:
    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist" if not path.exists() else
                                f"task file {path} is not a file")
    return path


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a JSONL file (at most `limit` records)."""
    path = check_file(path)
    records = []
    for number, record in jsonl_records(path, TaskFileError):
        if limit is not None and len(records) >= limit:
            break
        records.append((number, record))
    if not records:
        raise TaskFileError(f"{path} holds no records")
    return records


@dataclasses.dataclass(frozen=True)
class Choices:
    """One multiple-choice question as the (context, continuation) pairs to score."""

    line: int  # line of the record in its file
    contexts: tuple[str, ...]  # one per choice (WinoGrande varies the context; the others repeat it)
    continuations: tuple[str, ...]  # one per choice, target delimiter included
    lengths: tuple[int, ...]  # characters of each choice's text, lm-eval's acc_norm denominator
    gold: int


def _hellaswag_text(text: str) -> str:
    """lm-eval's HellaSwag clean-up (WikiHow artifacts)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _labelled(texts, labels, key) -> int:
    labels = [str(label).strip() for label in labels]
    key = str(key).strip()
    if key not in labels:
        raise KeyError(f"answer key {key!r} is not among the labels {labels}")
    return labels.index(key)


def _arc(r):  # HF {question, choices: {text, label}, answerKey} or the original {question: {stem, choices}}
    if isinstance(r["question"], dict):
        stem, options = r["question"]["stem"], r["question"]["choices"]
        texts, labels = [c["text"] for c in options], [c["label"] for c in options]
    else:
        stem, texts, labels = r["question"], r["choices"]["text"], r["choices"]["label"]
    return [f"Question: {stem}\nAnswer:"], texts, _labelled(texts, labels, r["answerKey"])


def _openbookqa(r):  # HF {question_stem, choices: {text, label}, answerKey} or the original {question: {stem, ...}}
    if "question_stem" in r:
        stem, texts, labels = r["question_stem"], r["choices"]["text"], r["choices"]["label"]
    else:
        stem, options = r["question"]["stem"], r["question"]["choices"]
        texts, labels = [c["text"] for c in options], [c["label"] for c in options]
    return [stem], texts, _labelled(texts, labels, r["answerKey"])


def _hellaswag(r):  # {activity_label, ctx_a, ctx_b, endings, label}
    context = _hellaswag_text(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
    return [context], [_hellaswag_text(e) for e in r["endings"]], int(r["label"])


def _piqa(r):  # {goal, sol1, sol2, label}
    return [f"Question: {r['goal']}\nAnswer:"], [r["sol1"], r["sol2"]], int(r["label"])


def _sciq(r):  # {support, question, distractor1..3, correct_answer}
    texts = [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]]
    return [f"{r.get('support', '').lstrip()}\nQuestion: {r['question']}\nAnswer:"], texts, 3


def _winogrande(r):  # {sentence with one "_", option1, option2, answer "1"|"2"}: the option completes the context
    sentence = r["sentence"]
    cut = sentence.index("_")
    contexts = [sentence[:cut] + r["option1"], sentence[:cut] + r["option2"]]
    return contexts, [sentence[cut + 1:].strip()] * 2, int(r["answer"]) - 1


def _mmlu(r):  # {question, choices: [4 texts], answer: int}: lm-eval's letters format
    letters = "ABCDEFGHIJ"[:len(r["choices"])]
    body = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, r["choices"]))
    return [f"{r['question'].strip()}\n{body}\nAnswer:"], list(letters), int(r["answer"])


def _generic(r):  # {context (or query), choices, gold (or label)}: choices follow the context after a space
    context = r["context"] if "context" in r else r["query"]
    gold = r["gold"] if "gold" in r else r["label"]
    return [context], list(r["choices"]), int(gold)


MC_FORMATS: dict[str, Callable] = {"generic": _generic, "arc": _arc, "hellaswag": _hellaswag, "piqa": _piqa,
                                   "sciq": _sciq, "openbookqa": _openbookqa, "winogrande": _winogrande,
                                   "mmlu": _mmlu}
# Detection: the first format whose marker field the record has.
_MARKERS = (("ctx_a", "hellaswag"), ("sol1", "piqa"), ("distractor1", "sciq"), ("option1", "winogrande"),
            ("question_stem", "openbookqa"), ("answerKey", "arc"), ("context", "generic"), ("query", "generic"))


def detect_format(record: dict) -> str | None:
    for field, name in _MARKERS:
        if field in record:
            return name
    if isinstance(record.get("choices"), list) and "question" in record and "answer" in record:
        return "mmlu"
    return None


def multiple_choice(path: str | os.PathLike, fmt: str | None = None, limit: int | None = None) -> list[Choices]:
    """The questions of a multiple-choice JSONL file; `fmt` None detects the format from the first record."""
    records = read_jsonl(path, limit)
    if fmt is not None and fmt not in MC_FORMATS:
        raise TaskFileError(f"unknown multiple-choice format {fmt!r}; valid formats: {sorted(MC_FORMATS)}")
    fmt = fmt or detect_format(records[0][1])
    if fmt is None:
        raise TaskFileError(f"{path}:{records[0][0]}: cannot tell the multiple-choice format from the fields "
                            f"{sorted(records[0][1])}; give format=NAME, one of {sorted(MC_FORMATS)} (generic: "
                            f"context, choices, gold)")
    out = []
    for line, record in records:
        try:
            contexts, texts, gold = MC_FORMATS[fmt](record)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            missing = f"missing field {err}" if isinstance(err, KeyError) and str(err).startswith("'") else str(err)
            raise TaskFileError(f"{path}:{line}: not a {fmt} record ({missing})") from None
        if len(texts) < 2 or not 0 <= gold < len(texts):
            raise TaskFileError(f"{path}:{line}: needs at least two choices and a gold index in range, got "
                                f"{len(texts)} choices and gold {gold}")
        contexts = contexts * len(texts) if len(contexts) == 1 else contexts
        out.append(Choices(line, tuple(contexts), tuple(" " + t for t in texts), tuple(len(t) for t in texts),
                           gold))
    return out


def questions(path: str | os.PathLike, limit: int | None = None) -> list[tuple[int, str, str]]:
    """(line, question, answer) from a JSONL file of {question, answer} records (GSM8K's format)."""
    out = []
    for line, record in read_jsonl(path, limit):
        if not isinstance(record.get("question"), str) or not isinstance(record.get("answer"), (str, int, float)):
            raise TaskFileError(f"{path}:{line}: expected a string 'question' and an 'answer', got fields "
                                f"{sorted(record)}")
        out.append((line, record["question"], str(record["answer"])))
    return out


def documents(path: str | os.PathLike, field: str = "text", limit: int | None = None) -> list[str]:
    """A text file as one document, or the `field` of each record of a .jsonl file."""
    path = check_file(path)
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    docs = []
    for line, record in read_jsonl(path, limit):
        if not isinstance(record.get(field), str):
            raise TaskFileError(f"{path}:{line}: expected a string field {field!r}, got fields {sorted(record)}")
        docs.append(record[field])
    return docs
