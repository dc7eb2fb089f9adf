"""Ahead-of-time compilation of the train step for TPU slices, from any machine with the `tpu` extra.

  python -m recurrent_depth.aot --config=configs/huginn_3p5b.py --topology=v5p:4x4x4 --mesh=1,-1,4 \\
      [--config.model.remat_policy=nothing] [--config.train.batch_size=...]

Prints one JSON line: per-device argument/output/temporary memory against the chip's HBM, whether it fits,
and the compiled FLOPs (`cost_analysis`; Pallas kernels such as splash attention are not counted there).
"""

from __future__ import annotations

import json
import time

from absl import app, flags
from ml_collections import config_flags

GIB = 2**30
HBM_BYTES = {"TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB, "TPU v5": 95 * GIB, "TPU v6 lite": 32 * GIB}

_CONFIG = config_flags.DEFINE_config_file("config", "configs/huginn_3p5b.py", "ml_collections config file.")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology name, e.g. v5p:4x4x4, v5e:4x4, v6e:4x4.")
_MESH = flags.DEFINE_string("mesh", "1,-1,1", "data,fsdp,tensor sizes (one may be -1).")


def compile_train_step(config, topology: str, mesh_shape) -> dict:
    """Compiles config's train step for `topology` and reports memory and FLOPs per device."""
    from jax.experimental import topologies

    from recurrent_depth.sharding import make_mesh
    from recurrent_depth.training import Trainer

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    config.mesh.shape = tuple(mesh_shape)
    trainer = Trainer(config, make_mesh(mesh_shape, devices))
    start = time.perf_counter()
    compiled = trainer.lower().compile()
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    used = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes)
    hbm = HBM_BYTES.get(devices[0].device_kind)
    t, m = config.train, config.model
    return {
        "topology": topology, "device_kind": devices[0].device_kind, "devices": len(devices),
        "mesh": dict(zip(("data", "fsdp", "tensor"), trainer.mesh.devices.shape)),
        "batch_size": t.batch_size, "seq_len": t.seq_len, "microbatches": t.microbatches,
        "remat_policy": m.remat_policy, "attention_impl": m.attention_impl, "dtype": m.dtype,
        "moment_dtype": t.optimizer.moment_dtype,
        "argument_gib": round(memory.argument_size_in_bytes / GIB, 2),
        "output_gib": round(memory.output_size_in_bytes / GIB, 2),
        "temp_gib": round(memory.temp_size_in_bytes / GIB, 2),
        "alias_gib": round(memory.alias_size_in_bytes / GIB, 2),
        "total_gib": round(used / GIB, 2), "hbm_gib": round(hbm / GIB, 1) if hbm else None,
        "fits": used <= hbm if hbm else None,
        "compiled_tflops_per_device": float(f"{float(cost.get('flops', 0.0)) / 1e12:.4g}"),
        "compile_seconds": round(time.perf_counter() - start, 1),
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    mesh = tuple(int(x) for x in _MESH.value.split(","))
    print(json.dumps(compile_train_step(_CONFIG.value, _TOPOLOGY.value, mesh)))


if __name__ == "__main__":
    app.run(main)
