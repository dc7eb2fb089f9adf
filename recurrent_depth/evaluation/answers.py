"""Answer extraction and exact match, as lm-eval's `gsm8k` task does it (the protocol of the paper, reference §4.1).

strict: the number after the first `#### `; flexible: the last number in the response.  Predictions and references
are compared after removing commas, `$`, everything up to `#### ` and a final period, case-insensitively.
"""

from __future__ import annotations

import re

INVALID = "[invalid]"  # lm-eval's fallback when nothing matches
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))


def _extract(pattern: re.Pattern, text: str, which: int) -> str:
    """The `which`-th match of `pattern` (its first non-empty group), stripped; INVALID if none."""
    matches = pattern.findall(text)
    if not matches:
        return INVALID
    match = matches[which]
    if isinstance(match, tuple):
        match = next((group for group in match if group), INVALID)
    return match.strip()


def extract_strict(response: str) -> str:
    """The answer after the first `#### ` marker (GSM8K's answer format)."""
    return _extract(_STRICT, response, 0)


def extract_flexible(response: str) -> str:
    """The last number in the response."""
    return _extract(_FLEXIBLE, response, -1)


def normalize(answer: str) -> str:
    """lm-eval's gsm8k normalisation: drop commas, `$`, anything up to `#### `, a final period; lower case."""
    for pattern in _IGNORE:
        answer = pattern.sub("", answer)
    return answer.lower()


def exact_match(prediction: str, reference: str) -> bool:
    """Whether an extracted prediction equals the reference (e.g. a full GSM8K answer ending in `#### 72`)."""
    return normalize(prediction) == normalize(reference)
