"""The chat CLI (recurrent_depth.cli.chat over recurrent_depth.decoding.chat_session), driven as a user would: its
main() with piped input, on a tiny random model with a tiny SentencePiece tokenizer; and the streaming hook of both
samplers."""

import io
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from recurrent_depth.checkpoint.params import save_params
from recurrent_depth.cli import chat as chat_cli
from recurrent_depth.data.chat_template import chat_stop_ids, render_chat
from recurrent_depth.data.shell_game import ShellGameTokenizer
from recurrent_depth.data.tokenizer import load_tokenizer
from recurrent_depth.decoding import chat_session as chat
from recurrent_depth.decoding.generate import generate
from recurrent_depth.decoding.parallel import parallel_generate
from recurrent_depth.model.config import ModelConfig
from recurrent_depth.model.lm import RecurrentDepthLM, init_params

from helpers import load_config, write_mixture_corpus

NEW = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint dir, tokenizer file, model, params, tokenizer): the tiny config with a 128-token context."""
    root = tmp_path_factory.mktemp("chat")
    corpus = write_mixture_corpus(root / "corpus")
    config = ModelConfig.from_dict(load_config("tiny").model).replace(max_seq_len=128)
    model = RecurrentDepthLM(config)
    params = nn.meta.unbox(init_params(model, jax.random.key(0)))
    save_params(root / "params", config, params)
    tok_file = corpus / "sp.model"
    return root / "params", tok_file, model, params, load_tokenizer("sentencepiece", tok_file)


def run_chat(setup, lines, *flags):
    """(exit code, stdout, stderr) of a session fed `lines`."""
    checkpoint, tok_file = setup[:2]
    out, err = io.StringIO(), io.StringIO()
    stderr, sys.stderr = sys.stderr, err
    try:
        code = chat_cli.main([f"--checkpoint={checkpoint}", f"--tokenizer={tok_file}", f"--max_new_tokens={NEW}",
                          "--num_steps=4", *flags], stdin=io.StringIO("".join(f"{x}\n" for x in lines)), out=out)
    finally:
        sys.stderr = stderr
    return code, out.getvalue(), err.getvalue()


def expected(setup, messages, sampler=generate, **kw):
    """The reply the sampler gives for `messages`, decoded (without the stop token); and its steps."""
    _, _, model, params, tok = setup
    ids, _ = render_chat(tok, messages, add_generation_prompt=True)
    padded = chat.pad_prompt(ids, 128 - NEW)  # as the chat pads, and with its callback: no new compilation
    out = sampler(model, params, padded, lengths=[len(ids)], max_new_tokens=NEW, num_steps=4,
                  stop_tokens=chat_stop_ids(tok), stream=chat._stream, **kw)
    tokens = [int(t) for t in out.tokens[0, :int(out.num_tokens[0])]
              if t not in chat_stop_ids(tok) and t < tok.vocab_size]  # the model's vocabulary is larger
    return tok.decode(tokens), np.asarray(out.steps[0, :int(out.num_tokens[0])])


def transcript(setup, sampler: str, *turns) -> str:
    """The terminal output of a session: the header, then per input line its prompt and what follows."""
    return f"[{setup[0]}: {sampler} sampler; /reset starts over, /quit ends]\n" + "".join(
        f"> {t}\n" for t in turns) + "> "


def steps_line(steps) -> str:
    return f"[iterations per token: {' '.join(map(str, steps))} (mean {steps.mean():.1f})]"


def test_streamed_replies_equal_generate_and_history_is_kept(setup):
    code, stdout, stderr = run_chat(setup, ["hello there", "the core block", "/reset", "hello there", "/quit"],
                                    "--system=be brief", "--show_steps")
    assert code == 0, stderr
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    first, steps = expected(setup, messages)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "the core block"}]
    second, steps2 = expected(setup, messages)
    assert stdout == transcript(setup, "generate", f"{first}\n{steps_line(steps)}", f"{second}\n{steps_line(steps2)}",
                                "[new conversation]", f"{first}\n{steps_line(steps)}")  # /reset: the same again


def test_stream_hook_reports_growing_final_tokens(setup, monkeypatch):
    _, _, model, params, tok = setup
    ids = render_chat(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True)[0]
    for sampler in (generate, parallel_generate):
        calls = []  # recorded through the chat's callback: the chat's compilations serve
        monkeypatch.setattr(chat, "_printer", lambda t, n, s, calls=calls: calls.append(
            (np.array(t), np.array(n), np.array(s))))
        out = sampler(model, params, chat.pad_prompt(ids, 128 - NEW), lengths=[len(ids)], max_new_tokens=NEW,
                      num_steps=4, stream=chat._stream)
        counts = np.stack([n for _, n, _ in calls])  # [calls, batch]
        assert len(calls) > 1 and np.all(np.diff(counts, axis=0) >= 0), sampler.__name__
        assert np.all(counts[-1] == out.num_tokens)
        tokens, _, steps = calls[-1]
        np.testing.assert_array_equal(tokens, out.tokens)
        np.testing.assert_array_equal(steps, out.steps)
        for t, n, _ in calls:  # a prefix of the final output, -1 after it
            np.testing.assert_array_equal(t[0, :n[0]], np.asarray(out.tokens)[0, :n[0]])
            assert np.all(t[0, n[0]:] == -1)


def test_parallel_sampler_streams_its_output(setup):
    code, stdout, stderr = run_chat(setup, ["hello there"], "--sampler=parallel", "--exit_threshold=0.5")
    assert code == 0, stderr
    want, _ = expected(setup, [{"role": "user", "content": "hello there"}], parallel_generate,
                       exit_threshold=0.5)
    assert stdout == transcript(setup, "parallel", want) + "\n"  # end of input ends the session


def test_long_conversation_drops_oldest_turns_but_keeps_the_system_prompt(setup):
    long = " ".join(["the state iterates"] * 4)  # ~40 tokens: three turns exceed 128 - NEW
    session = chat.ChatSession(*setup[2:], system="be brief", max_new_tokens=NEW, out=io.StringIO(), num_steps=2)
    for _ in range(4):
        assert session.reply(long) is not None
    assert "[the conversation exceeds the context: dropped the" in session.out.getvalue()
    assert session.messages[0] == {"role": "system", "content": "be brief"}
    assert len(render_chat(setup[4], session.messages)[0]) <= 128
    assert session.reply(" ".join(["the core"] * 200)) is None  # one message larger than the context
    assert "does not fit the model's context" in session.out.getvalue()
    assert session.messages[-1]["role"] == "assistant"  # the over-long message is not kept


def test_bad_input_gives_a_message(setup, tmp_path):
    """Bad input: status 1 and one line `python -m recurrent_depth.cli.chat: error: ...`, no traceback."""
    code, _, stderr = run_chat(setup, [])
    assert code == 0
    code, _, stderr = run_chat((tmp_path / "missing", setup[1]), [])
    assert code == 1 and "chat: error: checkpoint" in stderr and "does not exist" in stderr
    assert stderr.startswith(f"{chat_cli.PROG}: error: ") and stderr.count("\n") == 1
    code, _, stderr = run_chat((tmp_path, setup[1]), [])
    assert code == 1 and "is neither a Hugging Face checkpoint" in stderr and "Traceback" not in stderr
    code, _, stderr = run_chat(setup, [], "--sampler=parallel", "--exit_criterion=kl")
    assert code == 1 and "--exit_criterion is for --sampler=generate" in stderr
    code, stdout, stderr = run_chat(setup, ["/help", "hi"], "--num_steps=0")
    assert code == 1 and "num_steps must be a positive integer" in stderr and "[unknown command /help" in stdout
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    with pytest.raises(ValueError, match=r"the tokenizer \(ShellGameTokenizer\) has no chat template"):
        chat.check_chat_template(ShellGameTokenizer())


def test_usage_errors_have_status_2(setup):
    code, stdout, stderr = run_chat(setup, ["hi"], "--sampler=beam")
    assert code == 2 and "chat: error: flag --sampler=beam" in stderr and stdout == ""  # before any session
    code, _, stderr = run_chat(setup, [], "extra")
    assert code == 2 and "takes no positional arguments" in stderr
