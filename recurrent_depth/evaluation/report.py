"""What a sweep leaves behind: a console table, results.json, per-example samples and PNG plots.

Each plot shows a task's metric against the iteration count (log-2 axis); an adaptive-exit setting is a marker at
its mean iterations used, so it reads as accuracy against compute.
"""

from __future__ import annotations

import json
import os
import re

from etils import epath

from recurrent_depth.runtime.paths import as_path

RESULTS_FILE = "results.json"
NOT_PLOTTED = ("mean_steps", "seconds")


def table(entries: list[dict]) -> str:
    """Rows task/metric, one column per setting."""
    columns = [e["setting"] for e in entries]
    rows = []
    for task in dict.fromkeys(t for e in entries for t in e["tasks"]):
        for metric in dict.fromkeys(m for e in entries for m in e["tasks"].get(task, {})):
            if metric == "seconds":
                continue
            values = [e["tasks"].get(task, {}).get(metric) for e in entries]
            rows.append([task, metric] + ["-" if v is None else f"{v:.4g}" for v in values])
    header = ["task", "metric"] + columns
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _draw(ax, entries: list[dict], task: str, metric: str, prefix: str = "") -> None:
    """One task's metric: a line over the fixed iteration counts, a star per adaptive-exit setting."""
    fixed = sorted((e for e in entries if e["exit_criterion"] is None), key=lambda e: e["num_steps"])
    points = [(e["num_steps"], e["tasks"][task][metric]) for e in fixed if metric in e["tasks"].get(task, {})]
    line = ax.plot(*zip(*points), marker="o", label=f"{prefix}fixed iterations")[0] if points else None
    for e in entries:
        result = e["tasks"].get(task, {})
        if e["exit_criterion"] is not None and metric in result and "mean_steps" in result:
            ax.plot(result["mean_steps"], result[metric], marker="*", markersize=12, linestyle="none",
                    color=None if line is None else line.get_color(), label=f"{prefix}adaptive: {e['setting']}")


def plot(entries: list[dict], directory: str | os.PathLike) -> list[epath.Path]:
    """One PNG per (task, metric) under `directory`, plus one per metric that several tasks share (all of them
    in one figure); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tasks = list(dict.fromkeys(t for e in entries for t in e["tasks"]))
    metrics = {t: [m for m in dict.fromkeys(m for e in entries for m in e["tasks"].get(t, {})) if m not in NOT_PLOTTED]
               for t in tasks}
    figures = [([t], m, f"{t}: {m}", f"{_slug(t)}__{_slug(m)}.png") for t in tasks for m in metrics[t]]
    for metric in dict.fromkeys(m for t in tasks for m in metrics[t]):
        sharing = [t for t in tasks if metric in metrics[t]]
        if len(sharing) > 1:
            figures.append((sharing, metric, metric, f"all_tasks__{_slug(metric)}.png"))
    ticks = sorted({e["num_steps"] for e in entries})
    paths = []
    for shown, metric, title, name in figures:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for task in shown:
            _draw(ax, entries, task, metric, prefix=f"{task}, " if len(shown) > 1 else "")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("iterations of the recurrent block (mean under adaptive exit)")
        ax.set_ylabel(metric)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        with (directory / name).open("wb") as f:  # through epath: also to gs://
            fig.savefig(f, format="png", dpi=110)
        plt.close(fig)
        paths.append(directory / name)
    return paths


def write(output: str | os.PathLike, header: dict, entries: list[dict], samples: dict[tuple[str, str], list[dict]]
          ) -> dict:
    """Writes results.json, samples/<task>/<setting>.jsonl and plots/*.png under `output`; returns results."""
    output = as_path(output)
    output.mkdir(parents=True, exist_ok=True)
    for (task, setting), rows in samples.items():
        path = output / "samples" / _slug(task) / f"{_slug(setting)}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plots = [str(p.relative_to(output)) for p in plot(entries, output / "plots")]
    results = {**header, "results": entries, "plots": plots}
    (output / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    return results
