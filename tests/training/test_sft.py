"""Chat fine-tuning: chat data (masks, packing, sharding, resume, bad rows), train.init_from's checks and resume,
the recipes (configs/sft_huginn.py, configs/sft_demo.py) and the stop ids of huginn-0125's evaluation."""

import json
import shutil
import types

import numpy as np
import pytest

from recurrent_depth.cli import shell_game as shell_game_cli
from recurrent_depth.data import shell_game
from recurrent_depth.data.batch import IGNORE_INDEX
from recurrent_depth.data.chat_rows import ChatReader, encode_conversation
from recurrent_depth.data.chat_template import render_chat
from recurrent_depth.data.pipeline import make_dataset
from recurrent_depth.data.shell_game import ShellGameTokenizer
from recurrent_depth.errors import ChatDataError, ConfigError
from recurrent_depth.runtime.config_file import load_config_file
from recurrent_depth.training.optimizers import make_schedule
from recurrent_depth.training.step import Trainer, check_init_from
from recurrent_depth.training.validation import validate_run_config

from helpers import FIXTURES, TINY, load_config, small_config, train_huginn_style_tokenizer

CONFIGS = FIXTURES.parent.parent / "configs"
TOK = ShellGameTokenizer()


def _user(text):
    return {"role": "user", "content": text}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _chat_config(path, **chat):
    config = load_config("sft_demo").data
    config.sources = ({"paths": str(path)},)  # kind left out: data.kind='chat' makes it a chat source
    config.chat.update(chat)
    return config


def _batches(config, steps, batch_size=1, seq_len=15, rows=None):
    it = iter(make_dataset(config, batch_size=batch_size, seq_len=seq_len, vocab_size=32, seed=0, rows=rows))
    return [next(it) for _ in range(steps)]


def test_labels_are_exactly_the_assistant_tokens_and_conversations_pack_with_document_masking(tmp_path):
    # <s> User: ab cd </s> Assistant: d </s>  (8 tokens)  and  <s> User: ab </s> Assistant: b </s>  (7 tokens)
    path = _write(tmp_path / "c.jsonl", [{"messages": [_user("ab cd"), {"role": "assistant", "content": "d"}]},
                                         {"question": "ab", "answer": "b"}])
    batch = _batches(_chat_config(path), 1)[0]
    first = 7 if batch["inputs"][0, 3] == TOK.eos_id else 8  # the shuffled order: which conversation comes first
    lengths = (first, 15 - first)
    np.testing.assert_array_equal(batch["segment_ids"][0], [1] * lengths[0] + [2] * lengths[1])
    np.testing.assert_array_equal(batch["positions"][0], [*range(lengths[0]), *range(lengths[1])])
    # Targets: the answer cup (after `Assistant:`) and its </s>, in each conversation; nothing else.
    targets = {8: [5, 6], 7: [4, 5]}
    expected = targets[lengths[0]] + [lengths[0] + t for t in targets[lengths[1]]]
    assert np.flatnonzero(batch["labels"][0] != IGNORE_INDEX).tolist() == expected
    assert TOK.decode(batch["labels"][0][expected]) == ("d b" if first == 8 else "b d")
    # loss_tokens='all': every next token inside a conversation (not across the boundary, not the padding)
    batch = _batches(_chat_config(path, loss_tokens="all"), 1)[0]
    assert np.flatnonzero(batch["labels"][0] != IGNORE_INDEX).tolist() == [
        *range(lengths[0] - 1), *range(lengths[0], 14)]


def test_system_prompt_is_added_to_conversations_without_one():
    options = _chat_config("unused", system_prompt="ab").chat
    ids, mask = encode_conversation(TOK, {"question": "cd", "answer": "c"}, options, 64)
    assert TOK.decode(ids) == "System: ab User: cd Assistant: c" and ids[0] == TOK.bos_id
    assert TOK.decode(ids[mask]) == "c" and ids[mask][-1] == TOK.eos_id
    own = {"messages": [{"role": "system", "content": "de"}, _user("cd"), {"role": "assistant", "content": "c"}]}
    assert TOK.decode(encode_conversation(TOK, own, options, 64)[0]) == "System: de User: cd Assistant: c"


