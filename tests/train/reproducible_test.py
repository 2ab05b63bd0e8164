"""Same JSONL, same config -> the same training, bit for bit (docs/training.md#reproducibility).

One JSONL file is prepared in two folders; the tiny job then trains from each in its own
process on one CPU device, as a user would run it, and every logged number must be equal.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from qtarget_jax.data import prepare_dataset, sources, synthetic

REPO = pathlib.Path(__file__).resolve().parents[2]
JOB = REPO / "configs" / "tiny_test.yaml"
STEPS = 4


def _prepare(folder: pathlib.Path, train: pathlib.Path, test: pathlib.Path) -> str:
    folder.mkdir(parents=True)
    files = {"train": [str(folder / "train.jsonl")], "test": [str(folder / "test.jsonl")]}
    shutil.copy(train, files["train"][0])
    shutil.copy(test, files["test"][0])
    path, _ = prepare_dataset(files, str(folder / "tfds"), "synth")
    return path


def _train_one_device(run_dir: pathlib.Path, data: str, tokenizer: str) -> dict:
    """train.py in a fresh process that sees one CPU device; returns its summary.json."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(JOB), f"data.path={data}",
           f"model.tokenizer={tokenizer}", f"run.dir={run_dir}", f"run.steps={STEPS}",
           f"checkpoint.every_steps={STEPS}", "logging.tensorboard=false", "logging.plot=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run folder: {run_dir} (metrics.jsonl" in proc.stdout, proc.stdout[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def _logged(run_dir: pathlib.Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


@pytest.mark.slow  # two train.py processes
def test_one_jsonl_in_two_folders_trains_bitwise_equal(tmp_path, char_tokenizer):
    rows = synthetic.generate(48, 8, seed=0)
    synthetic.write_jsonl(rows["train"], str(tmp_path / "train.jsonl"))
    synthetic.write_jsonl(rows["test"], str(tmp_path / "test.jsonl"))
    data_a = _prepare(tmp_path / "a", tmp_path / "train.jsonl", tmp_path / "test.jsonl")
    data_b = _prepare(tmp_path / "bb" / "elsewhere", tmp_path / "train.jsonl",
                      tmp_path / "test.jsonl")
    for split in ("train", "test"):
        order_a = [r["source"] for r in _records(data_a, split)]
        assert order_a == [r["source"] for r in _records(data_b, split)], split
        assert order_a != sorted(order_a, key=lambda s: int(s.split(b":")[1]))  # shuffled

    summary_a = _train_one_device(tmp_path / "run_a", data_a, char_tokenizer)
    summary_b = _train_one_device(tmp_path / "run_b", data_b, char_tokenizer)
    logged_a, logged_b = _logged(tmp_path / "run_a"), _logged(tmp_path / "run_b")
    assert [r["step"] for r in logged_a if "loss" in r] == list(range(1, STEPS + 1))
    assert logged_a == logged_b  # exact float equality: the JSON holds each float's repr
    assert summary_a == summary_b  # eval before/after: held-out loss and diagnostics
    assert summary_a["eval_after"]["eval/loss"] < summary_a["eval_before"]["eval/loss"]


def _records(path: str, split: str) -> list:
    ds = sources.open_split(path, split)
    return [ds[i] for i in range(len(ds))]
