"""Ahead-of-time compilation of the train step and of generation for TPU slices, from any machine with the
`tpu` extra:

  python -m recurrent_depth.cli.aot --config=configs/huginn_3p5b.py --topology=v5p:4x4x4 --mesh=1,-1,4 \\
      [--config.model.remat_policy=nothing] [--config.train.batch_size=...]
  python -m recurrent_depth.cli.aot --step=generate --topology=v5e:2x2 --batch_size=16 --prompt_len=1024 \\
      --max_new_tokens=256 --num_steps=32 --cache_strategy=compress-4

Prints one JSON line: per-device argument/output/temporary memory against the chip's HBM, whether it fits,
and the compiled FLOPs (`cost_analysis`; Pallas kernels such as splash attention are not counted there, and a
loop body counts once, so generation's FLOPs are those of one pass through its loops).
"""

from __future__ import annotations

import json
import sys
import time

import flax.linen as nn
import jax
from absl import flags
from ml_collections import config_flags

from recurrent_depth.cli import app
from recurrent_depth.decoding.generate import lower_generate
from recurrent_depth.model.config import ModelConfig
from recurrent_depth.model.lm import RecurrentDepthLM, init_params
from recurrent_depth.runtime import sharding
from recurrent_depth.training.step import Trainer

PROG = "python -m recurrent_depth.cli.aot"
GIB = 2**30
HBM_BYTES = {"TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB, "TPU v5": 95 * GIB, "TPU v6 lite": 32 * GIB}

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", "configs/huginn_3p5b.py", "ml_collections config file.",
                                          flag_values=FLAGS, sys_argv=app.ARGV)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology name, e.g. v5p:4x4x4, v5e:4x4, v6e:4x4.",
                                flag_values=FLAGS)
_MESH = flags.DEFINE_string("mesh", "1,-1,1", "data,fsdp,tensor sizes (one may be -1).", flag_values=FLAGS)
_STEP = flags.DEFINE_enum("step", "train", ["train", "generate"], "What to compile: the train step (shapes from "
                          "the config's train section) or generation (shapes from the flags below).",
                          flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "generate: sequences per batch.", flag_values=FLAGS)
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 1024, "generate: prompt tokens.", flag_values=FLAGS)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "generate: tokens generated.", flag_values=FLAGS)
_NUM_STEPS = flags.DEFINE_integer("num_steps", 32, "generate: iterations of the core block per token.",
                                  flag_values=FLAGS)
_CACHE_STRATEGY = flags.DEFINE_string("cache_strategy", "full", "generate: full, compress-K, latest[-compress-K].",
                                      flag_values=FLAGS)


def _tpu_devices(topology: str):
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices


def _compile_and_report(lowered, devices, start: float) -> dict:
    """Compiles; per-device memory against the chip's HBM, compiled FLOPs and compile time.  A program that XLA
    finds too large for the chip is reported as not fitting, with XLA's message."""
    hbm = HBM_BYTES.get(devices[0].device_kind)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        return {"fits": False, "hbm_gib": round(hbm / GIB, 1) if hbm else None,
                "compile_error": str(err).strip().splitlines()[-1][:400],
                "compile_seconds": round(time.perf_counter() - start, 1)}
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    used = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes)
    return {
        "argument_gib": round(memory.argument_size_in_bytes / GIB, 2),
        "output_gib": round(memory.output_size_in_bytes / GIB, 2),
        "temp_gib": round(memory.temp_size_in_bytes / GIB, 2), "temp_bytes": int(memory.temp_size_in_bytes),
        "alias_gib": round(memory.alias_size_in_bytes / GIB, 2),
        "total_gib": round(used / GIB, 2), "total_bytes": int(used),
        "hbm_gib": round(hbm / GIB, 1) if hbm else None,
        "fits": used <= hbm if hbm else None,
        "compiled_tflops_per_device": float(f"{float(cost.get('flops', 0.0)) / 1e12:.4g}"),
        "compile_seconds": round(time.perf_counter() - start, 1),
    }


def compile_generate(config, topology: str, mesh_shape, *, batch_size: int, prompt_len: int, max_new_tokens: int,
                     num_steps: int, cache_strategy: str = "full") -> dict:
    """Compiles greedy generation (prefill and the decode loop, one compiled function) of config's model for
    `topology`, parameters sharded like in training and the batch over the data axes; reports memory per
    device (the KV cache is in the temporaries)."""
    devices = _tpu_devices(topology)
    mesh = sharding.make_mesh(mesh_shape, devices)
    rules = sharding.rules_from_config(config.mesh.rules)
    model = RecurrentDepthLM(ModelConfig.from_dict(config.model))
    boxed = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed),
                          shardings)
    start = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = lower_generate(model, params, batch_size, prompt_len, max_new_tokens=max_new_tokens,
                                 num_steps=num_steps, init_scale=0.0, cache_strategy=cache_strategy,
                                 input_sharding=sharding.batch_sharding(mesh, rules),
                                 replicated=sharding.replicated(mesh))
        report = _compile_and_report(lowered, devices, start)
    m = config.model
    return {"step": "generate", "topology": topology, "device_kind": devices[0].device_kind,
            "devices": len(devices), "mesh": dict(zip(("data", "fsdp", "tensor"), mesh.devices.shape)),
            "batch_size": batch_size, "prompt_len": prompt_len, "max_new_tokens": max_new_tokens,
            "num_steps": num_steps, "cache_strategy": cache_strategy, "param_dtype": m.param_dtype,
            "dtype": m.dtype, **report}


def compile_train_step(config, topology: str, mesh_shape) -> dict:
    """Compiles config's train step for `topology` and reports memory and FLOPs per device."""
    devices = _tpu_devices(topology)
    config.mesh.shape = tuple(mesh_shape)
    trainer = Trainer(config, sharding.make_mesh(mesh_shape, devices))
    start = time.perf_counter()
    report = _compile_and_report(trainer.lower(), devices, start)
    t, m = config.train, config.model
    return {
        "step": "train", "topology": topology, "device_kind": devices[0].device_kind, "devices": len(devices),
        "mesh": dict(zip(("data", "fsdp", "tensor"), trainer.mesh.devices.shape)),
        "batch_size": t.batch_size, "seq_len": t.seq_len, "microbatches": t.microbatches,
        "remat_policy": m.remat_policy, "attention_impl": m.attention_impl, "dtype": m.dtype,
        "moment_dtype": t.optimizer.moment_dtype, **report,
    }


def main(argv: list[str] | None = None) -> int:
    return app.run(_aot, FLAGS, argv, doc=__doc__, prog=PROG)


def _aot(args: list[str]) -> int:
    app.positional(args)
    try:
        mesh = tuple(int(x) for x in _MESH.value.split(","))
    except ValueError:
        raise app.UsageError(f"--mesh must be comma-separated integers, got {_MESH.value!r}") from None
    if _STEP.value == "train":
        result = compile_train_step(_CONFIG.value, _TOPOLOGY.value, mesh)
    else:
        result = compile_generate(_CONFIG.value, _TOPOLOGY.value, mesh, batch_size=_BATCH_SIZE.value,
                                  prompt_len=_PROMPT_LEN.value, max_new_tokens=_MAX_NEW_TOKENS.value,
                                  num_steps=_NUM_STEPS.value, cache_strategy=_CACHE_STRATEGY.value)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