def test_huginn_template_labels_are_the_huginn_turns(tmp_path):
    tok = train_huginn_style_tokenizer(tmp_path, "What is two plus two? It is four. Be brief.")
    rows = [{"question": "What is two plus two?", "answer": "It is four."}]
    config = _chat_config(_write(tmp_path / "c.jsonl", rows), system_prompt="Be brief.")
    config.tokenizer.update(kind="huggingface", path=str(tmp_path))
    batch = next(iter(make_dataset(config, batch_size=1, seq_len=63, vocab_size=512, seed=0)))
    labels = batch["labels"][0]
    assert tok.decode(labels[labels != IGNORE_INDEX]) == "\n\nIt is four.<|end_turn|>"
    assert "<|begin_header|>system<|end_header|>\n\nBe brief." in tok.decode(batch["inputs"][0])


def test_chat_batches_are_deterministic_independent_of_processes_and_resume(tmp_path):
    path = _write(tmp_path / "c.jsonl", shell_game.chat_rows(40, 0, (1, 6)))
    config = _chat_config(path)
    whole = _batches(config, 12, batch_size=4, seq_len=31)  # several epochs of the 40 conversations
    halves = [_batches(config, 12, batch_size=4, seq_len=31, rows=range(2 * p, 2 * p + 2)) for p in (0, 1)]
    for step, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(batch[key], np.concatenate([h[step][key] for h in halves]), err_msg=key)
    it = iter(make_dataset(config, batch_size=4, seq_len=31, vocab_size=32, seed=0))
    for _ in range(5):
        next(it)
    resumed = iter(make_dataset(config, batch_size=4, seq_len=31, vocab_size=32, seed=0))
    resumed.set_state(json.loads(json.dumps(it.get_state())))
    for step in range(5, 12):
        np.testing.assert_array_equal(next(resumed)["labels"], whole[step]["labels"])
    assert not np.array_equal(whole[0]["inputs"], whole[1]["inputs"])


BAD_ROWS = {
    "invalid JSON": ('{"messages": [', "malformed JSON"),
    "missing role": ({"messages": [{"content": "ab"}, {"role": "assistant", "content": "a"}]}, "needs 'role'"),
    "unknown role": ({"messages": [{"role": "bot", "content": "ab"}, {"role": "assistant", "content": "a"}]},
                     "unknown chat role 'bot'"),
    "no assistant": ({"messages": [_user("ab")]}, "no assistant turn"),
    "too long": ({"question": " ".join(["ab"] * 20), "answer": "a"}, "more than a row's 16"),
}


@pytest.mark.parametrize("name", BAD_ROWS)
def test_a_malformed_row_names_file_and_line(tmp_path, name):
    row, message = BAD_ROWS[name]
    path = _write(tmp_path / "c.jsonl", [{"question": "ab", "answer": "b"}, "", row])
    with pytest.raises(ChatDataError, match=f"{path}:3: .*{message}"):
        _batches(_chat_config(path), 1)


def test_malformed_rows_are_skipped_and_counted_when_asked(tmp_path):
    path = _write(tmp_path / "c.jsonl", [{"question": "ab", "answer": "b"}, *(r for r, _ in BAD_ROWS.values())])
    config = _chat_config(path, skip_malformed=True)
    reader = ChatReader(config.chat, TOK, 16)
    assert len(reader.read([path])) == 1 and reader.log_skipped() == len(BAD_ROWS)
    labels = _batches(config, 2)[1]["labels"][0]
    assert TOK.decode(labels[labels != IGNORE_INDEX]) == "b"  # the one good row, every epoch
    with pytest.raises(ValueError, match="holds no usable conversation"):
        _batches(_chat_config(_write(tmp_path / "bad.jsonl", ["{"]), skip_malformed=True), 1)


