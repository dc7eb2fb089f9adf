"""Test helpers without pytest, importable by worker processes too."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from recurrent_depth.runtime.config_file import load_config_file

CONFIGS = Path(__file__).parent.parent / "configs"
FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "huginn-tiny"
TINY_242 = FIXTURES / "huginn-tiny-242"
# XLA's default backend optimisation, which conftest lowers for the suite's speed.  The forwards that tests compile
# themselves to compare with the original at float32 rounding (1e-6) use it, as the library does outside the tests
# (at level 0 one of them measured 1.1e-6); those compiled inside library functions pass at level 0 as well.
XLA_DEFAULT = {"xla_backend_optimization_level": 3}


def load_config(name: str):
    """configs/<name>.py's get_config()."""
    return load_config_file(CONFIGS / f"{name}.py")


def assert_close(actual, expected, rtol=1e-5, name=""):
    """Max error relative to the reference's largest magnitude (the project's parity criterion)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30)
    assert err <= rtol, f"{name}: max relative error {err:.3g} > {rtol:.1g}"


def small_config():
    """The tiny config at a size every mesh axis divides: fast, and with real updates from the first step."""
    config = load_config("tiny")
    config.train.update(batch_size=8, seq_len=32, steps=50, log_every=5)
    config.train.optimizer.update(warmup_steps=0, peak_learning_rate=1e-2)
    return config


def smooth_optimizer_config():
    """small_config with an optimizer whose update is smooth in the gradient (adamw, eps = 1: ~ lr * g).

    Sharded (or accumulated) and single-device gradients agree to ~1e-6 relative, but Adam-type first steps normalise
    each element by |g| + eps, which turns that noise into large differences where |g| is ~eps. A large eps keeps
    the comparison of updated parameters a comparison of gradients (tests/training/test_step.py).
    """
    config = small_config()
    config.train.optimizer.update(name="adamw", eps=1.0, peak_learning_rate=1.0)
    return config


def run_steps(trainer, batches, steps):
    """Runs `steps` train steps; returns the losses and a replicated checksum of the final parameters."""
    state = trainer.init_state()
    losses = []
    for _ in range(steps):
        state, metrics = trainer.step(state, next(batches))
        losses.append(float(metrics["loss"]))
    replicated = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec())
    checksum = jax.jit(lambda p: sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(p)),
                       out_shardings=replicated)(state.params)
    return losses, float(checksum)


def local_iterator(config):
    """An iterator over the batches of config's training data (its state is what a checkpoint restores)."""
    from recurrent_depth.data.pipeline import make_dataset

    return iter(make_dataset(config.data, batch_size=config.train.batch_size, seq_len=config.train.seq_len,
                             vocab_size=config.model.vocab_size, seed=config.seed))


def single_cpu_env() -> dict:
    """The environment for a subprocess (train.py, eval.py, a notebook kernel) on one CPU device: this
    process's environment without conftest's forced device count."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).parent.parent))
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    return env


def eval_requests():
    """(loglikelihood requests, prompts) of token ids for the tiny model: lengths 1-12 and 1-3 tokens, several
    batches of 8 with padding rows."""
    rng = np.random.default_rng(0)
    requests = [(rng.integers(3, 500, 1 + i % 12).tolist(), rng.integers(3, 500, 1 + i % 3).tolist())
                for i in range(19)]
    prompts = [rng.integers(3, 500, 2 + i).tolist() for i in range(10)]
    return requests, prompts


def write_mixture_corpus(directory, seq_len: int = 32) -> Path:
    """A tiny corpus of every source kind in `directory` (returned): JSONL and text documents, a SentencePiece
    tokenizer trained on them, a row store prepared from the JSONL for `seq_len` (`store/`) and the text's tokens
    as Parquet rows of 2 (seq_len + 1) tokens in the released dataset's layout (`rows.parquet`)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from recurrent_depth.data.prepare import prepare
    from recurrent_depth.data.tokenizer import train_sentencepiece

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["the", "core", "block", "iterates", "über", "state", "12", "ok."]
    docs = [" ".join(rng.choice(words, rng.integers(3, 40))) for _ in range(120)]
    with open(directory / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:80])
    (directory / "docs.txt").write_text("\n\n".join(docs[80:]))
    tokenizer = train_sentencepiece([directory / "docs.txt"], directory / "sp", vocab_size=300)
    prepare([str(directory / "docs.jsonl")], tokenizer, directory / "store", seq_len=seq_len, num_shards=2, workers=1)
    stream = np.concatenate([[tokenizer.bos_id, *tokenizer.encode(d), tokenizer.eos_id] for d in docs[80:]])
    rows = stream[:len(stream) // (2 * seq_len + 2) * (2 * seq_len + 2)].reshape(-1, 2 * seq_len + 2)
    pq.write_table(pa.table({"input_ids": pa.array(list(rows.astype(np.int64)), pa.list_(pa.int64()))}),
                   directory / "rows.parquet", row_group_size=4)
    return directory


def mixture_run_config(corpus):
    """small_config() training on write_mixture_corpus(corpus)'s JSONL, text, row store and Parquet rows (weights
    3:1:1:1), logging every step; at a low mean recurrence, so that its steps (cross-process collectives in
    tests/test_multihost.py) are quick."""
    config = small_config()
    config.model.update(mean_recurrence=2, mean_backprop_depth=1)
    config.data.kind = "mixture"
    config.data.sources = [{"kind": "jsonl", "paths": str(Path(corpus) / "*.jsonl"), "weight": 3.0},
                           {"kind": "text", "paths": str(Path(corpus) / "docs.txt"), "weight": 1.0},
                           {"kind": "array_record", "paths": str(Path(corpus) / "store"), "weight": 1.0},
                           {"kind": "parquet", "paths": str(Path(corpus) / "rows.parquet"), "weight": 1.0,
                            "row_length": 2 * config.train.seq_len + 2}]
    config.data.tokenizer.path = str(Path(corpus) / "sp.model")
    config.train.update(log_every=1, peak_flops=1e12)
    config.checkpoint.update(every=2, async_save=False)
    return config


def params_checksum(params) -> float:
    """The sum of squares of every parameter, computed on (and replicated over) the parameters' mesh."""
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return float(jax.jit(lambda p: sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(p)),
                         out_shardings=replicated)(params))


MULTIHOST_STEPS = 6  # steps of tests/test_multihost.py's runs (checkpoints at 2, 4 and 6)


HUGINN_TEST_SPECIALS = ("<|begin_text|>", "<|end_text|>", "<|begin_header|>", "<|end_header|>", "<|end_turn|>",
                        "<|pad|>")


def train_huginn_style_tokenizer(directory, text: str):
    """A small byte-level BPE `tokenizer.json` with huginn-0125's special tokens (ids 0-5), in `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from recurrent_depth.data.tokenizer import load_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text] * 50, trainers.BpeTrainer(vocab_size=400, special_tokens=list(HUGINN_TEST_SPECIALS),
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(Path(directory) / "tokenizer.json"))
    return load_tokenizer("huggingface", directory)
