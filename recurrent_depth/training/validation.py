"""Validation of a whole run config (every section of `config.base_config`) before anything is built or compiled.

`validate_run_config` raises `ConfigError` naming the first bad field, e.g.
`train.log_every must be a positive integer, got 0`, so that a typo costs seconds, not a compiled step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import ml_collections

from recurrent_depth.data.chat_rows import LOSS_TOKENS
from recurrent_depth.data.config import SOURCE_FIELDS, SOURCE_KINDS
from recurrent_depth.data.pipeline import DATA_KINDS
from recurrent_depth.data.shell_game import ShellGameTokenizer
from recurrent_depth.data.tokenizer import TOKENIZER_KINDS
from recurrent_depth.decoding.exit_criteria import DEFAULT_THRESHOLDS
from recurrent_depth.errors import ConfigError
from recurrent_depth.evaluation.tasks import KINDS as TASK_KINDS  # the spec syntax only: eval.py reads the files
from recurrent_depth.model.config import DTYPES, ModelConfig
from recurrent_depth.runtime import sharding
from recurrent_depth.training.depth import DEPTH_KINDS
from recurrent_depth.training.optimizers import OPTIMIZER_NAMES, SCHEDULE_KINDS, make_schedule

EXIT_CRITERIA = (*DEFAULT_THRESHOLDS, "none")
SHELL_GAME_TOKENS = ShellGameTokenizer.vocab_size


def _get(config, name: str):
    """config's value at the dotted `name`; a missing field is a ConfigError naming it."""
    value = config
    for part in name.split("."):
        if not isinstance(value, (Mapping, ml_collections.ConfigDict)) or part not in value:
            raise ConfigError(f"{name} is missing from the config")
        value = value[part]
    return value


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _int(config, name: str, minimum: int = 1) -> int:
    value = _get(config, name)
    if not _is_int(value) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def _number(config, name: str, minimum: float = 0.0, strict: bool = False, maximum: float | None = None):
    value = _get(config, name)
    ok = _is_number(value) and (value > minimum if strict else value >= minimum)
    if ok and maximum is not None:
        ok = value < maximum
    if not ok:
        bound = f"{'>' if strict else '>='} {minimum}" + (f" and < {maximum}" if maximum is not None else "")
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _bool(config, name: str) -> bool:
    value = _get(config, name)
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")
    return value


def _choice(config, name: str, valid: Sequence[str]) -> str:
    value = _get(config, name)
    if value not in valid:
        raise ConfigError(f"{name} must be one of {tuple(valid)}, got {value!r}")
    return value


def _optional(config, name: str, check):
    return None if _get(config, name) is None else check(config, name)


def validate_run_config(config: ml_collections.ConfigDict, num_devices: int | None = None,
                        mesh_shape: Mapping[str, int] | None = None) -> ModelConfig:
    """Checks every section of a train.py run config; returns the model config.

    num_devices: the devices the run's `mesh.shape` must fill (None: not checked); mesh_shape: the (data, fsdp,
    tensor) sizes actually used, if already known (else `mesh.shape` resolved against num_devices), for the
    batch's divisibility.  (Each process reads the rows its devices hold, so the process count sets no rule.)
    """
    model = _model(config)
    mesh = _mesh(config, num_devices)
    if mesh_shape is not None:
        mesh = tuple(mesh_shape[a] for a in sharding.MESH_AXES)
    _train(config, model, mesh)
    _data(config, model)
    _checkpoint(config)
    _eval(config)
    _distributed(config)
    return model


def _model(config) -> ModelConfig:
    if not _is_int(_get(config, "seed")) or config.seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {config.seed!r}")
    try:
        return ModelConfig.from_dict(_get(config, "model"))
    except TypeError as err:  # a value of the wrong type in a ConfigDict
        raise ConfigError(f"model: {err}") from None


def _mesh(config, num_devices: int | None) -> tuple[int, ...] | None:
    shape = _get(config, "mesh.shape")
    if not isinstance(shape, Sequence) or isinstance(shape, str) or not all(_is_int(s) for s in shape):
        raise ConfigError(f"mesh.shape must be three integers (data, fsdp, tensor), got {shape!r}")
    try:
        sharding.rules_from_config(_get(config, "mesh.rules"))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"mesh.rules: {err}") from None
    try:
        if num_devices is None:
            sharding.resolve_mesh_shape(shape, math.prod(s for s in shape if s != -1))  # well-formed
            return None
        return sharding.resolve_mesh_shape(shape, num_devices)
    except ValueError as err:
        raise ConfigError(f"mesh.shape: {err}") from None