def test_init_from_missing_or_mismatched_fails_before_anything_is_built(tmp_path, monkeypatch):
    from recurrent_depth.training import loop as train_loop

    def no_trainer(*args, **kwargs):
        raise AssertionError("the Trainer was built")

    monkeypatch.setattr(train_loop, "Trainer", no_trainer)
    config = small_config()
    config.train.init_from = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="train.init_from=.*nowhere.* does not exist"):
        train_loop.train(config, tmp_path / "run")
    config.train.init_from = str(TINY / "checkpoint")
    config.model.num_heads = 2
    with pytest.raises(ConfigError, match="(?s)train.init_from=.*num_heads: checkpoint 4 != config 2"):
        train_loop.train(config, tmp_path / "run")
    config.model.num_heads = 4
    check_init_from(config, validate_run_config(config))  # matches


def _sft_huginn(tmp_path, steps):
    """configs/sft_huginn.py on the tiny fixture (with a tokenizer.json beside it) and a small chat JSONL."""
    checkpoint = tmp_path / "huginn-tiny"
    shutil.copytree(TINY / "checkpoint", checkpoint)
    facts = [(f"What is {a} plus {b}?", f"It is {a + b}.") for a in range(6) for b in range(6)]
    train_huginn_style_tokenizer(checkpoint, " ".join(q + " " + a for q, a in facts) + " You are a helpful assistant")
    data = _write(tmp_path / "chat.jsonl", [{"question": q, "answer": a} for q, a in facts])
    config = load_config_file(CONFIGS / "sft_huginn.py", f"{checkpoint},{data}")
    config.model = load_config("tiny").model  # the fixture's shape
    config.model.update(dtype="bfloat16", mean_recurrence=4, mean_backprop_depth=2)
    config.train.update(steps=steps, batch_size=8, log_every=5)  # rows of 129 tokens: one conversation each
    config.checkpoint.update(every=steps, async_save=False)
    return config


def test_sft_huginn_is_the_original_recipe(tmp_path):
    config = load_config_file(CONFIGS / "sft_huginn.py", "hf-dir,data.jsonl")
    opt = config.train.optimizer
    assert (opt.name, opt.peak_learning_rate, opt.weight_decay, opt.b1, opt.b2, opt.schedule) == \
        ("adamw", 5e-7, 0.0, 0.9, 0.95, "wsd")
    assert (opt.warmup_steps, opt.decay_steps, opt.end_learning_rate) == (23, 23, pytest.approx(5e-10))
    validate_run_config(config)  # the released shape as it stands
    lr = make_schedule(opt.schedule, opt.peak_learning_rate, opt.warmup_steps, 234, opt.decay_steps,
                       opt.end_learning_rate)
    assert [float(lr(s)) for s in (0, 23, 211, 234)] == pytest.approx([0, 5e-7, 5e-7, 5e-10], rel=1e-5)
    config.train.steps = 1000
    assert (opt.warmup_steps, opt.decay_steps) == (100, 100)
    assert (config.train.batch_size, config.model.mean_recurrence, config.model.mean_backprop_depth,
            config.model.dtype, config.seed) == (32, 32, 8, "bfloat16", 74)
    assert config.train.init_from == config.data.tokenizer.path == "hf-dir"
    assert config.data.sources[0]["paths"] == "data.jsonl" and config.data.kind == "chat"
    validate_run_config(_sft_huginn(tmp_path, 10), num_devices=8)


