"""Chat conversations as token ids with an assistant mask, for fine-tuning (`data.kind="chat"`) and the chat CLI.

Two templates, chosen by the tokenizer:
- **huginn** (a tokenizer with huginn-0125's header tokens): BOS, then per message
  `<|begin_header|>{role}<|end_header|>\\n\\n{content.strip()}<|end_turn|>`, role assistant printed as `Huginn`
  (reference §2.8; the same text as `tokenizer.apply_chat_template`); the generation prompt is
  `<|begin_header|>Huginn<|end_header|>\\n\\n`; a finished conversation ends with `<|end_text|>`. A turn ends at
  `<|end_turn|>`.
- **plain** (any other tokenizer, e.g. SentencePiece models trained here): BOS, then per message the ids of
  `{Role}:` (System, User, Assistant), of `{content.strip()}` and EOS, each text encoded on its own (SentencePiece's
  dummy prefix makes it read `User: hi`); the generation prompt is the ids of `Assistant:`. A turn ends at EOS.

The assistant mask is True on the tokens of every assistant message's content and its turn end (so the model learns
to stop), False on headers, other roles and the final `<|end_text|>`.

A tokenizer of a small task vocabulary (the shell game's) may say more for a chat: `chat_hint`, what a user may
write (shown when a message has other words), and `chat_single_turn`, that its conversations are one question and
the answer (so a chat starts every message anew, as the fine-tuning data had them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from recurrent_depth.data.tokenizer import HUGINN_SPECIALS, Tokenizer

ROLES = ("system", "user", "assistant")
_ASSISTANT_ALIASES = ("assistant", "Huginn")


def template_name(tokenizer: Tokenizer) -> str:
    """'huginn' when the tokenizer has huginn-0125's header and end-of-turn tokens, else 'plain'."""
    token_id = getattr(tokenizer, "token_id", None)
    if token_id is None:
        return "plain"
    try:
        for name in ("begin_header", "end_header", "end_turn"):
            token_id(HUGINN_SPECIALS[name])
    except ValueError:
        return "plain"
    return "huginn"


def _role(message: dict) -> str:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f"a chat message needs 'role' and 'content', got {message!r}")
    role = message["role"]
    if not isinstance(message["content"], str):
        raise ValueError(f"chat message content must be a string, got {type(message['content']).__name__}")
    if role in _ASSISTANT_ALIASES:
        return "assistant"
    if role not in ROLES:
        raise ValueError(f"unknown chat role {role!r}; valid roles: {ROLES} ('Huginn' = assistant)")
    return role


def render_chat(tokenizer: Tokenizer, messages: Iterable[dict], *,
                add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """The conversation's token ids and, per token, whether it belongs to an assistant turn (content + turn end).

    With `add_generation_prompt` the ids end with the assistant header, ready for generation; otherwise a huginn
    conversation ends with EOS (`<|end_text|>`), a plain one with its last turn's EOS."""
    ids, mask = [tokenizer.bos_id], [False]

    def put(tokens: Sequence[int], assistant: bool):
        ids.extend(tokens)
        mask.extend([assistant] * len(tokens))

    huginn = template_name(tokenizer) == "huginn"
    if huginn:
        begin, end_header, end_turn = (tokenizer.token_id(HUGINN_SPECIALS[n])
                                       for n in ("begin_header", "end_header", "end_turn"))
    for message in messages:
        role = _role(message)
        assistant = role == "assistant"
        content = message["content"].strip()
        if huginn:
            put([begin, *tokenizer.encode("Huginn" if assistant else role), end_header], False)
            put([*tokenizer.encode("\n\n" + content), end_turn], assistant)
        else:
            put(tokenizer.encode(f"{role.capitalize()}:"), False)
            put([*tokenizer.encode(content), tokenizer.eos_id], assistant)
    if add_generation_prompt:
        if huginn:
            put([begin, *tokenizer.encode("Huginn"), end_header, *tokenizer.encode("\n\n")], False)
        else:
            put(tokenizer.encode("Assistant:"), False)
    elif huginn:
        put([tokenizer.eos_id], False)
    return ids, mask


def chat_hint(tokenizer: Tokenizer) -> str | None:
    """What a user may write to a model of this tokenizer, where its vocabulary is a task's (else None)."""
    return getattr(tokenizer, "chat_hint", None)


def single_turn(tokenizer: Tokenizer) -> bool:
    """Whether a conversation in this tokenizer's chat format is one user message and its answer."""
    return bool(getattr(tokenizer, "chat_single_turn", False))


def chat_stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The tokens that end an assistant turn: EOS, and `<|end_turn|>` and BOS for the huginn template (the stops the
    original's generators always use, reference §2.8)."""
    if template_name(tokenizer) == "huginn":
        return (tokenizer.bos_id, tokenizer.eos_id, tokenizer.token_id(HUGINN_SPECIALS["end_turn"]))
    return (tokenizer.eos_id,)
