"""Figures of the recurrence: convergence heatmap, per-iteration top tokens, PCA of latent trajectories.

Each function returns a `matplotlib.figure.Figure` built without pyplot (no backend is chosen: `fig.savefig`
renders with Agg, and a notebook displays the figure as it is).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from matplotlib.figure import Figure

PC_PAIRS = ((0, 1), (2, 3), (4, 5))  # the paper's panels: PC1-PC2, PC3-PC4, PC5-PC6


def _plain(text: str) -> str:
    """Text that matplotlib shows as it is (a `$` would start mathtext)."""
    return text.replace("$", r"\$")


def _tick_labels(ax, labels: Sequence[str], max_labels: int = 64) -> None:
    """Token labels along the y axis, every n-th one when there are more than max_labels."""
    step = max(1, -(-len(labels) // max_labels))
    ticks = list(range(0, len(labels), step))
    ax.set_yticks(ticks, [_plain(labels[i]) for i in ticks], fontsize=8)


def shown_iterations(num_steps: int, max_columns: int = 16) -> list[int]:
    """All iterations 1..num_steps if they fit in max_columns, else a roughly log-spaced subset with 1 and r."""
    if num_steps <= max_columns:
        return list(range(1, num_steps + 1))
    return sorted({int(round(x)) for x in np.geomspace(1, num_steps, max_columns)})


def convergence_figure(change: np.ndarray, labels: Sequence[str], title: str = "") -> Figure:
    """Heatmap of the relative state change, tokens x iterations.  change [iterations, seq]."""
    steps, seq_len = change.shape
    fig = Figure(figsize=(min(3.0 + 0.22 * steps, 14.0), min(1.6 + 0.2 * seq_len, 16.0)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.log10(change.T + 1e-8), aspect="auto", cmap="viridis", interpolation="nearest",
                      extent=(0.5, steps + 0.5, seq_len - 0.5, -0.5))
    fig.colorbar(image, ax=ax, label="log10 ||s_i - s_(i-1)|| / ||s_i||")
    _tick_labels(ax, labels)
    ax.set_xlabel("iteration")
    ax.set_ylabel("token")
    ax.set_title(_plain(title or "convergence of the latent state per token"), fontsize=10)
    return fig


def top_token_figure(tokens: np.ndarray, probs: np.ndarray, labels: Sequence[str], text: Callable[[int], str],
                     iterations: Sequence[int] | None = None, title: str = "") -> Figure:
    """A table: per input token (rows) the top next token after each shown iteration (columns), shaded by its
    probability.  tokens, probs [iterations, seq] (top-1); text maps a token id to its label."""
    steps, seq_len = tokens.shape
    iterations = list(iterations or shown_iterations(steps))
    cols = [i - 1 for i in iterations]
    fig = Figure(figsize=(min(2.4 + 0.75 * len(cols), 16.0), min(1.4 + 0.28 * seq_len, 30.0)), layout="constrained")
    ax = fig.add_subplot()
    shade = probs[cols].T  # [seq, columns]
    image = ax.imshow(shade, aspect="auto", cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fontsize = 8 if seq_len <= 40 else 6
    for row in range(seq_len):
        for j, col in enumerate(cols):
            ax.text(j, row, _plain(text(int(tokens[col, row]))[:8]), ha="center", va="center", fontsize=fontsize,
                    color="white" if shade[row, j] > 0.6 else "black")
    ax.set_xticks(range(len(cols)), [str(i) for i in iterations], fontsize=8)
    _tick_labels(ax, labels)
    ax.set_xlabel("iteration")
    ax.set_ylabel("input token")
    fig.colorbar(image, ax=ax, label="probability of the top token")
    ax.set_title(_plain(title or "most probable next token after each iteration"), fontsize=10)
    return fig


def trajectory_figure(projections: dict[int, np.ndarray], explained: dict[int, np.ndarray],
                      labels: Sequence[str]) -> Figure:
    """The latent trajectories of chosen tokens in their principal components (a row per token, panels
    PC1-PC2, PC3-PC4, PC5-PC6), one line per initial state from s_0 (circle) to s_r (star).
    projections: position -> [inits, iterations + 1, k]; explained: position -> variance ratios [k]; labels
    [seq] name the positions."""
    rows = len(projections)
    fig = Figure(figsize=(11.0, 3.2 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, len(PC_PAIRS), squeeze=False)
    for row, (position, proj) in enumerate(projections.items()):
        for col, (a, b) in enumerate(PC_PAIRS):
            ax = axes[row, col]
            if b >= proj.shape[-1]:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"rank < {b + 1}", ha="center", va="center", transform=ax.transAxes)
                continue
            for init, line in enumerate(proj):
                (drawn,) = ax.plot(line[:, a], line[:, b], "-", marker=".", markersize=3, linewidth=1, alpha=0.8,
                                   label=f"init {init}")
                ax.plot(line[0, a], line[0, b], "o", color=drawn.get_color(), markersize=6)
                ax.plot(line[-1, a], line[-1, b], "*", color=drawn.get_color(), markersize=11,
                        markeredgecolor="black", markeredgewidth=0.5)
            ratio = explained[position]
            ax.set_xlabel(f"PC{a + 1} ({ratio[a]:.0%})", fontsize=8)
            ax.set_ylabel(f"PC{b + 1} ({ratio[b]:.0%})", fontsize=8)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_title(_plain(f"position {labels[position]}"), fontsize=9, loc="left")
    handles, names = axes[0, 0].get_legend_handles_labels()
    if handles and len(handles) <= 10:
        fig.legend(handles, names, loc="outside lower center", ncols=min(len(handles), 8), fontsize=8)
    fig.suptitle("latent trajectories (circle: initial state, star: last iteration)")
    return fig