def _train(config, model: ModelConfig, mesh: tuple[int, ...] | None) -> None:
    steps = _int(config, "train.steps")
    batch = _int(config, "train.batch_size")
    seq_len = _int(config, "train.seq_len")
    micro = _int(config, "train.microbatches")
    _int(config, "train.log_every")
    _number(config, "train.z_loss")
    _bool(config, "train.skip_nonfinite")
    _number(config, "train.peak_flops")
    if not isinstance(config.train.get("init_from", ""), str):
        raise ConfigError(f"train.init_from must be a checkpoint path or '', got {config.train.init_from!r}")
    if seq_len > model.max_seq_len:
        raise ConfigError(f"train.seq_len ({seq_len}) exceeds model.max_seq_len ({model.max_seq_len})")
    if batch % micro:
        raise ConfigError(f"train.microbatches ({micro}) must divide train.batch_size ({batch})")
    if mesh is not None:
        shards = mesh[sharding.MESH_AXES.index("data")] * mesh[sharding.MESH_AXES.index("fsdp")]
        if (batch // micro) % shards:
            raise ConfigError(f"the microbatch size (train.batch_size / train.microbatches = {batch // micro}) "
                              f"must be divisible by the data x fsdp mesh size ({shards})")
    kind = _choice(config, "train.depth.kind", DEPTH_KINDS)
    _number(config, "train.depth.sigma")
    if kind == "fixed":
        _optional(config, "train.depth.n", lambda c, n: _int(c, n, minimum=0))
        k = _optional(config, "train.depth.k", lambda c, n: _int(c, n, minimum=0))
        if k is not None and k > model.mean_backprop_depth:
            raise ConfigError(f"train.depth.k ({k}) exceeds model.mean_backprop_depth ({model.mean_backprop_depth}), "
                              "the most gradient iterations one compiled step runs")
    _optimizer(config, steps)


def _optimizer(config, steps: int) -> None:
    p = "train.optimizer"
    _choice(config, f"{p}.name", OPTIMIZER_NAMES)
    schedule = _choice(config, f"{p}.schedule", SCHEDULE_KINDS)
    peak = _number(config, f"{p}.peak_learning_rate", strict=True)
    warmup = _int(config, f"{p}.warmup_steps", minimum=0)
    decay = _optional(config, f"{p}.decay_steps", _int)
    end = _number(config, f"{p}.end_learning_rate")
    _number(config, f"{p}.weight_decay")
    _number(config, f"{p}.b1", maximum=1.0)
    _number(config, f"{p}.b2", maximum=1.0)
    _number(config, f"{p}.eps", strict=True)
    _optional(config, f"{p}.grad_clip_norm", _number)
    _choice(config, f"{p}.moment_dtype", tuple(DTYPES))
    try:  # the fields' relations (warmup <= steps, wsd's decay_steps, ...), checked where they are defined
        make_schedule(schedule, peak, warmup, steps, decay_steps=decay, end_value=end)
    except ValueError as err:
        raise ConfigError(f"{p} (schedule {schedule!r}, train.steps={steps}): {err}") from None


def _sources(config, name: str, only: str | None = None) -> None:
    """A list of {kind, paths, weight} sources; `only`: the one kind allowed, the default of an omitted kind."""
    sources = _get(config, name)
    if isinstance(sources, (str, Mapping, ml_collections.ConfigDict)) or not isinstance(sources, Sequence):
        raise ConfigError(f"{name} must be a list of {{kind, paths, weight}} sources, got {sources!r}")
    for i, source in enumerate(sources):
        where = f"{name}[{i}]"
        if not isinstance(source, (Mapping, ml_collections.ConfigDict)):
            raise ConfigError(f"{where} must be a {{kind, paths, weight}} mapping, got {source!r}")
        kind = source.get("kind", only)
        if kind not in ((only,) if only else SOURCE_KINDS):
            valid = f"{only!r} (or left out) for data.kind={only!r}" if only else f"one of {SOURCE_KINDS}"
            raise ConfigError(f"{where}.kind must be {valid}, got {kind!r}")
        unknown = set(source) - {"kind", "paths", "weight", *SOURCE_FIELDS[kind]}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)} for a {kind} source (its fields: kind, "
                              f"paths, weight{''.join(', ' + f for f in SOURCE_FIELDS[kind])})")
        for field, minimum in (("row_length", 1), ("bos_id", -1)):
            if field in source and not (_is_int(source[field]) and source[field] >= minimum):
                raise ConfigError(f"{where}.{field} must be an integer >= {minimum}, got {source[field]!r}")
        paths = source.get("paths")
        if not paths or not (isinstance(paths, str) or all(isinstance(p, str) and p for p in paths)):
            raise ConfigError(f"{where}.paths must be a glob pattern or a list of them, got {paths!r}")
        weight = source.get("weight", 1.0)
        if not _is_number(weight) or weight <= 0:
            raise ConfigError(f"{where}.weight must be a positive number, got {weight!r}")


