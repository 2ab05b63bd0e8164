"""The persistent compilation cache changes start-up time, never a result: a run with a warm
cache, and one whose cache entries were corrupted, give bitwise the losses of a cold run."""
import os
import pathlib
import subprocess
import sys

import pytest

from qtarget_jax.train import compile_cache
from qtarget_jax.train.metrics import read_jsonl

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_cache_dir_follows_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "c"))
    assert compile_cache.cache_dir() == tmp_path / "c"
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.cache_dir() is None and compile_cache.enable_persistent_cache() is None
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir() == tmp_path / "xdg" / "qtarget_jax" / "jax"


def test_reuse_makes_once_per_key():
    made = []
    compile_cache.clear()
    for key in ("a", "b", "a", ["unhashable"], ["unhashable"]):
        compile_cache.reuse(key, lambda k=key: made.append(k) or len(made))
    assert made == ["a", "b", ["unhashable"], ["unhashable"]]
    compile_cache.clear()


def _train(run_dir, cache, synth_dataset, char_tokenizer) -> list[float]:
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" /
           "tiny_test.yaml"), f"run.dir={run_dir}", f"data.path={synth_dataset}",
           f"model.tokenizer={char_tokenizer}", "run.steps=4", "checkpoint.every_steps=0",
           "logging.plot=false", "logging.tensorboard=false", "eval.every_steps=2",
           "mesh.data=4", "mesh.tensor=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), compile_cache.ENV: str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [r["loss"] for r in read_jsonl(pathlib.Path(run_dir) / "metrics.jsonl")
            if "loss" in r]


@pytest.mark.slow
def test_warm_and_corrupted_caches_give_the_cold_losses_bitwise(tmp_path, synth_dataset,
                                                                  char_tokenizer):
    cache = tmp_path / "cache"
    cold = _train(tmp_path / "cold", cache, synth_dataset, char_tokenizer)
    entries = sorted(p for p in cache.rglob("*") if p.is_file())
    assert any("train_step" in p.name for p in entries), entries
    warm = _train(tmp_path / "warm", cache, synth_dataset, char_tokenizer)
    assert sorted(p for p in cache.rglob("*") if p.is_file()) == entries  # all read, none new
    for p in entries:  # every entry now unreadable: it must be recompiled, not trusted
        p.write_bytes(b"\0corrupt" + p.read_bytes()[::-1][:64])
    corrupted = _train(tmp_path / "corrupted", cache, synth_dataset, char_tokenizer)
    assert len(cold) == 4
    assert warm == cold and corrupted == cold  # floats from JSON: bitwise equal

