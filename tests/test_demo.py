"""The embedded demo: the shell-game task, its data and evaluation, and `python train.py && python eval.py` with
the default config at a reduced size."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from recurrent_depth.checkpoint.huggingface import from_huggingface
from recurrent_depth.checkpoint.loading import check_config
from recurrent_depth.data import shell_game
from recurrent_depth.data.batch import IGNORE_INDEX
from recurrent_depth.data.shell_game import CUPS, SWAPS, ShellGameTokenizer
from recurrent_depth.evaluation import Depth, EvalModel
from recurrent_depth.evaluation.tasks import ShellGameTask, parse_tasks
from recurrent_depth.model.config import ModelConfig
from recurrent_depth.runtime.sharding import make_mesh

from helpers import load_config, single_cpu_env

ROOT = Path(__file__).parent.parent
DEMO_FIXTURE = Path(__file__).parent / "fixtures" / "shell-game-demo"


def _ball_after_each_swap(swaps: list[str]) -> list[str]:
    """An independent simulation: the cups' contents as a list, swapped in place."""
    cups, out = list(CUPS), []
    contents = ["ball"] + [None] * (len(CUPS) - 1)
    for a, b in swaps:
        i, j = cups.index(a), cups.index(b)
        contents[i], contents[j] = contents[j], contents[i]
        out.append(cups[contents.index("ball")])
    return out


def test_tracking_matches_a_direct_simulation():
    rng = np.random.default_rng(0)
    swaps = rng.integers(0, len(SWAPS), (20, 30))
    tracked = shell_game.track(swaps)
    for row in range(20):
        assert [CUPS[c] for c in tracked[row]] == _ball_after_each_swap([SWAPS[s] for s in swaps[row]])
    assert shell_game.track(np.asarray([[SWAPS.index("ab"), SWAPS.index("cd"), SWAPS.index("bd")]])).tolist() == \
        [[1, 1, 3]]  # the module docstring's example: b, b, d


def test_tokenizer_round_trip_and_errors():
    tok = ShellGameTokenizer()
    text = "ab cd bd ae bc c"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("ba") == tok.encode("ab")  # a swap reads either way
    assert tok.vocab_size == 3 + 5 + 10 + 3 and tok.decode([tok.bos_id, tok.pad_id]) == ""
    with pytest.raises(ValueError, match="'af' is neither a swap"):
        tok.encode("ab af")


def test_batches_are_a_pure_function_of_seed_and_step():
    batch = shell_game.shell_game_batch(4, 17, seed=3, step=7)
    again = shell_game.shell_game_batch(4, 17, seed=3, step=7)
    other = shell_game.shell_game_batch(4, 17, seed=3, step=8)
    for key in batch:
        np.testing.assert_array_equal(batch[key], again[key])
        assert batch[key].shape == (4, 17) and batch[key].dtype == np.int32
    assert not np.array_equal(batch["inputs"], other["inputs"])
    tok = ShellGameTokenizer()
    assert (batch["inputs"][:, 0] == tok.bos_id).all() and (batch["labels"][:, 0] == IGNORE_INDEX).all()
    for row in range(4):  # every other position's target is the ball's cup after that swap
        swaps = tok.decode(batch["inputs"][row]).split()
        assert tok.decode(batch["labels"][row, 1:]).split() == _ball_after_each_swap(swaps)


def test_held_out_problems_are_not_training_problems():
    problems = shell_game.held_out_problems(200, seed=0, lengths=(16, 16))
    train = {tuple(row) for step in range(200)
             for row in shell_game.shell_game_batch(64, 17, seed=0, step=step)["inputs"][:, 1:].tolist()}
    assert not train & {tuple(swaps) for swaps, _ in problems}
    lengths = [len(s) for s, _ in shell_game.held_out_problems(10, seed=0, lengths=(3, 7))]
    assert lengths == [3, 4, 5, 6, 7, 3, 4, 5, 6, 7]


def test_demo_config_tasks_and_errors():
    config = load_config("demo")
    tasks = parse_tasks(list(config.eval.tasks))
    assert [t.lengths for t in tasks] == [(1, 16), (17, 32)]
    assert all(isinstance(t, ShellGameTask) for t in tasks)
    assert config.train.seq_len == 17 and config.model.max_seq_len >= 33
    with pytest.raises(ValueError, match="lengths must be MIN-MAX"):
        parse_tasks(["shell:x-3"])
    with pytest.raises(ValueError, match="need 1 <= MIN <= MAX"):
        parse_tasks(["shell:5-3"])