def _data(config, model: ModelConfig) -> None:
    kind = _choice(config, "data.kind", DATA_KINDS)
    _bool(config, "data.document_masking")
    tokenizer = _choice(config, "data.tokenizer.kind", TOKENIZER_KINDS)
    if kind == "shell_game" and model.vocab_size < SHELL_GAME_TOKENS:
        raise ConfigError(f"model.vocab_size ({model.vocab_size}) is below the shell game's {SHELL_GAME_TOKENS} "
                          "tokens (data.kind='shell_game')")
    if kind not in ("mixture", "chat"):
        return
    only = "chat" if kind == "chat" else None
    _sources(config, "data.sources", only)
    if not config.data.sources:
        raise ConfigError(f"data.sources is empty: data.kind={kind!r} needs at least one {{kind, paths, weight}}")
    _sources(config, "data.eval_sources", only)
    sources = [*config.data.sources, *config.data.eval_sources]
    if any(s.get("kind", only) == "chat" for s in sources):
        _choice(config, "data.chat.loss_tokens", LOSS_TOKENS)
        _bool(config, "data.chat.truncate")
        _bool(config, "data.chat.skip_malformed")
        if not isinstance(_get(config, "data.chat.system_prompt"), str):
            raise ConfigError(f"data.chat.system_prompt must be a string, got {config.data.chat.system_prompt!r}")
    _int(config, "data.read_threads")
    needs_tokenizer = any(s.get("kind", only) not in ("array_record", "parquet") for s in config.data.sources)
    if needs_tokenizer and tokenizer != "shell_game" and not _get(config, "data.tokenizer.path"):
        raise ConfigError("data.tokenizer.path is empty, but text/jsonl sources need a tokenizer")
    if _get(config, "eval.every") and not config.data.eval_sources:
        raise ConfigError(f"eval.every > 0 needs data.eval_sources (held-out data) for data.kind={kind!r}")


def _checkpoint(config) -> None:
    _int(config, "checkpoint.every")
    _int(config, "checkpoint.keep")
    _int(config, "checkpoint.keep_every", minimum=0)
    _bool(config, "checkpoint.async_save")


def _eval(config) -> None:
    _int(config, "eval.every", minimum=0)
    _int(config, "eval.batches")
    _int(config, "eval.batch_size")
    num_steps = _get(config, "eval.num_steps")
    if (isinstance(num_steps, str) or not isinstance(num_steps, Sequence) or not num_steps
            or not all(_is_int(r) and r >= 1 for r in num_steps)):
        raise ConfigError(f"eval.num_steps must be a non-empty list of positive integers, got {num_steps!r}")
    tasks = _get(config, "eval.tasks")
    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        raise ConfigError(f"eval.tasks must be a list of task specs (KIND:TARGET[:KEY=VALUE...]), got {tasks!r}")
    for spec in tasks:
        kind, _, target = str(spec).partition(":")
        if not isinstance(spec, str) or kind not in TASK_KINDS or not target:
            raise ConfigError(f"eval.tasks: {spec!r} is not KIND:TARGET[:KEY=VALUE...] with KIND one of "
                              f"{sorted(TASK_KINDS)}")
    _optional(config, "eval.exit_criterion", lambda c, n: _choice(c, n, EXIT_CRITERIA))
    _optional(config, "eval.exit_threshold", lambda c, n: _number(c, n, strict=True))


def _distributed(config) -> None:
    num = _optional(config, "distributed.num_processes", _int)
    pid = _optional(config, "distributed.process_id", lambda c, n: _int(c, n, minimum=0))
    if num is not None and pid is not None and pid >= num:
        raise ConfigError(f"distributed.process_id ({pid}) must be below distributed.num_processes ({num})")
    _bool(config, "distributed.auto")
