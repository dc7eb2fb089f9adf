"""Fixtures of the evaluation tests: task files, the tiny model as an EvalModel, direct log-probabilities, and a
Hugging Face checkpoint with a tokenizer.json."""

import json
import shutil

import jax
import numpy as np
import pytest

from recurrent_depth.data.tokenizer import BOS, EOS, PAD
from recurrent_depth.evaluation import EvalModel
from recurrent_depth.runtime.sharding import make_mesh

from eval_data import GEN_ROWS, MC_ROWS, TINY_CHECKPOINT, CharTokenizer, write_jsonl


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_data")
    (path / "doc.txt").write_text("hello world, this is some text. " * 3)
    return {"mc": write_jsonl(path / "mc.jsonl", MC_ROWS), "gen": write_jsonl(path / "gen.jsonl", GEN_ROWS),
            "doc": path / "doc.txt", "dir": path}


@pytest.fixture(scope="session")
def lm(tiny):
    """The tiny model on one device, batch 4."""
    model, params = tiny
    return EvalModel(model, params, CharTokenizer(), mesh=make_mesh((1, 1, 1), jax.devices()[:1]), batch_size=4,
                     progress=False)


@pytest.fixture(scope="session")
def direct(tiny):
    """Summed log-probabilities of sequence tails from one plain forward pass (no padding masks: causal attention
    keeps the zeros after each sequence out of its positions)."""
    model, params = tiny
    forward = jax.jit(lambda ids, r: model.apply({"params": params}, ids, num_steps=r, init_scale=0.0).logits)

    def logprobs(sequences, starts, num_steps):
        ids = np.zeros((len(sequences), model.config.max_seq_len), np.int32)
        for i, seq in enumerate(sequences):
            ids[i, :len(seq)] = seq
        logits = np.asarray(forward(ids, num_steps), np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        return [sum(logp[i, t - 1, seq[t]] for t in range(start, len(seq)))
                for i, (seq, start) in enumerate(zip(sequences, starts))]

    return logprobs


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """The tiny checkpoint with a byte-level BPE tokenizer.json (vocab 300, huginn-0125's special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("hf") / "checkpoint"
    shutil.copytree(TINY_CHECKPOINT, path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, "<|begin_header|>", "<|end_header|>", "<|end_turn|>", PAD]
    text = [json.dumps(MC_ROWS + GEN_ROWS), "Question: Answer: Calculate 12 + 7 * 3 - 4."] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path / "tokenizer.json"))
    return path
