"""The program behind eval.py: load a checkpoint onto a mesh, sweep iteration counts over tasks, report."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Sequence

import jax
import ml_collections
from tqdm import tqdm

from recurrent_depth.checkpoint.loading import check_config, checkpoint_run_config, find_tokenizer, load_model
from recurrent_depth.checkpoint.params import param_shardings
from recurrent_depth.evaluation import report
from recurrent_depth.evaluation.engine import Depth, EvalModel
from recurrent_depth.evaluation.tasks import Task, parse_tasks
from recurrent_depth.model.config import ModelConfig
from recurrent_depth.runtime import sharding
from recurrent_depth.runtime.paths import as_path

DEFAULT_NUM_STEPS = (1, 4, 8, 16, 32)
DEFAULT_MESH = (1, -1, 1)  # (data, fsdp, tensor): every device on fsdp, the batch over all of them


def parse_mesh(text: str | Sequence[int]) -> tuple[int, ...]:
    """(data, fsdp, tensor) from '1,-1,1' or '1x-1x1' (one size may be -1, the rest of the devices)."""
    if not isinstance(text, str):
        return tuple(int(s) for s in text)
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"mesh must be three integers like 1,-1,1 (data, fsdp, tensor), got {text!r}") from None
    return sharding.resolve_mesh_shape(shape, jax.device_count())


def load_eval_model(checkpoint: str | os.PathLike, *, tokenizer: str | None = None, config: str | None = None,
                    dtype: str | None = None, mesh: str | Sequence[int] | None = None, batch_size: int = 8,
                    init_scale: float = 0.0, seed: int = 0, progress: bool = True) -> EvalModel:
    """A checkpoint (HF directory, parameter checkpoint or train.py workdir) with its tokenizer, sharded over a
    (data, fsdp, tensor) mesh of all devices; checked against `config` (a config file) if given."""
    checkpoint = as_path(checkpoint)
    run_config = checkpoint_run_config(checkpoint, config)
    text = find_tokenizer(checkpoint, tokenizer, run_config)  # before the (slow) model load
    mesh = sharding.make_mesh(parse_mesh(mesh if mesh is not None else DEFAULT_MESH))
    has_rules = run_config is not None and run_config.get("mesh") is not None
    rules = sharding.rules_from_config(run_config.mesh.rules) if has_rules else sharding.DEFAULT_RULES
    # Each device reads only its shard of every tensor: the model never has to fit one device.
    model, params = load_model(checkpoint, dtype=dtype, shardings=param_shardings(mesh, rules))
    if config:
        check_config(model.config, ModelConfig.from_dict(run_config.model), f"--config={config}")
    return EvalModel(model, params, text, mesh=mesh, rules=rules, batch_size=batch_size, init_scale=init_scale,
                     seed=seed, progress=progress)


def sweep(lm: EvalModel, tasks: Sequence[Task], depths: Sequence[Depth]
          ) -> tuple[list[dict], dict[tuple[str, str], list[dict]]]:
    """Every task at every depth: one results entry per depth, and the per-example samples."""
    entries, samples = [], {}
    lm.max_steps = max(lm.max_steps, *(d.num_steps for d in depths))  # one generation compilation for the sweep
    progress = tqdm(total=len(tasks) * len(depths), desc="eval", disable=not lm.progress)
    for depth in depths:
        entry = {"setting": depth.label, "num_steps": depth.num_steps, "exit_criterion": depth.exit_criterion,
                 "exit_threshold": depth.exit_threshold, "tasks": {}}
        for task in tasks:
            start = time.perf_counter()
            result = task.evaluate(lm, depth)
            entry["tasks"][task.name] = {**result.metrics, "seconds": round(time.perf_counter() - start, 3)}
            samples[(task.name, depth.label)] = result.samples
            progress.update(1)
            progress.set_postfix_str(f"{task.name} {depth.label}")
        entries.append(entry)
    progress.close()
    return entries, samples


def depths_for(num_steps: Sequence[int], exit_criterion: str | None = None, exit_threshold: float | None = None,
               max_exit_steps: int | None = None) -> list[Depth]:
    """Fixed depths for each count, plus adaptive exit (at most max_exit_steps, default the largest count)."""
    if not num_steps:
        raise ValueError("give at least one iteration count")
    depths = [Depth(int(r)) for r in dict.fromkeys(num_steps)]
    if exit_criterion:
        depths.append(Depth(max_exit_steps or max(d.num_steps for d in depths), exit_criterion, exit_threshold))
    elif exit_threshold is not None or max_exit_steps is not None:
        raise ValueError("an exit threshold or maximum needs an exit criterion")
    return depths


def evaluate_checkpoint(checkpoint: str | os.PathLike, tasks: Sequence[str | Task] | None = None, *,
                        num_steps: Sequence[int] | None = None, output: str | os.PathLike | None = None,
                        config: str | None = None, tokenizer: str | None = None,
                        mesh: str | Sequence[int] | None = None, batch_size: int | None = None,
                        dtype: str | None = None, init_scale: float = 0.0, seed: int = 0,
                        exit_criterion: str | None = None,
                        exit_threshold: float | None = None, max_exit_steps: int | None = None,
                        chat_template: bool = False, system_prompt: str | None = None,
                        progress: bool = True) -> dict:
    """The whole evaluation: tasks (specs or Task objects, checked first) at each iteration count and optionally
    under adaptive exit; prints the table and, with `output`, writes results.json, samples and plots there.

    What is not given comes from the run's config (the --config file or the workdir's): its eval.tasks,
    eval.num_steps (else 1,4,8,16,32), eval.batch_size (else 8) and eval.exit_criterion / exit_threshold ('none'
    turns adaptive exit off).
    Returns the results.
    """
    if not as_path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist (a train.py workdir, a parameter "
                                f"checkpoint or a Hugging Face directory)")
    run_config = checkpoint_run_config(as_path(checkpoint), config)
    defaults = run_config.get("eval") if run_config is not None else None
    defaults = defaults if defaults is not None else ml_collections.ConfigDict()
    if not tasks:
        tasks = list(defaults.get("tasks") or ())
        if not tasks:
            where = (f"the run config of {checkpoint} names no eval.tasks" if run_config is not None
                     else f"{checkpoint} is not a train.py workdir, whose config could name them")
            raise ValueError(f"no tasks to evaluate: pass --tasks ({where})")
    if exit_criterion is None and exit_threshold is None:
        exit_criterion, exit_threshold = defaults.get("exit_criterion"), defaults.get("exit_threshold")
    exit_criterion = None if exit_criterion == "none" else exit_criterion
    tasks = parse_tasks(list(tasks), {"chat": chat_template, "system": system_prompt})
    if num_steps is None:
        num_steps = tuple(defaults.num_steps) if defaults.get("num_steps") else DEFAULT_NUM_STEPS
    depths = depths_for(num_steps, exit_criterion, exit_threshold, max_exit_steps)
    batch_size = batch_size or defaults.get("batch_size") or 8
    lm = load_eval_model(checkpoint, tokenizer=tokenizer, config=config, dtype=dtype, mesh=mesh,
                         batch_size=batch_size, init_scale=init_scale, seed=seed, progress=progress)
    entries, samples = sweep(lm, tasks, depths)
    header = {"checkpoint": str(checkpoint), "created": datetime.datetime.now().isoformat(timespec="seconds"),
              "model_config": lm.config.to_dict(), "platform": jax.devices()[0].platform,
              "mesh": dict(lm.mesh.shape), "batch_size": lm.batch_size,
              "init_scale": lm.init_scale, "seed": lm.seed, "tasks": {t.name: t.info() for t in tasks}}
    results = {**header, "results": entries}
    if jax.process_index() == 0:
        print(report.table(entries))
        if output is not None:
            results = report.write(output, header, entries, samples)
            print(f"wrote {as_path(output) / report.RESULTS_FILE}")
    return results