def test_sft_huginn_fine_tunes_the_tiny_checkpoint_and_resumes_its_own_run(tmp_path, monkeypatch):
    import jax

    from recurrent_depth.training import loop as train_loop

    config = _sft_huginn(tmp_path, 20)
    config.train.optimizer.update(peak_learning_rate=3e-3)  # visible progress in 20 steps
    workdir = tmp_path / "run"
    state = train_loop.train(config, workdir)
    losses = [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
              if "loss" in line]
    assert losses[-1] < losses[0] - 1.0, losses  # the assistant tokens' loss (the only targets: see above)
    # Restarted, the run resumes its own step-20 checkpoint, never the initialisation (init_from is not read).
    monkeypatch.setattr(Trainer, "_load_state", lambda *a: pytest.fail("init_from read on resume"))
    resumed = train_loop.train(config, workdir)
    assert int(state.step) == int(resumed.step) == 20
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), jax.device_get(state.params))


def test_sft_demo_matches_the_demo_checkpoint(tmp_path):
    config = load_config_file(CONFIGS / "sft_demo.py", f"{FIXTURES / 'shell-game-demo'},{tmp_path / 'x.jsonl'}")
    assert shell_game_cli.main(["chat-data", "--output", str(tmp_path / "x.jsonl"), "--size", "50"]) == 0
    check_init_from(config, validate_run_config(config, num_devices=1))  # the demo runs on one CPU device
    rows = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    swaps, cup = rows[0]["messages"][0]["content"].split(), rows[0]["messages"][1]["content"]
    ball = shell_game.track(np.asarray([[shell_game.SWAPS.index("".join(sorted(s))) for s in swaps]]))[0, -1]
    assert len(rows) == 50 and cup == shell_game.CUPS[ball]
    ids, mask = render_chat(TOK, rows[0]["messages"])
    assert TOK.decode(np.asarray(ids)[mask]) == cup


def test_huginn_evaluation_stops_on_the_original_three_stop_tokens(tmp_path):
    """65504 (<|begin_text|>), 65505 (<|end_text|>) and 65508 (<|end_turn|>), as the original's generate."""
    from tokenizers import Tokenizer, models

    from recurrent_depth.data.tokenizer import load_tokenizer
    from recurrent_depth.evaluation.engine import EvalModel

    names = ["<|begin_text|>", "<|end_text|>", "<|begin_header|>", "<|end_header|>", "<|end_turn|>", "<|pad|>"]
    vocab = {"a": 0, **{name: 65504 + i for i, name in enumerate(names)}}
    Tokenizer(models.WordLevel(vocab, unk_token="a")).save(str(tmp_path / "tokenizer.json"))
    lm = types.SimpleNamespace(tokenizer=load_tokenizer("huggingface", tmp_path),
                               config=types.SimpleNamespace(vocab_size=65536))
    assert EvalModel.stop_ids(lm) == [65504, 65505, 65508]
    lm.tokenizer = TOK
    assert EvalModel.stop_ids(lm) == [TOK.eos_id]


def test_a_tokenizer_without_pad_id_pads_with_eos_and_fine_tunes_finitely(tmp_path):
    import sentencepiece as spm

    from recurrent_depth.data.tokenizer import SentencePieceTokenizer
    from recurrent_depth.training.loop import train

    from helpers import small_config

    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"question {i} has the answer {i * 7} and more words" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "default"), vocab_size=120,
                                   minloglevel=2)  # SentencePiece's defaults: no pad id (-1)
    tokenizer = SentencePieceTokenizer(tmp_path / "default.model")
    assert tokenizer._processor.pad_id() == -1 and tokenizer.pad_id == tokenizer.eos_id
    rows = [{"question": f"question {i}", "answer": f"answer {i * 7}"} for i in range(40)]
    config = small_config()
    config.data.update(kind="chat", sources=({"paths": str(_write(tmp_path / "chat.jsonl", rows))},))
    config.data.tokenizer.path = str(tmp_path / "default.model")
    config.train.update(steps=2, log_every=1, seq_len=64)
    train(config, tmp_path / "run")  # every row is padded: whole conversations in rows of 65 tokens
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["skipped_updates"] == 0 for r in records), records
