"""Peak host RSS of building the train state of SmolLM2-135M (student + frozen initial teacher +
AdamW state) on 8 CPU devices with fsdp=8: the previous path against the sharded one.

    previous: load_model() without a mesh (whole float32 model on the host, then on device 0),
              teacher = nnx.clone(student) (a second whole copy), every param copied to the host
              and cut into shards (put_global)
    sharded:  load_model(mesh=...) (each shard read from the safetensors slices into its
              device), the teacher a jitted device copy of the sharded params (init_state)

Each path runs in a fresh subprocess; ru_maxrss is that process's peak. On CPU the 8 "devices"
live in the same process, so the sharded path's floor is the weights themselves (student +
teacher + Adam mu/nu = 4 copies of 135M float32 = ~2.2 GB) plus the Python/JAX runtime; on a
pod every host holds only its own devices' shards.

    JAX_PLATFORMS=cpu python benchmarks/sharded_load_rss.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def _child(path: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import resource

    import jax
    import numpy as np
    from flax import nnx

    from qtarget_jax.config import ModelSection, OptimSection, ScheduleSection
    from qtarget_jax.models.loading import load_model
    from qtarget_jax.train import build
    from qtarget_jax.train import mesh as mesh_lib
    from qtarget_jax.train.optim import make_optimizer
    from qtarget_jax.train.state import INITIAL, init_state

    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 8})
    tx, _ = make_optimizer(OptimSection(), ScheduleSection(), 10)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if path == "previous":
        model, _, _ = load_model("smollm2", param_dtype="float32", scan_layers=True)
        teacher = nnx.clone(model)
        # put_global as it was: every param fetched to the host, then cut per shard.
        model_host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), nnx.state(model))
        teacher_host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), nnx.state(teacher))
        nnx.update(model, model_host)
        nnx.update(teacher, teacher_host)
        built = init_state(model, tx, mesh, seed=0, teacher=teacher)
        del model_host, teacher_host
    else:
        section = ModelSection(source="smollm2", config={"scan_layers": True})
        model, _, _ = build.build_model(section, 0, mesh=mesh)
        built = init_state(model, tx, mesh, seed=0, teacher=INITIAL, teacher_dtype="float32")
    jax.block_until_ready(built.state)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = sum(x.size for x in jax.tree.leaves(built.state.params))
    print(json.dumps({"path": path, "peak_rss_mib": peak / 1024, "import_rss_mib": base / 1024,
                      "params": int(n)}))


def main() -> None:
    results = {}
    for path in ("previous", "sharded"):
        out = subprocess.run([sys.executable, __file__, path], capture_output=True, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        results[path] = json.loads(out.stdout.strip().splitlines()[-1])
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    prev, shard = results["previous"]["peak_rss_mib"], results["sharded"]["peak_rss_mib"]
    print(f"SmolLM2-135M ({results['sharded']['params'] / 1e6:.1f}M params), student + "
          f"initial teacher + AdamW, 8 CPU devices fsdp=8, load average {' '.join(load)}")
    print(f"  peak host RSS previous path: {prev:8.0f} MiB")
    print(f"  peak host RSS sharded path:  {shard:8.0f} MiB")
    print(f"  ratio previous / sharded:    {prev / shard:8.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        _child(sys.argv[1])
    else:
        main()
