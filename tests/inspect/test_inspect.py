"""Looking inside the recurrence: per-layer hidden states, per-iteration decoding, the inspect CLI."""

import json
import re

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from recurrent_depth.cli.inspect import FLAGS, PROG, main
from recurrent_depth.data.shell_game import CUP_IDS, SWAP_IDS, ShellGameTokenizer, track
from recurrent_depth.inspect import decode_iterations, pca, relative_change
from recurrent_depth.inspect.decode import _decode_jit
from recurrent_depth.model.attention import attention_mask
from recurrent_depth.model.layers import rope_angles

from helpers import FIXTURES, TINY, XLA_DEFAULT, assert_close

LOGITS_RTOL = 1e-6  # as tests/test_parity.py
DEMO = FIXTURES / "shell-game-demo"


def _rms_norm(x, scale, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(scale, np.float64)


def _log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _chain(module, ids, hidden, at=(0, -1)):
    """Each stacked output recomputed from the previous one with the model's own layers (the core's at the
    iterations `at` only: a smaller compilation)."""
    cfg = module.config
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    cos, sin = rope_angles(positions, cfg.resolved_head_dim, cfg.rope_base)
    mask = attention_mask("xla", ids.shape[1])
    x = jnp.take(module.embedding, ids, axis=0) * cfg.embed_scale
    prelude = [layer(p, cos, sin, mask) for layer, p in zip(module.prelude, [x, *hidden.prelude[:-1]])]
    injected = module.inject(hidden.prelude[-1])
    # Iteration i from the state after iteration i - 1; core layer j > 0 from layer j - 1's output.
    iterations = [module.core_step(hidden.core[i - 1, -1], injected, cos, sin, mask) for i in at[1:]]
    layers = [[module.core.layers[j](hidden.core[i, j - 1], cos, sin, mask) for j in range(1, cfg.num_core_layers)]
              for i in at]
    coda_inputs = [module.ln_f(hidden.core[-1, -1]), *hidden.coda[:-1]]
    coda = [layer(c, cos, sin, mask) for layer, c in zip(module.coda, coda_inputs)]
    return jnp.stack(prelude), jnp.stack(iterations), jnp.asarray(layers), jnp.stack(coda)


@pytest.fixture(scope="module")
def hidden_run(tiny):
    """forward.npz's inputs at 8 iterations (6 without gradient, 2 with: both scans) with hidden states."""
    model, params = tiny
    ref = np.load(TINY / "forward.npz")

    def run(module, ids, states):
        out = module(ids, (6, 2), input_states=states, return_hidden_states=True, return_trajectory=True)
        return out, _chain(module, ids, out.hidden_states)

    out, chain = jax.jit(lambda p, i, s: model.apply({"params": p}, i, s, method=run), compiler_options=XLA_DEFAULT)(
        params, ref["input_ids"], ref["input_states"])
    return ref, out, chain


def test_hidden_states_hold_every_layer_at_every_iteration(tiny, hidden_run):
    model, params = tiny
    cfg = model.config
    ref, out, (prelude, iterations, core_layers, coda) = hidden_run
    hidden = out.hidden_states
    batch, seq = ref["input_ids"].shape
    assert hidden.prelude.shape == (cfg.num_prelude_layers, batch, seq, cfg.hidden_size)
    assert hidden.core.shape == (8, cfg.num_core_layers, batch, seq, cfg.hidden_size)
    assert hidden.coda.shape == (cfg.num_coda_layers, batch, seq, cfg.hidden_size)
    # The last core layer's output at iteration i is the state: through ln_f, the trajectory and the original's.
    normed = _rms_norm(hidden.core[:, -1], params["ln_f"]["scale"], cfg.norm_eps)
    assert_close(out.trajectory, normed, rtol=1e-6, name="trajectory vs ln_f(core[:, -1])")
    for r in (1, 3, 8):
        assert_close(normed[r - 1], ref[f"latents_r{r}"], rtol=LOGITS_RTOL, name=f"ln_f(core[{r - 1}, -1])")
    # The last coda layer's output through the final norm and the tied head gives the logits.
    head = _rms_norm(hidden.coda[-1], params["ln_f"]["scale"], cfg.norm_eps) @ np.asarray(params["embedding"]).T
    assert_close(head, out.logits, rtol=1e-6, name="head(ln_f(coda[-1]))")
    assert_close(out.logits, ref["logits_r8"], rtol=LOGITS_RTOL, name="logits")
    # Every entry is its layer applied to the previous entry.
    assert_close(prelude, hidden.prelude, rtol=1e-6, name="prelude chain")
    assert_close(iterations, hidden.core[-1:, -1], rtol=1e-6, name="iteration chain")
    assert_close(core_layers, hidden.core[(0, -1), 1:], rtol=1e-6, name="core layer chain")
    assert_close(coda, hidden.coda, rtol=1e-6, name="coda chain")


def test_hidden_states_off_change_nothing(tiny, tiny_forward, hidden_run):
    model, params = tiny
    ref, with_hidden, _ = hidden_run
    plain = tiny_forward(params, ref["input_ids"], ref["input_states"], 8)  # traced num_steps: the while_loop
    assert plain.hidden_states is None and plain.trajectory is None
    assert_close(with_hidden.logits, plain.logits, rtol=1e-6, name="logits with vs without hidden states")
    # Off, the forward pass returns nothing more than before (the flag is static).
    shapes = jax.eval_shape(lambda p: model.apply({"params": p}, ref["input_ids"], num_steps=3, init_scale=0.0),
                            params)
    assert len(jax.tree.leaves(shapes)) == 2
    with pytest.raises(ValueError, match="static"):
        jax.jit(lambda n: model.apply({"params": params}, ref["input_ids"], num_steps=n, init_scale=0.0,
                                      return_hidden_states=True))(3)


def test_decode_iterations_matches_the_original_at_every_depth(tiny):
    """One 8-iteration call holds the original's logits at r = 1, 3 and 8, and their statistics."""
    model, params = tiny
    ref = np.load(TINY / "forward.npz")
    out = decode_iterations(model, params, ref["input_ids"], 8, input_states=ref["input_states"], top_k=4,
                            return_logits=True)
    batch, seq = ref["input_ids"].shape
    assert out.logits.shape == (8, batch, seq, model.config.vocab_size)
    assert out.tokens.shape == out.probs.shape == (8, batch, seq, 4)
    assert out.entropy.shape == out.kl_to_final.shape == (8, batch, seq)
    assert_close(out.initial_state, ref["input_states"], rtol=0, name="initial state")
    final = _log_softmax(ref["logits_r8"])
    for r in (1, 3, 8):
        assert_close(out.logits[r - 1], ref[f"logits_r{r}"], rtol=LOGITS_RTOL, name=f"logits r={r}")
        logp = _log_softmax(ref[f"logits_r{r}"])
        np.testing.assert_array_equal(out.tokens[r - 1, ..., 0], logp.argmax(-1))
        np.testing.assert_allclose(out.probs[r - 1], -np.sort(-np.exp(logp), axis=-1)[..., :4], atol=1e-6)
        np.testing.assert_allclose(out.entropy[r - 1], -(np.exp(logp) * logp).sum(-1), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out.kl_to_final[r - 1], (np.exp(final) * (final - logp)).sum(-1), rtol=1e-3,
                                   atol=1e-5)
    # One compilation per shape and setting: other ids of the same shape reuse it.
    compiled = _decode_jit._cache_size()
    decode_iterations(model, params, ref["input_ids"][::-1], 8, input_states=ref["input_states"], top_k=4,
                      return_logits=True)
    assert _decode_jit._cache_size() == compiled


def test_decode_iterations_draws_the_initial_state_as_the_forward_pass(tiny):
    """Without input_states the state is drawn from `seed` as model.apply draws it with rngs={"state": key(seed)}."""
    model, params = tiny
    ids = np.arange(1, 9)[None]
    out = decode_iterations(model, params, ids, 3, init_scale=1.0, seed=7, return_logits=True)
    forward = jax.jit(lambda: model.apply({"params": params}, ids, 3, init_scale=1.0,
                                          rngs={"state": jax.random.key(7)}).logits)
    assert_close(out.logits[-1], forward(), rtol=1e-6, name="random initial state, r=3")
    assert float(jnp.abs(out.initial_state).max()) > 0


def test_decode_iterations_matches_a_forward_pass_per_iteration(tiny):
    """From a drawn initial state, iteration i is the forward pass at num_steps=i (the reference: one plain forward
    per iteration, its statistics in float64 numpy), the states are the forward pass's, and the logits flag changes
    nothing else."""
    model, params = tiny
    ids = np.asarray([[1, 8, 500, 12, 9, 14, 300, 7, 2, 99], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    out = decode_iterations(model, params, ids, 4, init_scale=1.0, seed=3, top_k=3, return_logits=True)
    forward = jax.jit(lambda r: model.apply({"params": params}, ids, r, input_states=out.initial_state).logits)
    logits = np.stack([forward(r) for r in range(1, 5)])  # [r, b, s, vocab]
    assert_close(out.logits, logits, rtol=1e-6, name="logits")
    logp = _log_softmax(logits)  # float64
    p = np.exp(logp)
    np.testing.assert_array_equal(out.tokens, np.argsort(-p, axis=-1, kind="stable")[..., :3])
    np.testing.assert_allclose(out.probs, -np.sort(-p, axis=-1)[..., :3], atol=1e-6)
    np.testing.assert_allclose(out.entropy, -(p * logp).sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.kl_to_final, (p[-1] * (logp[-1] - logp)).sum(-1), rtol=1e-3, atol=1e-5)
    assert np.all(np.asarray(out.kl_to_final[-1]) == 0)
    hidden = jax.jit(lambda: model.apply({"params": params}, ids, 4, input_states=out.initial_state,
                                         return_hidden_states=True).hidden_states.core[:, -1])()
    assert_close(out.states, hidden, rtol=1e-6, name="states")
    plain = decode_iterations(model, params, ids, 4, init_scale=1.0, seed=3, top_k=3)
    assert plain.logits is None
    for name in ("tokens", "probs", "entropy", "kl_to_final", "states", "initial_state"):
        np.testing.assert_allclose(getattr(plain, name), getattr(out, name), rtol=1e-6, atol=1e-7, err_msg=name)
    one = decode_iterations(model, params, ids, 1, init_scale=1.0, seed=3, top_k=3)  # no earlier iterations
    np.testing.assert_array_equal(one.tokens, out.tokens[:1])
    np.testing.assert_allclose(one.probs, out.probs[:1], atol=1e-6)
    assert one.kl_to_final.shape == (1, 2, 10) and np.all(np.asarray(one.kl_to_final) == 0)


def test_decode_iterations_memory_does_not_grow_with_iterations(tiny):
    """The iterations are decoded one at a time: from 4 to 32 iterations the compiled function's scratch memory
    grows by less than its outputs do, and stays below one [32, batch, seq, vocab] float32 array (before, it held
    three such arrays: logits, log-probabilities, probabilities)."""
    model, params = tiny
    batch, seq, vocab = 2, 128, model.config.vocab_size
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    memory = {}
    for r in (4, 32):
        compiled = _decode_jit.lower(model, params, ids, None, jax.random.key(0), num_steps=r, init_scale=1.0,
                                     top_k=5, return_logits=False).compile()
        memory[r] = compiled.memory_analysis()
    temp = {r: m.temp_size_in_bytes for r, m in memory.items()}
    output = {r: m.output_size_in_bytes for r, m in memory.items()}
    assert temp[32] - temp[4] <= output[32] - output[4], (temp, output)
    assert temp[32] < 32 * batch * seq * vocab * 4, temp


def test_decode_iterations_rejects_bad_input(tiny):
    model, params = tiny
    ids = np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        decode_iterations(model, params, ids, 0, init_scale=0.0)
    with pytest.raises(ValueError, match=r"top_k \(513\) exceeds the vocabulary size \(512\)"):
        decode_iterations(model, params, ids, 2, init_scale=0.0, top_k=513)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\)"):
        decode_iterations(model, params, np.asarray([[1, 512]]), 2, init_scale=0.0)
    with pytest.raises(ValueError, match="input_states must have shape"):
        decode_iterations(model, params, ids, 2, input_states=np.zeros((1, 3, 64), np.float32))
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\]"):
        decode_iterations(model, params, ids[0], 2, init_scale=0.0)
    with pytest.raises(ValueError, match=r"sequence length 129 exceeds the model's context \(max_seq_len=128\)"):
        decode_iterations(model, params, np.ones((1, 129), np.int32), 2, init_scale=0.0)


def test_relative_change_and_pca():
    states = np.asarray([[3.0, 4.0], [3.0, 4.0], [0.0, 5.0]])[:, None]  # [r=3, 1, 2]
    np.testing.assert_allclose(relative_change(states, np.zeros((1, 2)))[:, 0], [1.0, 0.0, np.sqrt(10) / 5])
    rng = np.random.default_rng(0)
    points = rng.normal(size=(200, 3)) * [5.0, 1.0, 0.1] + 7.0  # variance mostly along the first axis
    projected, ratio = pca(points, 6)
    assert projected.shape == (200, 3) and ratio.shape == (3,)
    assert ratio[0] > 0.9 and np.all(np.diff(ratio) <= 0) and ratio.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(np.abs(np.corrcoef(projected[:, 0], points[:, 0])[0, 1]), 1.0, atol=1e-3)


def _png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 200, path
    return image


def test_cli_writes_pictures_and_json_for_the_demo_model(tmp_path, capsys):
    """The trained demo model tracks the ball: at the last iteration every position's top token is the cup."""
    swaps = np.asarray([0, 5, 7, 3, 9])  # indices into shell_game.SWAPS
    prompt = " ".join(ShellGameTokenizer().decode([i]) for i in SWAP_IDS[swaps])
    assert main([f"--checkpoint={DEMO}", "--tokenizer=shell_game", f"--prompt={prompt}", "--num_steps=6",
                 "--num_inits=3", "--positions=2,-1", "--top_k=3", f"--output={tmp_path}"]) == 0
    assert "inspection.json" in capsys.readouterr().out
    for name in ("convergence", "top_tokens", "trajectories"):
        _png(tmp_path / f"{name}.png")
    result = json.loads((tmp_path / "inspection.json").read_text())
    assert result["num_inits"] == 3 and result["iterations"] == list(range(1, 7))
    assert result["token_ids"] == [ShellGameTokenizer.bos_id, *SWAP_IDS[swaps].tolist()]
    positions = result["positions"]
    assert [p["token"] for p in positions[1:]] == prompt.split()
    for p in positions:
        assert len(p["top_ids"]) == len(p["entropy"]) == len(p["relative_change"]) == 6
        assert len(p["top_ids"][0]) == 3 and p["kl_to_final"][-1] == 0.0
    cups = CUP_IDS[track(swaps)].tolist()
    assert [p["top_ids"][-1][0] for p in positions[1:]] == cups
    assert [p["final_top_token_per_init"] for p in positions[1:]] == [[c] * 3 for c in cups]
    assert set(result["trajectories"]) == {"2", "5"}
    assert all(len(t["explained_variance"]) == 6 for t in result["trajectories"].values())


def test_cli_on_the_tiny_checkpoint_writes_consistent_json(tmp_path, tiny):
    """--ids on the huginn-tiny checkpoint (no tokenizer) from a zero state: the JSON's top tokens are the forward
    pass's argmax at every depth and its numbers are consistent with each other."""
    model, params = tiny
    ids = [1, 8, 500, 12, 9, 14, 300]
    assert main([f"--checkpoint={TINY / 'checkpoint'}", f"--ids={','.join(map(str, ids))}", "--num_steps=5",
                 "--init_scale=0", "--top_k=4", f"--output={tmp_path}"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "convergence.png", "inspection.json", "top_tokens.png", "trajectories.png"]
    result = json.loads((tmp_path / "inspection.json").read_text())
    assert {"checkpoint", "prompt", "num_steps", "num_inits", "init_scale", "seed", "token_ids", "iterations",
            "positions", "trajectories"} <= set(result)
    assert result["num_inits"] == 1 and result["token_ids"] == ids  # every zero state is the same
    assert result["iterations"] == [1, 2, 3, 4, 5]
    positions = result["positions"]
    assert [p["token"] for p in positions] == [f"#{i}" for i in ids]  # no tokenizer: ids
    # A traced iteration count: one compilation (not the session's tiny_forward, whose traces test_parity counts).
    forward = jax.jit(lambda r: model.apply({"params": params}, jnp.asarray([ids]), r, init_scale=0.0).logits[0])
    for r in (1, 5):
        logp = _log_softmax(forward(r))  # [seq, vocab]
        assert [p["top_ids"][r - 1][0] for p in positions] == logp.argmax(-1).tolist()
        np.testing.assert_allclose([p["top_probs"][r - 1][0] for p in positions], np.exp(logp.max(-1)), atol=2e-6)
        np.testing.assert_allclose([p["entropy"][r - 1] for p in positions], -(np.exp(logp) * logp).sum(-1),
                                   atol=1e-5)
    for p in positions:
        assert np.asarray(p["top_ids"]).shape == np.asarray(p["top_probs"]).shape == (5, 4)
        assert len(p["entropy"]) == len(p["kl_to_final"]) == len(p["relative_change"]) == 5
        assert np.all(np.diff(p["top_probs"], axis=1) <= 0) and np.all(np.sum(p["top_probs"], axis=1) <= 1 + 1e-6)
        assert min(p["kl_to_final"]) >= -1e-6 and p["kl_to_final"][-1] == 0.0
        assert p["relative_change"][0] == 1.0  # from the zero state everything changes
        assert p["final_top_token_per_init"] == [p["top_ids"][-1][0]]
    assert set(result["trajectories"]) == {"1", "3", "4", "6"}  # the default: 4 spread positions, BOS-slot skipped
    for t in result["trajectories"].values():  # one 6-point trajectory: at most 5 components
        assert len(t["explained_variance"]) == 5 and sum(t["explained_variance"]) == pytest.approx(1.0, abs=1e-5)
    _png(tmp_path / "trajectories.png")


@pytest.mark.parametrize("args, message", [
    (["--checkpoint=/no/such/dir", "--ids=1,2"], "checkpoint /no/such/dir does not exist"),
    ([f"--checkpoint={DEMO}", "--ids=1,2,32"], r"--ids: token id 32 is outside the model's vocabulary \[0, 32\)"),
    ([f"--checkpoint={DEMO}", "--ids=1,-2"], r"--ids: token id -2 is outside"),
    ([f"--checkpoint={DEMO}", "--ids="], "--ids is empty"),
    ([f"--checkpoint={DEMO}", "--tokenizer=shell_game", "--prompt= "], "--prompt is empty"),
    ([f"--checkpoint={DEMO}", "--tokenizer=shell_game", "--prompt=" + "ab " * 64],
     r"the prompt is 65 tokens, longer than the model's context \(max_seq_len=64\)"),
    ([f"--checkpoint={DEMO}", "--prompt=ab"], "no tokenizer for"),
    ([f"--checkpoint={DEMO}", "--ids=1,2", "--positions=5"], "token position 5 is outside the sequence of 2"),
])
def test_cli_bad_input_gets_a_clear_error(tmp_path, capsys, args, message):
    assert main([*args, f"--output={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err) and err.startswith(f"{PROG}: error: ") and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("args, message", [
    ([f"--checkpoint={DEMO}"], r"Exactly one of \(prompt, ids\)"),
    ([f"--checkpoint={DEMO}", "--prompt=ab", "--ids=1"], r"Exactly one of \(prompt, ids\)"),
    (["--ids=1,2"], "--checkpoint must have a value"),
    ([f"--checkpoint={DEMO}", "--ids=1,x"], "expected comma-separated integers, got '1,x'"),
    ([f"--checkpoint={DEMO}", "--ids=1", "--positions=a"], "expected comma-separated integers"),
    ([f"--checkpoint={DEMO}", "--ids=1", "--no-bos"], "Unknown command line flag 'no-bos'"),
    ([f"--checkpoint={DEMO}", "--ids=1", "extra"], "takes no positional arguments"),
])
def test_cli_usage_errors_have_status_2(tmp_path, capsys, args, message):
    assert main([*args, f"--output={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.startswith(f"{PROG}: error: ") and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())


def test_cli_flags_bos_nobos_and_int_lists(tmp_path, capsys):
    """--nobos is absl's negation of --bos; --ids and --positions are lists of integers; each call starts from the
    defaults."""
    missing = ["--checkpoint=/no/such/dir", f"--output={tmp_path}"]
    assert main([*missing, "--prompt=ab", "--nobos", "--positions=2,,-1"]) == 1  # fails after parsing
    assert FLAGS.bos is False and FLAGS.positions == [2, -1] and FLAGS.prompt == "ab" and FLAGS.ids is None
    assert main([*missing, "--ids=3, 4"]) == 1
    assert FLAGS.bos is True and FLAGS.positions is None and FLAGS.prompt is None and FLAGS.ids == [3, 4]
    assert capsys.readouterr().err.count("does not exist") == 2
