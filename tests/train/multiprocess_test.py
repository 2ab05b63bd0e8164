"""Same losses (1e-5) on 1 device, on 8 devices (fsdp=4 x tensor=2) and on 2 processes x 2
devices (jax.distributed on localhost, gloo; with the fused loss), and for the fused loss against
the full-logits loss; the step compiles once in each."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.train import multiprocess_worker as worker

HERE = pathlib.Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_device():
    return worker.run_losses({"data": 1}, jax.devices()[:1])


def test_eight_devices_fsdp_tensor_match_one_device(one_device):
    losses, compiles = worker.run_losses({"data": -1, "fsdp": 4, "tensor": 2})
    np.testing.assert_allclose(losses, one_device[0], rtol=1e-5, atol=1e-5)
    assert compiles == 1 and one_device[1] == 1


def test_fused_loss_step_matches_logits_step(one_device):
    """The default fused loss (hidden states + head, vocab-parallel chunks) trains identically."""
    fused_one, _ = worker.run_losses({"data": 1}, jax.devices()[:1], fused=True)
    np.testing.assert_allclose(fused_one, one_device[0], rtol=1e-5, atol=1e-5)
    fused_eight, compiles = worker.run_losses({"data": -1, "fsdp": 4, "tensor": 2}, fused=True)
    np.testing.assert_allclose(fused_eight, one_device[0], rtol=1e-5, atol=1e-5)
    assert compiles == 1


def test_remat_gives_the_same_losses(one_device):
    losses, _ = worker.run_losses({"data": 1}, jax.devices()[:1], remat_policy="full")
    np.testing.assert_allclose(losses, one_device[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_processes_two_devices_match_one_device(tmp_path, one_device):
    port, out = _free_port(), tmp_path / "losses.json"
    repo = HERE.parents[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(repo)
    procs = [subprocess.Popen([sys.executable, str(HERE / "multiprocess_worker.py"), str(i), "2",
                               str(port), "2", str(out)], cwd=repo, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=540)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    result = json.loads(out.read_text())
    np.testing.assert_allclose(result["losses"], one_device[0], rtol=1e-5, atol=1e-5)
    assert result["compiles"] == 1
