"""Checkpoint retention (last K + best) and restore; metrics JSONL, curves, MFU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtarget_jax import checkpoint as ckpt_lib
from qtarget_jax.train import metrics as metrics_lib


def _items(step):
    return {"step": jnp.asarray(step, jnp.int32),
            "params": {"w": jnp.full((4, 2), step, jnp.float32)}}


def test_keeps_last_k_plus_best_and_restores(tmp_path):
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2, best_metric="eval/loss", best_mode="min")
    evals = {1: 3.0, 2: 1.0, 3: 2.0, 4: 5.0, 5: 4.0}
    for step, loss in evals.items():
        ck.save(step, _items(step), {"processes": [{"row": step}]}, metrics={"eval/loss": loss})
    ck.wait()
    assert ck.manager.all_steps() == [2, 4, 5]  # last two + best (eval/loss 1.0 at step 2)
    assert ck.latest_step() == 5
    shardings = jax.tree.map(lambda x: x.sharding, _items(0))
    items, data = ck.restore(2, ckpt_lib.abstract_like(_items(0), shardings))
    np.testing.assert_array_equal(items["params"]["w"], np.full((4, 2), 2.0))
    assert data == {"processes": [{"row": 2}]}
    ck.close()


def test_relative_checkpoint_dir_is_resolved_against_the_working_dir(tmp_path, monkeypatch):
    """`make train` passes run.dir=runs/...: Orbax itself only accepts absolute paths."""
    monkeypatch.chdir(tmp_path)
    ck = ckpt_lib.Checkpointer("runs/rel/checkpoints", keep=1, async_save=False)
    ck.save(1, _items(1), {"processes": [{"row": 1}]})
    ck.wait()
    assert ck.latest_step() == 1 and (tmp_path / "runs/rel/checkpoints/1").is_dir()
    ck.close()
    assert str(ckpt_lib.checkpoint_path("gs://bucket/run")) == "gs://bucket/run"


def test_check_writable_creates_and_probes(tmp_path):
    path = ckpt_lib.check_writable(str(tmp_path / "a" / "b"), need_bytes=1024)
    assert path.exists() and not list(path.iterdir())


def test_metrics_jsonl_tensorboard_and_curves(tmp_path):
    writer = metrics_lib.MetricsWriter(str(tmp_path), active=True, tensorboard=True)
    for step in range(1, 6):
        writer.write(step, {"loss": 3.0 / step, "q/p_y": 0.1 * step, "grad_norm": np.float32(1)})
    writer.write(5, {"eval/loss": 0.9})
    writer.close()
    recs = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
    assert recs[0] == {"step": 1, "loss": 3.0, "q/p_y": 0.1, "grad_norm": 1.0}
    assert list((tmp_path / "tb").iterdir())
    keys = metrics_lib.plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert keys == ["loss", "eval/loss", "q/p_y", "grad_norm"]
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_inactive_writer_writes_nothing(tmp_path):
    writer = metrics_lib.MetricsWriter(str(tmp_path), active=False, tensorboard=True)
    writer.write(1, {"loss": 1.0})
    assert not list(tmp_path.iterdir())


def test_flops_and_mfu():
    # SmolLM2-135M at T=256: 6N dominates the attention term 12 L T D.
    f = metrics_lib.flops_per_token(134_515_008, 30, 256, 576)
    assert f == pytest.approx(6 * 134_515_008 + 12 * 30 * 256 * 576)
    assert metrics_lib.mfu(1000.0, f, 0.0) is None
    assert metrics_lib.mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
