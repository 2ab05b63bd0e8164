"""Fixtures for the tpu_scripts/ tests: settings files, a fake `gcloud` on PATH, a runner.

The helpers they use live in tpu_helpers.py (a unique module name, importable from tests).
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from tpu_helpers import FAKE_GCLOUD, SCRIPTS, FakeGcloud, write_settings

# A terminal starts a job with SIGINT at its default action. A test process may have inherited
# SIGINT ignored (`pytest ... &` from a script), and bash cannot trap a signal ignored on entry:
# reset it, then exec the command (no preexec_fn: unsafe in a process with threads).
AS_TERMINAL_JOB = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT]); "
                   "os.execvp(sys.argv[1], sys.argv[1:])")


@pytest.fixture
def fake_gcloud(tmp_path: pathlib.Path) -> FakeGcloud:
    d = tmp_path / "fakebin"
    d.mkdir()
    script = d / "gcloud"
    script.write_text(FAKE_GCLOUD)
    script.chmod(0o755)
    return FakeGcloud(d)


@pytest.fixture
def settings_file(tmp_path: pathlib.Path):
    """Factory: settings_file(V5E_8) -> path of a settings file holding those keys."""
    def make(settings: dict[str, str], name: str = "settings.env") -> pathlib.Path:
        return write_settings(tmp_path / name, settings)
    return make


@pytest.fixture
def run_script(tmp_path: pathlib.Path, fake_gcloud: FakeGcloud):
    """Runs tpu_scripts/NAME.sh with the fake gcloud first on PATH, no sleeping, and the local
    staging folder in tmp_path. Returns the CompletedProcess (text, never raises), or with
    background=True the running Popen (own process group)."""
    stage = tmp_path / "stage"

    def run(name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60,
            background: bool = False) -> subprocess.CompletedProcess | subprocess.Popen:
        full_env = {
            "PATH": f"{fake_gcloud.dir}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "QT_RETRY_SLEEP_S": "0",
            "QT_POLL_S": "0",
            "QT_STAGE_DIR": str(stage),
            "QT_LAUNCH_ID": "L1",
            "LC_ALL": "C",
        }
        full_env.update(env or {})
        if background:  # its own process group, so a test can Ctrl-C it like a terminal
            return subprocess.Popen(
                [sys.executable, "-c", AS_TERMINAL_JOB, "bash", str(SCRIPTS / f"{name}.sh"),
                 *args], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, cwd=tmp_path, start_new_session=True)
        return subprocess.run(["bash", str(SCRIPTS / f"{name}.sh"), *args], env=full_env,
                              capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    run.stage = stage
    return run


@pytest.fixture
def env_without_settings(tmp_path: pathlib.Path) -> dict[str, str]:
    return {"QT_SETTINGS": str(tmp_path / "does-not-exist.env"), "PATH": os.environ["PATH"]}