@pytest.mark.slow
def test_default_train_then_eval(tmp_path):
    """`python train.py` (default config, a few steps) then `python eval.py` on its workdir: results for every
    iteration count of the config and for its adaptive exit, and the accuracy plots."""
    workdir, out = tmp_path / "workdir", tmp_path / "eval"
    # The steps and warmup of tests/test_notebook.py's training run: the same programs, compiled once (the cache).
    train = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"--workdir={workdir}", "--config.train.steps=4",
         "--config.train.log_every=2", "--config.train.optimizer.warmup_steps=2", "--config.checkpoint.every=2"],
        capture_output=True, text=True, env=single_cpu_env(), cwd=tmp_path, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    run = json.loads((workdir / "config.json").read_text())
    assert run["data"]["kind"] == "shell_game" and len(open(workdir / "metrics.jsonl").readlines()) == 2
    evaluate = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), f"--checkpoint={workdir}", f"--output={out}",
         "--tasks=shell:1-4:size=16:name=short,shell:5-8:size=16:name=long", "--batch_size=16"],
        capture_output=True, text=True, env=single_cpu_env(), cwd=tmp_path, timeout=600)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    settings = [e["setting"] for e in results["results"]]
    assert settings == ["r=1", "r=2", "r=4", "r=8", "r=16", "r=32", "kl=0.001, max 32"]  # from the demo config
    for entry in results["results"]:
        assert set(entry["tasks"]) == {"short", "long"}
        assert 0 <= entry["tasks"]["short"]["acc"] <= 1
    assert 1 <= results["results"][-1]["tasks"]["long"]["mean_steps"] <= 32
    assert sorted(results["plots"]) == ["plots/all_tasks__acc.png", "plots/long__acc.png", "plots/short__acc.png"]
    assert len((out / "samples" / "short" / "r_1.jsonl").read_text().splitlines()) == 16


def test_more_iterations_help_on_the_trained_lengths():
    """The demo's model (tests/fixtures/shell-game-demo: configs/demo.py after 1500 of its 5000 steps) on held-out
    problems of the trained lengths: accuracy, from one plain forward pass per depth, rises with iterations; and
    eval's shell-game task reports the same accuracy."""
    model, params = from_huggingface(DEMO_FIXTURE)
    demo = load_config("demo")
    check_config(model.config, ModelConfig.from_dict(demo.model), "configs/demo.py")
    trained = demo.train.seq_len - 1  # swaps per training row: lengths 1..trained are trained
    problems = shell_game.held_out_problems(256, seed=0, lengths=(1, trained))
    ids = np.zeros((len(problems), trained + 1), np.int32)  # BOS, the swaps, padding (causal: never read)
    ids[:, 0] = ShellGameTokenizer.bos_id
    for row, (swaps, _) in enumerate(problems):
        ids[row, 1:1 + len(swaps)] = swaps
    last = np.asarray([len(swaps) for swaps, _ in problems])  # the position of the last swap
    answers = np.asarray([cup for _, cup in problems])
    forward = jax.jit(lambda ids, r: model.apply({"params": params}, ids, num_steps=r, init_scale=0.0).logits)
    acc = {r: float(np.mean(np.asarray(forward(ids, r))[np.arange(len(ids)), last].argmax(-1) == answers))
           for r in (1, 2, 4, 8)}
    assert acc[2] > acc[1] + 0.03 and acc[4] > acc[2] + 0.03, acc  # each doubling helps...
    assert acc[8] >= acc[4] - 0.02 and acc[8] > acc[1] + 0.1, acc  # ...and more does not hurt
    lm = EvalModel(model, params, ShellGameTokenizer(), mesh=make_mesh((1, 1, 1), jax.devices()[:1]),
                   batch_size=256, progress=False)
    task = ShellGameTask("trained", f"1-{trained}", size=256, seed=0)
    for r in (1, 8):
        assert task.evaluate(lm, Depth(r)).metrics["acc"] == acc[r]
