"""The worker-side scripts (tpu_scripts/remote/) run for real on this machine, in a fake code
folder whose `.venv/bin/python` stands in for train.py: launch detaches, status reports, a
retried launch is a no-op, another launch is refused, stop sends SIGTERM (the run checkpoints)
and records "stopped"."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import time

import pytest
from tpu_helpers import SCRIPTS

# Stand-in for `.venv/bin/python train.py --config ...`; FAKE_TRAIN picks the behaviour.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "fake python: $* (JAX_COORDINATOR_ADDRESS=${JAX_COORDINATOR_ADDRESS:-unset})"
case ${FAKE_TRAIN:-sleep} in
  sleep)
    trap 'echo "SIGTERM: checkpoint saved"; exit 0' TERM
    while true; do sleep 0.05; done ;;
  exit*) exit "${FAKE_TRAIN#exit }" ;;
esac
"""


@pytest.fixture
def worker(tmp_path: pathlib.Path):
    """A code folder like REMOTE_DIR after sync.sh + setup.sh; returns a runner for its
    remote scripts and the log folder."""
    code = tmp_path / "qtarget-jax"
    shutil.copytree(SCRIPTS / "remote", code / "tpu_scripts" / "remote")
    (code / ".venv" / "bin").mkdir(parents=True)
    python = code / ".venv" / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    (code / "train.py").write_text("")
    (code / "configs").mkdir()
    (code / "configs" / "job.yaml").write_text("run: {steps: 3}\n")
    logs = tmp_path / "qtarget-logs"
    # The TPU metadata server's worker-network-endpoints, served from a file (curl file://).
    endpoints = tmp_path / "worker-network-endpoints"
    endpoints.write_text("unknown:unknown:10.130.0.12")

    def run(script: str, *args: str, fake_train: str = "sleep") -> subprocess.CompletedProcess:
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "QT_LOG_DIR": str(logs),
               "FAKE_TRAIN": fake_train, "QT_TPU_METADATA_URL": endpoints.as_uri()}
        return subprocess.run(["bash", str(code / "tpu_scripts" / "remote" / script), *args],
                              env=env, capture_output=True, text=True, timeout=60)
    run.logs = logs
    run.code = code
    run.endpoints = endpoints
    yield run
    run("stop_train.sh", "5")  # never leave a stand-in running


def _wait_for(path: pathlib.Path, timeout_s: float = 20) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {timeout_s}s")


@pytest.mark.parametrize("fake_train,status", [("exit 0", "finished 0"), ("exit 3", "failed 3")])
def test_launch_records_how_the_run_ended(fake_train, status, worker):
    proc = worker("launch.sh", "--launch-id", "L1", "configs/job.yaml", "run.steps=3",
                  fake_train=fake_train)
    assert proc.returncode == 0, proc.stderr
    assert "started pid" in proc.stdout
    _wait_for(worker.logs / "exit_code")
    assert worker("train_status.sh").stdout.strip() == status
    log = (worker.logs / "train.log").read_text()
    assert ("fake python: train.py --config configs/job.yaml run.steps=3 "
            "(JAX_COORDINATOR_ADDRESS=unset)") in log, "single host: no jax.distributed"


def test_launch_status_refuse_stop(worker):
    proc = worker("launch.sh", "--launch-id", "L1", "configs/job.yaml")
    assert proc.returncode == 0, proc.stderr
    pid = _wait_for(worker.logs / "train.pid")
    assert worker("train_status.sh").stdout.strip() == f"running {pid}"

    retry = worker("launch.sh", "--launch-id", "L1", "configs/job.yaml")  # run.sh's ssh retry
    assert retry.returncode == 0, retry.stderr
    assert f"launch L1 already started here (pid {pid})" in retry.stdout
    assert worker.logs.joinpath("train.pid").read_text().strip() == pid

    again = worker("launch.sh", "--launch-id", "L2", "configs/job.yaml")  # a new run.sh
    assert again.returncode == 3
    assert f"a run is still going (pid {pid}): stop.sh first" in again.stderr

    stop = worker("stop_train.sh", "10")
    assert stop.returncode == 0, stop.stderr
    assert "SIGTERM to process group" in stop.stdout
    assert _wait_for(worker.logs / "exit_code") == "stopped"
    assert worker("train_status.sh").stdout.strip() == "stopped"
    assert "SIGTERM: checkpoint saved" in (worker.logs / "train.log").read_text()
    assert subprocess.run(["kill", "-0", pid], capture_output=True).returncode != 0


def test_status_and_stop_when_nothing_ran(worker):
    assert worker("train_status.sh").stdout.strip() == "none"
    proc = worker("stop_train.sh", "1")
    assert proc.returncode == 0 and "no run going" in proc.stdout


def test_launch_without_setup_or_config_fails_clearly(worker):
    proc = worker("launch.sh", "--launch-id", "L1", "configs/missing.yaml")
    assert proc.returncode == 2
    assert "config 'configs/missing.yaml' not found" in proc.stderr
    shutil.rmtree(worker.code / ".venv")
    proc = worker("launch.sh", "--launch-id", "L1", "configs/job.yaml")
    assert proc.returncode == 2
    assert "run tpu_scripts/setup.sh first" in proc.stderr


