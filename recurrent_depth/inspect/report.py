"""One prompt looked at from every side: per-iteration decoding from several initial states, convergence, the
PCA of chosen tokens' trajectories; as figures and a JSON (what `python -m recurrent_depth.cli.inspect` writes)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from matplotlib.figure import Figure

from recurrent_depth.inspect import plots
from recurrent_depth.inspect.decode import decode_iterations, pca, relative_change
from recurrent_depth.model.lm import RecurrentDepthLM
from recurrent_depth.runtime.paths import as_path

NUM_COMPONENTS = 2 * len(plots.PC_PAIRS)


@dataclasses.dataclass
class Inspection:
    """Per-iteration decoding of one token sequence from `num_inits` initial states (the batch axis)."""

    token_ids: list[int]
    num_steps: int
    init_scale: float
    seed: int
    decoding: dict[str, np.ndarray]  # IterationDecoding's fields as numpy, batch = initial states
    change: np.ndarray  # [inits, iterations, seq] relative state change per iteration
    positions: list[int]  # tokens whose trajectories were projected
    projections: dict[int, np.ndarray]  # position -> [inits, iterations + 1, k] trajectory s_0..s_r in its PCs
    explained: dict[int, np.ndarray]  # position -> [k] explained-variance ratio of those PCs

    @property
    def num_inits(self) -> int:
        return self.change.shape[0]


def default_positions(seq_len: int, count: int = 4) -> list[int]:
    """`count` positions spread over the sequence, the last included (the first, often BOS, only if alone)."""
    start = 1 if seq_len > 1 else 0
    return sorted({int(round(x)) for x in np.linspace(start, seq_len - 1, min(count, seq_len - start))})


def check_positions(positions: Sequence[int], seq_len: int) -> list[int]:
    """Positions as non-negative indices (negative ones count from the end); out of range raises ValueError."""
    out = []
    for p in positions:
        if not -seq_len <= p < seq_len:
            raise ValueError(f"token position {p} is outside the sequence of {seq_len} tokens")
        out.append(p % seq_len)
    return list(dict.fromkeys(out))


def inspect_tokens(model: RecurrentDepthLM, params, token_ids: Sequence[int], *, num_steps: int, num_inits: int = 4,
                   init_scale: float | None = None, seed: int = 0, positions: Sequence[int] | None = None,
                   top_k: int = 5) -> Inspection:
    """Decodes every iteration of `token_ids` from `num_inits` random initial states at once (one batch; a zero
    initial state, init_scale 0, gives one), and projects the chosen positions' trajectories on their PCs."""
    if isinstance(num_inits, bool) or not isinstance(num_inits, int) or num_inits < 1:
        raise ValueError(f"num_inits must be a positive integer, got {num_inits!r}")
    token_ids = [int(t) for t in token_ids]
    if not token_ids:
        raise ValueError("no tokens to inspect")
    init_scale = float(model.config.init_scale if init_scale is None else init_scale)
    num_inits = 1 if init_scale == 0 else num_inits  # every zero state is the same
    positions = check_positions(default_positions(len(token_ids)) if positions is None else positions, len(token_ids))
    ids = np.tile(np.asarray(token_ids, np.int32), (num_inits, 1))
    result = decode_iterations(model, params, ids, num_steps, init_scale=init_scale, top_k=top_k, seed=seed)
    decoding = {k: np.asarray(v) for k, v in dataclasses.asdict(jax.device_get(result)).items() if v is not None}
    states = np.concatenate([decoding["initial_state"][None], decoding["states"]])  # [r + 1, inits, seq, embed]
    projections, explained = {}, {}
    for p in positions:
        projections[p], explained[p] = pca(np.swapaxes(states[:, :, p], 0, 1), NUM_COMPONENTS)
    change = np.swapaxes(relative_change(decoding["states"], decoding["initial_state"]), 0, 1)
    return Inspection(token_ids=token_ids, num_steps=num_steps, init_scale=init_scale, seed=seed, decoding=decoding,
                      change=change, positions=positions, projections=projections, explained=explained)


def token_text(tokenizer, token_id: int) -> str:
    """A token's text for labels: escaped whitespace, `<id>` where the tokenizer gives nothing, `#id` without one."""
    if tokenizer is None:
        return f"#{token_id}"
    text = tokenizer.decode([token_id])
    if not text:
        return f"<{token_id}>"
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    return text if text.strip() else repr(text)


def figures(inspection: Inspection, text: Callable[[int], str]) -> dict[str, Figure]:
    """The three pictures (of the first initial state where one is shown), by file stem."""
    labels = [f"{i}: {text(t)}" for i, t in enumerate(inspection.token_ids)]
    d = inspection.decoding
    init = f" (initial state 0 of {inspection.num_inits}, init_scale {inspection.init_scale:g})"
    return {
        "convergence": plots.convergence_figure(inspection.change[0], labels, "relative change of the state" + init),
        "top_tokens": plots.top_token_figure(d["tokens"][:, 0, :, 0], d["probs"][:, 0, :, 0], labels, text,
                                             title="most probable next token after each iteration" + init),
        "trajectories": plots.trajectory_figure(inspection.projections, inspection.explained, labels),
    }


def summary(inspection: Inspection, text: Callable[[int], str]) -> dict:
    """The JSON: per position and iteration (first initial state) the top-k tokens with their probabilities, the
    entropy, the KL to the final iteration and the relative change; each initial state's final top token; the
    explained variance of each trajectory's PCs."""
    d = inspection.decoding
    positions = []
    for p, token in enumerate(inspection.token_ids):
        positions.append({
            "position": p, "token_id": token, "token": text(token),
            "top_ids": d["tokens"][:, 0, p].tolist(),  # [iterations][top_k]
            "top_tokens": [[text(int(t)) for t in row] for row in d["tokens"][:, 0, p]],
            "top_probs": np.round(d["probs"][:, 0, p], 6).tolist(),
            "entropy": np.round(d["entropy"][:, 0, p], 6).tolist(),
            "kl_to_final": np.round(d["kl_to_final"][:, 0, p], 6).tolist(),
            "relative_change": np.round(inspection.change[0, :, p], 6).tolist(),
            "final_top_token_per_init": d["tokens"][-1, :, p, 0].tolist(),
        })
    return {
        "num_steps": inspection.num_steps, "num_inits": inspection.num_inits, "init_scale": inspection.init_scale,
        "seed": inspection.seed, "token_ids": inspection.token_ids,
        "iterations": list(range(1, inspection.num_steps + 1)), "positions": positions,
        "trajectories": {str(p): {"explained_variance": np.round(inspection.explained[p], 6).tolist()}
                         for p in inspection.positions},
    }


def write(output: str | os.PathLike, inspection: Inspection, text: Callable[[int], str], header: dict | None = None
          ) -> list:
    """Writes <stem>.png for each figure and inspection.json (with `header` first) under `output`; returns the
    paths."""
    output = as_path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, fig in figures(inspection, text).items():
        with (output / f"{stem}.png").open("wb") as f:
            fig.savefig(f, format="png", dpi=100)
        paths.append(output / f"{stem}.png")
    (output / "inspection.json").write_text(json.dumps({**(header or {}), **summary(inspection, text)}))
    return [*paths, output / "inspection.json"]
