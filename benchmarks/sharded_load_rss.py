"""Peak host RSS of building the train state of SmolLM2-135M (student + frozen initial teacher +
AdamW state) on 8 CPU devices with fsdp=8: the previous path against the sharded one.

    previous: load_model() without a mesh (whole float32 model on the host, then on device 0),
              teacher = nnx.clone(student) (a second whole copy), every param copied to the host
              and cut into shards (put_global)
    sharded:  load_model(mesh=...) (each shard read from the safetensors slices into its
              device), the teacher a jitted device copy of the sharded params (init_state)

Each path runs in fresh processes, as 1 host with 8 devices and as 2 hosts (local processes,
jax.distributed + gloo) with 4 devices each; ru_maxrss is a process's peak, the largest process
is reported. On CPU a host's "devices" live in its own memory, so the floor is that host's share
of the state (student + teacher + Adam mu/nu = 4 x 0.54 GB float32, / hosts) plus the runtime
(~0.2 GB) and the safetensors pages it maps; the previous path holds whole models on every
host whatever their number.

    JAX_PLATFORMS=cpu python benchmarks/sharded_load_rss.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def _child(path: str, pid: int, nproc: int, port: int) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // nproc}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import resource

    import jax
    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{port}", nproc, pid)
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
        built = init_state(model, tx, mesh, seed=0, teacher=INITIAL, teacher_dtype="float32",
                           consume=True)
    jax.block_until_ready(built.state)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = sum(x.size for x in jax.tree.leaves(built.state.params))
    print(json.dumps({"path": path, "peak_rss_mib": peak / 1024, "import_rss_mib": base / 1024,
                      "params": int(n)}))
    if nproc > 1:
        jax.distributed.shutdown()


def _measure(path: str, nproc: int) -> dict:
    """Peak RSS (MiB) of the largest of `nproc` processes building the state by `path`."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, path, str(i), str(nproc), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
             for i in range(nproc)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise SystemExit(err[-3000:])
    rows = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    return max(rows, key=lambda r: r["peak_rss_mib"])


def main() -> None:
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"SmolLM2-135M, student + initial teacher + AdamW (4 x 0.54 GB float32), 8 CPU "
          f"devices with fsdp=8; load average {' '.join(load)}")
    print("  hosts  devices/host  previous path  sharded path  previous / sharded")
    for nproc in (1, 2):
        prev = _measure("previous", nproc)["peak_rss_mib"]
        shard = _measure("sharded", nproc)["peak_rss_mib"]
        print(f"  {nproc:5d}  {8 // nproc:12d}  {prev:9.0f} MiB  {shard:8.0f} MiB  "
              f"{prev / shard:18.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
