"""EvalModel: multiple-choice scores against direct log-probabilities; independence of batch size, padding, order
and mesh; adaptive-exit extremes; one generation compilation per sweep."""

import jax
import numpy as np

from recurrent_depth.decoding.generate import generate
from recurrent_depth.evaluation import Depth, EvalModel, sweep
from recurrent_depth.evaluation.tasks import GenerativeTask, MultipleChoiceTask, PerplexityTask
from recurrent_depth.runtime.sharding import make_mesh

from eval_data import MC_ROWS, CharTokenizer


# ---- scoring with the model --------------------------------------------------------------------------------
def test_multiple_choice_equals_direct_log_probabilities(lm, direct, files):
    task = MultipleChoiceTask("mc", files["mc"])
    result = task.evaluate(lm, Depth(4))
    tok = CharTokenizer()
    sequences, starts = [], []
    for row in MC_ROWS:
        context = [tok.bos_id] + tok.encode(row["context"])
        sequences += [context + tok.encode(" " + c) for c in row["choices"]]
        starts += [len(context)] * len(row["choices"])
    flat = direct(sequences, starts, 4)
    correct = correct_norm = 0
    for row, sample in zip(MC_ROWS, result.samples):
        lls, flat = flat[:len(row["choices"])], flat[len(row["choices"]):]
        np.testing.assert_allclose(sample["loglikelihoods"], lls, rtol=2e-5)
        correct += int(np.argmax(lls)) == row["gold"]
        correct_norm += int(np.argmax(np.asarray(lls) / [len(c) for c in row["choices"]])) == row["gold"]
    assert result.metrics == {"acc": correct / 3, "acc_norm": correct_norm / 3}

    ppl = PerplexityTask("ppl", files["doc"]).evaluate(lm, Depth(4))
    text = files["doc"].read_text()
    ids = [tok.bos_id] + tok.encode(text)  # 97 tokens: one window
    (nll,) = -np.asarray(direct([ids], [1], 4))
    np.testing.assert_allclose([ppl.metrics["loss"], ppl.metrics["bits_per_byte"]],
                               [nll / (len(ids) - 1), nll / len(text.encode()) / np.log(2)], rtol=2e-5)


def _requests(n=11, seed=0):
    """Random (context, continuation) ids, at most 27 inputs: padded to 16 or 32 positions."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(4, 260, rng.integers(1, 21)).tolist(), rng.integers(4, 260, rng.integers(1, 9)).tolist())
            for _ in range(n)]


def test_scores_do_not_depend_on_batch_size_padding_or_order(lm, tiny):
    model, params = tiny
    requests = _requests()

    def check(lm, reference=None):
        together = lm.loglikelihood(requests, Depth(3))  # batches of mixed lengths, padded to the longest
        alone = np.concatenate([lm.loglikelihood([r], Depth(3)).logprob for r in requests])  # own bucket
        backwards = lm.loglikelihood(requests[::-1], Depth(3)).logprob[::-1]
        for other in [alone, backwards] + ([] if reference is None else [reference]):
            np.testing.assert_allclose(other, together.logprob, rtol=2e-5)
        return together.logprob

    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    reference = check(lm)
    check(EvalModel(model, params, CharTokenizer(), mesh=mesh, batch_size=1, progress=False), reference)
    # A random initial state drawn per position and request (keyed by its tokens) from the seed is as invariant.
    seeded = EvalModel(model, params, CharTokenizer(), mesh=mesh, batch_size=4, init_scale=1.0, seed=7,
                       progress=False)
    noisy = check(seeded)
    seeded.seed = 8
    assert not np.allclose(noisy, reference) and not np.allclose(lm.loglikelihood(requests, Depth(3)).logprob,
                                                                 seeded.loglikelihood(requests, Depth(3)).logprob)


def test_sharded_evaluation_equals_single_device(lm, tiny, files):
    model, params = tiny
    sharded = EvalModel(model, params, CharTokenizer(), mesh=make_mesh((2, 2, 2), jax.devices()), batch_size=4,
                        progress=False)
    tasks = [MultipleChoiceTask("mc", files["mc"]), PerplexityTask("ppl", files["doc"])]
    entries, samples = sweep(sharded, tasks, [Depth(1)])
    compilations = sharded.compilations
    more, more_samples = sweep(sharded, tasks, [Depth(5)])
    assert sharded.compilations == compilations  # the sweep reuses the compiled scoring function
    reference, reference_samples = sweep(lm, tasks, [Depth(1), Depth(5)])
    for got, want in zip(entries + more, reference):
        for name in ("mc", "ppl"):
            for metric, value in want["tasks"][name].items():
                if metric != "seconds":
                    np.testing.assert_allclose(got["tasks"][name][metric], value, rtol=1e-5)
    for key, rows in reference_samples.items():
        got = (samples | more_samples)[key]
        for a, b in zip(got, rows):
            np.testing.assert_allclose(a.get("loglikelihoods", a.get("nll")), b.get("loglikelihoods", b.get("nll")),
                                       rtol=1e-5)
    gen = GenerativeTask("gen", files["gen"], max_new_tokens=6)
    assert ([s["response"] for s in gen.evaluate(sharded, Depth(2)).samples] ==
            [s["response"] for s in gen.evaluate(lm, Depth(2)).samples])


def test_adaptive_exit_extremes_equal_fixed_depths(lm):
    requests = [(c[:8], x[:4]) for c, x in _requests(n=5, seed=1)]  # every prefix in one length bucket
    never = lm.loglikelihood(requests, Depth(3, "kl", 0.0))  # KL never drops below 0: all 3 iterations
    np.testing.assert_allclose(never.logprob, lm.loglikelihood(requests, Depth(3)).logprob, rtol=2e-5)
    np.testing.assert_array_equal(never.steps, 3.0)
    first = lm.loglikelihood(requests, Depth(3, "kl", 1e9))  # exits at the first check, after one iteration
    np.testing.assert_allclose(first.logprob, lm.loglikelihood(requests, Depth(1)).logprob, rtol=2e-5)
    np.testing.assert_array_equal(first.steps, 1.0)


def test_a_sweep_compiles_generation_once(lm):
    from recurrent_depth.decoding.generate import _generate_jit

    prompts = [[5, 6, 7], [8, 9]]
    lm.max_steps = 4  # what sweep() sets: its largest count
    before = _generate_jit._cache_size()
    outs = [lm.generate(prompts, Depth(r), max_new_tokens=3, stop_ids=[]) for r in (1, 2, 4)]
    assert _generate_jit._cache_size() == before + 1
    direct = generate(lm.model, lm.params, prompts, max_new_tokens=3, num_steps=2, init_scale=0.0)
    assert outs[1].tokens == [row[:3] for row in np.asarray(direct.tokens).tolist()]  # same result as its own count


