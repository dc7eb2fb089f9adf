"""The chat CLI (recurrent_depth.cli.chat over recurrent_depth.decoding.chat_session), driven as a user would: its
main() with piped input, on a tiny random model with a tiny SentencePiece tokenizer and on the SFT demo's fine-tuned
shell-game model; the streaming hook of both samplers; the dtype a checkpoint loads in."""

import io
import json
import shutil
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from recurrent_depth.checkpoint.loading import load_model
from recurrent_depth.checkpoint.params import save_params
from recurrent_depth.cli import chat as chat_cli
from recurrent_depth.cli import shell_game as shell_game_cli
from recurrent_depth.data.chat_rows import encode_conversation
from recurrent_depth.data.chat_template import chat_stop_ids, render_chat
from recurrent_depth.data.shell_game import ShellGameTokenizer
from recurrent_depth.data.tokenizer import load_tokenizer
from recurrent_depth.decoding import chat_session as chat
from recurrent_depth.decoding.generate import generate
from recurrent_depth.decoding.parallel import parallel_generate
from recurrent_depth.model.config import ModelConfig
from recurrent_depth.model.lm import RecurrentDepthLM, init_params
from recurrent_depth.runtime.config_file import load_config_file
from recurrent_depth.training.loop import train

from helpers import load_config, write_mixture_corpus

NEW = 12
FIXTURES = Path(__file__).parents[1] / "fixtures"
TINY_CHECKPOINT = FIXTURES / "huginn-tiny" / "checkpoint"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint dir, tokenizer file, model, params, tokenizer): the tiny config with a 128-token context; the
    model and parameters loaded from the checkpoint as the chat loads them (placed on a device: the samplers' calls
    here then reuse the chat's compilations, and it theirs)."""
    root = tmp_path_factory.mktemp("chat")
    corpus = write_mixture_corpus(root / "corpus")
    config = ModelConfig.from_dict(load_config("tiny").model).replace(max_seq_len=128)
    save_params(root / "params", config, nn.meta.unbox(init_params(RecurrentDepthLM(config), jax.random.key(0))))
    model, params = load_model(root / "params")
    assert model.config == config
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


def test_a_checkpoint_loads_in_its_config_dtype(setup, tmp_path, monkeypatch):
    """A Hugging Face checkpoint whose config.json says bfloat16 (as huginn-0125's) chats in bfloat16 unless --dtype
    says otherwise."""
    checkpoint = shutil.copytree(TINY_CHECKPOINT, tmp_path / "bf16")
    hf = json.loads((checkpoint / "config.json").read_text())
    hf.pop("dtype", None)
    (checkpoint / "config.json").write_text(json.dumps({**hf, "torch_dtype": "bfloat16"}))
    loaded = []
    session = chat_cli.ChatSession
    monkeypatch.setattr(chat_cli, "ChatSession", lambda model, params, *args, **kw: loaded.append(
        (model.config.dtype, {str(x.dtype) for x in jax.tree.leaves(params)})) or session(model, params, *args, **kw))
    assert run_chat((checkpoint, setup[1]), [])[0] == 0
    assert run_chat((checkpoint, setup[1]), [], "--dtype=float32")[0] == 0
    assert loaded == [("bfloat16", {"bfloat16"}), ("float32", {"float32"})]


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
    no_headers = type("NoHeaders", (ShellGameTokenizer,), {"encode": lambda self, text: [] if text == "" else
                                                           ShellGameTokenizer.encode(self, text.replace(":", ""))})()
    with pytest.raises(ValueError, match=r"the tokenizer \(NoHeaders\) has no chat template: .*'System' is neither"):
        chat.check_chat_template(no_headers)


def test_usage_errors_have_status_2(setup):
    code, stdout, stderr = run_chat(setup, ["hi"], "--sampler=beam")
    assert code == 2 and "chat: error: flag --sampler=beam" in stderr and stdout == ""  # before any session
    code, _, stderr = run_chat(setup, [], "extra")
    assert code == 2 and "takes no positional arguments" in stderr


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
    """The README's SFT demo (configs/sft_demo.py from the demo checkpoint on the shell game's chat data), cut to two
    steps: a workdir as `python train.py --config=configs/sft_demo.py --workdir=workdir-sft` writes it."""
    root = tmp_path_factory.mktemp("sft")
    assert shell_game_cli.main(["chat-data", f"--output={root / 'chat.jsonl'}", "--size=40"]) == 0
    config = load_config_file(FIXTURES.parent.parent / "configs" / "sft_demo.py",
                              f"{FIXTURES / 'shell-game-demo'},{root / 'chat.jsonl'}")
    config.train.update(steps=2, batch_size=8, log_every=1)
    config.train.optimizer.update(warmup_steps=1, decay_steps=1)
    config.mesh.shape = (1, -1, 1)  # the demo runs on one CPU device; the tests have eight
    config.model.update(mean_recurrence=2, mean_backprop_depth=1)  # a faster compilation; the chat's default depth
    train(config, root / "workdir-sft")
    return root / "workdir-sft", config


def test_the_sft_demo_model_chats_in_its_fine_tuning_format(sft_workdir):
    """The newcomer's first chat: `--checkpoint=workdir-sft` answers swaps in the SFT data's template, one question
    per conversation; words outside the shell game get a one-line notice, and the chat goes on."""
    workdir, config = sft_workdir
    out, err = io.StringIO(), io.StringIO()
    stderr, sys.stderr = sys.stderr, err
    try:
        code = chat_cli.main([f"--checkpoint={workdir}", "--system="], out=out,
                             stdin=io.StringIO("ab cd bd\nhello there\nab cd bd\n/quit\n"))
    finally:
        sys.stderr = stderr
    assert code == 0, err.getvalue()
    tok, model_params = ShellGameTokenizer(), load_model(workdir)
    # The prompt is the SFT data's conversation up to the assistant's answer, as chat_rows encoded it for training.
    conversation, mask = encode_conversation(tok, {"messages": [{"role": "user", "content": "ab cd bd"},
                                                                {"role": "assistant", "content": "d"}]},
                                             config.data.chat, 65)
    prompt, _ = render_chat(tok, [{"role": "user", "content": "ab cd bd"}], add_generation_prompt=True)
    assert prompt == list(conversation[:int(np.argmax(mask))])
    room = 64 - 32  # the default reply length: half the demo's 64 positions
    reply = generate(*model_params, chat.pad_prompt(prompt, room), lengths=[len(prompt)], max_new_tokens=32,
                     stop_tokens=chat_stop_ids(tok), stream=chat._stream)
    answer = tok.decode([t for t in np.asarray(reply.tokens[0, :int(reply.num_tokens[0])]) if t != tok.eos_id])
    hint = ShellGameTokenizer.chat_hint
    assert out.getvalue() == (f"[{workdir}: generate sampler; /reset starts over, /quit ends]\n"
                              f"[{hint}; each message is a new conversation]\n"
                              f"> {answer}\n"  # the same answer twice: the second question is a new conversation
                              f"> ['hello' is neither a swap of two cups 'abcde' (like 'ab'), a cup nor one of "
                              f"('System:', 'User:', 'Assistant:'); {hint}]\n"
                              f"> {answer}\n> ")
    stderr, sys.stderr = sys.stderr, (err := io.StringIO())
    try:
        code = chat_cli.main([f"--checkpoint={workdir}", "--system=You are helpful."], stdin=io.StringIO(), out=out)
    finally:
        sys.stderr = stderr
    assert code == 1 and err.getvalue().count("\n") == 1  # a one-line message
    assert "chat: error: the system prompt cannot be encoded: 'You' is neither a swap" in err.getvalue()