def test_setup_worker_needs_synced_code(tmp_path):
    remote = tmp_path / "x" / "tpu_scripts" / "remote"
    shutil.copytree(SCRIPTS / "remote", remote)
    proc = subprocess.run(["bash", str(remote / "setup_worker.sh"), "3.11", "0.10.2"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "no pyproject.toml" in proc.stderr and "run tpu_scripts/sync.sh first" in proc.stderr


@pytest.mark.parametrize("endpoints,coordinator", [
    ("unknown:unknown:10.130.0.12,unknown:unknown:10.130.0.13", "10.130.0.12:8482"),
    ("t1v-n-0-w-0,t1v-n-0-w-1,t1v-n-0-w-2,t1v-n-0-w-3", "t1v-n-0-w-0:8482"),
])
def test_multi_host_launch_points_jax_distributed_at_worker_0(endpoints, coordinator, worker):
    worker.endpoints.write_text(endpoints)
    proc = worker("launch.sh", "--launch-id", "L1", "configs/job.yaml", fake_train="exit 0")
    assert proc.returncode == 0, proc.stderr
    assert f"coordinator {coordinator}" in proc.stdout
    _wait_for(worker.logs / "exit_code")
    assert f"(JAX_COORDINATOR_ADDRESS={coordinator})" in (worker.logs / "train.log").read_text()


def test_launch_off_a_tpu_vm_fails_clearly(worker):
    worker.endpoints.unlink()
    proc = worker("launch.sh", "--launch-id", "L1", "configs/job.yaml")
    assert proc.returncode == 2
    assert "cannot read file://" in proc.stderr and "not a Cloud TPU VM?" in proc.stderr


def _fake_bin(tmp_path: pathlib.Path, scripts: dict[str, str]) -> str:
    """A PATH with stand-ins for `scripts` (name -> bash body) in front of the real one."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_free_tpu_kills_stale_holders_and_removes_the_lockfile(tmp_path):
    dev = tmp_path / "dev"
    (dev / "vfio").mkdir(parents=True)
    (dev / "accel0").touch()
    (dev / "vfio" / "0").touch()
    lockfile = tmp_path / "libtpu_lockfile"
    lockfile.touch()
    stale = subprocess.Popen(["sleep", "60"])
    calls = tmp_path / "lsof_calls"
    path = _fake_bin(tmp_path, {
        "sudo": 'exec "$@"\n',  # the worker's passwordless sudo
        "lsof": f'echo "$*" >> {calls}\necho {stale.pid}\necho {stale.pid}\n',
    })
    try:
        proc = subprocess.run(["bash", str(SCRIPTS / "remote" / "free_tpu.sh")],
                              env={"PATH": path, "QT_DEV_DIR": str(dev),
                                   "QT_LIBTPU_LOCKFILE": str(lockfile)},
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert stale.wait(timeout=10) == -9
    finally:
        stale.kill()
    assert calls.read_text().split() == ["-t", str(dev / "accel0"), str(dev / "vfio" / "0")]
    assert f"killing stale TPU holders: {stale.pid}" in proc.stdout
    assert f"removing {lockfile}" in proc.stdout and not lockfile.exists()


def test_free_tpu_on_a_free_tpu_does_nothing(tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "accel0").touch()
    path = _fake_bin(tmp_path, {"sudo": 'exec "$@"\n', "lsof": "exit 1\n"})  # nobody holds it
    proc = subprocess.run(["bash", str(SCRIPTS / "remote" / "free_tpu.sh")],
                          env={"PATH": path, "QT_DEV_DIR": str(dev),
                               "QT_LIBTPU_LOCKFILE": str(tmp_path / "absent")},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


def test_setup_worker_installs_python_venv_project_and_jax_tpu(tmp_path):
    code = tmp_path / "qtarget-jax"
    shutil.copytree(SCRIPTS / "remote", code / "tpu_scripts" / "remote")
    (code / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    calls = tmp_path / "uv_calls"
    path = _fake_bin(tmp_path, {
        "curl": "echo curl must not run when uv is installed >&2; exit 1\n",
        "uv": f"""echo "$*" >> {calls}
if [[ $1 == venv ]]; then
  mkdir -p .venv/bin
  printf '#!/usr/bin/env bash\\ncat >/dev/null; echo fake versions\\n' > .venv/bin/python
  chmod +x .venv/bin/python
fi
""",
    })
    proc = subprocess.run(["bash", str(code / "tpu_scripts" / "remote" / "setup_worker.sh"),
                           "3.11", "0.10.2"], env={"PATH": path, "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert calls.read_text().splitlines() == [
        "python install 3.11",
        "venv --allow-existing --python 3.11 .venv",
        "pip install --python .venv/bin/python -e . jax[tpu]==0.10.2",
    ]
    assert "fake versions" in proc.stdout
