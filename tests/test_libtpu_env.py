"""libtpu_env: libtpu is answered on a host without a TPU chip, and left alone on a TPU host."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qtarget_jax import libtpu_env

KEYS = ("TPU_SKIP_MDS_QUERY", "ALLOW_MULTIPLE_LIBTPU_LOAD", "TPU_WORKER_HOSTNAMES",
        "TPU_ACCELERATOR_TYPE", "JAX_PLATFORMS")


@pytest.fixture
def clean_env(monkeypatch):
    for key in KEYS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_no_chip_sets_the_answers(clean_env):
    clean_env.setattr(libtpu_env, "has_tpu_chip", lambda: False)
    libtpu_env.quiet_without_tpu()
    assert os.environ["TPU_WORKER_HOSTNAMES"] == "localhost"
    assert os.environ["TPU_SKIP_MDS_QUERY"] == "1"
    assert os.environ["TPU_ACCELERATOR_TYPE"] == "v5p-8"


def test_a_tpu_host_or_a_chosen_platform_is_left_alone(clean_env):
    clean_env.setattr(libtpu_env, "has_tpu_chip", lambda: True)
    libtpu_env.quiet_without_tpu()
    assert not any(key in os.environ for key in KEYS)
    clean_env.setattr(libtpu_env, "has_tpu_chip", lambda: False)
    clean_env.setenv("JAX_PLATFORMS", "cuda")
    libtpu_env.quiet_without_tpu()
    assert "TPU_WORKER_HOSTNAMES" not in os.environ


def test_a_users_setting_is_never_overwritten(clean_env):
    clean_env.setenv("TPU_ACCELERATOR_TYPE", "v6e-8")
    libtpu_env.answer_libtpu("v5p-8")
    assert os.environ["TPU_ACCELERATOR_TYPE"] == "v6e-8"
    assert os.environ["TPU_WORKER_HOSTNAMES"] == "localhost"


def test_the_chip_check_reads_pci_vendors(tmp_path, monkeypatch):
    for name, vendor in (("0000:00:01.0", "0x8086"), ("0000:00:04.0", "0x1ae0")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "vendor").write_text(vendor + "\n")
    monkeypatch.setattr(libtpu_env.glob, "glob",
                        lambda pattern: sorted(str(p) for p in tmp_path.glob("*/vendor")))
    assert libtpu_env.has_tpu_chip()
    (tmp_path / "0000:00:04.0" / "vendor").write_text("0x10de\n")
    assert not libtpu_env.has_tpu_chip()


@pytest.mark.skipif(libtpu_env.has_tpu_chip(), reason="a TPU host: libtpu has a chip to find")
def test_a_program_on_this_cpu_host_prints_no_libtpu_errors():
    """With libtpu installed (make venv installs .[tpu]) and no JAX_PLATFORMS, a bare JAX
    program prints libtpu's worker-hostname errors; the entry points' call removes them."""
    env = {k: v for k, v in os.environ.items() if k not in KEYS}
    probe = "import jax; print(jax.devices()[0].platform)"

    def stderr_of(code: str) -> str:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120, check=True)
        assert out.stdout.strip() == "cpu"
        return out.stderr

    assert "TPU_WORKER_HOSTNAMES" in stderr_of(probe)      # what a newcomer saw
    quiet = "from qtarget_jax.libtpu_env import quiet_without_tpu; quiet_without_tpu(); "
    assert "TPU_WORKER_HOSTNAMES" not in stderr_of(quiet + probe)
