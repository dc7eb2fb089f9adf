"""Chat conversations as ids with assistant masks: huginn-0125's template and the plain one."""

import numpy as np
import pytest

from recurrent_depth.data.chat_template import chat_stop_ids, render_chat, template_name
from recurrent_depth.data.tokenizer import apply_chat_template, train_sentencepiece

from helpers import train_huginn_style_tokenizer

TEXT = "You are brief. What is 2+2? It is 4. And 3+3? Six, of course.\n"
CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": " What is 2+2? "},
        {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3+3?"},
        {"role": "Huginn", "content": "Six, of course."}]


@pytest.fixture(scope="module")
def huginn_tok(tmp_path_factory):
    return train_huginn_style_tokenizer(tmp_path_factory.mktemp("hf"), TEXT)


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp")
    (path / "c.txt").write_text(TEXT * 200, encoding="utf-8")
    return train_sentencepiece([path / "c.txt"], path / "sp", vocab_size=400)


def _assistant_text(tok, ids, mask):
    return [tok.decode([i for i, m in zip(ids, mask) if m])]


def test_huginn_template_matches_the_text_template(huginn_tok):
    assert template_name(huginn_tok) == "huginn"
    for prompt in (True, False):
        ids, mask = render_chat(huginn_tok, CHAT, add_generation_prompt=prompt)
        assert ids == huginn_tok.encode(apply_chat_template(CHAT, add_generation_prompt=prompt))
        assert len(mask) == len(ids)
    ids, mask = render_chat(huginn_tok, CHAT)
    assert _assistant_text(huginn_tok, ids, mask) == ["\n\nIt is 4.<|end_turn|>\n\nSix, of course.<|end_turn|>"]
    assert not mask[-1] and ids[-1] == huginn_tok.eos_id
    assert set(chat_stop_ids(huginn_tok)) == {huginn_tok.bos_id, huginn_tok.eos_id, huginn_tok.token_id("<|end_turn|>")}


def test_plain_template(plain_tok):
    assert template_name(plain_tok) == "plain"
    ids, mask = render_chat(plain_tok, CHAT)
    eos = plain_tok.eos_id
    assert ids[0] == plain_tok.bos_id and ids[-1] == eos and mask[-1]
    turns = np.split(np.array(ids[1:]), np.flatnonzero(np.array(ids[1:]) == eos)[:-1] + 1)
    assert [plain_tok.decode(t[:-1]) for t in turns] == [
        "System: You are brief.", "User: What is 2+2?", "Assistant: It is 4.", "User: And 3+3?",
        "Assistant: Six, of course."]
    assert [plain_tok.decode([i for i, m in zip(ids, mask) if m and i != eos])] == ["It is 4. Six, of course."]
    prompt, prompt_mask = render_chat(plain_tok, CHAT[:2], add_generation_prompt=True)
    last_turn_end = len(prompt) - 1 - prompt[::-1].index(eos)
    assert plain_tok.decode(prompt[last_turn_end + 1:]) == "Assistant:" and not any(prompt_mask)
    assert chat_stop_ids(plain_tok) == (eos,)


@pytest.mark.parametrize("bad, match", [({"role": "robot", "content": "x"}, "unknown chat role"),
                                        ({"content": "x"}, "needs 'role' and 'content'"),
                                        ({"role": "user", "content": 3}, "must be a string")])
def test_bad_messages(plain_tok, bad, match):
    with pytest.raises(ValueError, match=match):
        render_chat(plain_tok, [bad])
