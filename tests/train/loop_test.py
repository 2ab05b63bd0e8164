"""End-to-end loop on the tiny job: learning, resume == uninterrupted, NaN stop, start-up checks.

In-process runs use the 8 fake CPU devices as data=4 x tensor=2. The SIGKILL / SIGTERM ones run
train.py in a subprocess (marked slow) and resume in-process.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qtarget_jax import checkpoint as ckpt_lib
from qtarget_jax.config import load_config
from qtarget_jax.train import loop
from qtarget_jax.train.metrics import read_jsonl

REPO = pathlib.Path(__file__).resolve().parents[2]
JOB = REPO / "configs" / "tiny_test.yaml"


def overrides(run_dir, synth_dataset, char_tokenizer, *extra):
    return (f"run.dir={run_dir}", f"data.path={synth_dataset}", f"model.tokenizer={char_tokenizer}",
            "mesh.data=4", "mesh.tensor=2", "schedule.kind=constant", "run.steps=12",
            "checkpoint.every_steps=3", *extra)


def run_tiny(*args):
    return loop.run(load_config(JOB, tuple(args)))


def losses(run_dir) -> dict[int, float]:
    """step -> loss, checking that each step is logged once, in order (a resumed run's
    metrics.jsonl is cut back to its checkpoint; a restarted one starts afresh)."""
    steps = [rec["step"] for rec in read_jsonl(pathlib.Path(run_dir) / "metrics.jsonl")
             if "loss" in rec]
    assert steps == sorted(set(steps)), steps
    return {rec["step"]: rec["loss"]
            for rec in read_jsonl(pathlib.Path(run_dir) / "metrics.jsonl") if "loss" in rec}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synth_dataset, char_tokenizer):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    summary = run_tiny(*overrides(run_dir, synth_dataset, char_tokenizer),
                       "checkpoint.export_hf=true")
    return run_dir, summary


def test_learns_and_writes_outputs(uninterrupted):
    run_dir, summary = uninterrupted
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 13))
    # Judged on the last three steps: at lr 1e-2 a single batch can spike (clipped, recovers).
    assert np.mean([curve[s] for s in (10, 11, 12)]) < curve[1] - 0.5, curve
    assert summary["eval_after"]["eval/loss"] < summary["eval_before"]["eval/loss"]
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "tb"):
        assert (run_dir / name).exists(), name
    rec = read_jsonl(run_dir / "metrics.jsonl")[0]
    for key in ("loss", "grad_norm", "lr", "q/gamma", "q/p_y", "q/entropy", "q/kl_q_p",
                "perf/tokens_per_s"):
        assert key in rec, key
    kept = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [9, 12]  # keep=2 of saves at 3, 6, 9, 12
    assert load_config(run_dir / "config.yaml").config.run.steps == 12
    exported = {p.name for p in (run_dir / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= exported, exported
    assert summary["compiles"] == 1  # one compilation across all steps


def test_resume_equals_uninterrupted(tmp_path, uninterrupted, synth_dataset, char_tokenizer):
    """A run stopped at step 6 and resumed gives the uninterrupted losses for steps 7..12."""
    args = overrides(tmp_path, synth_dataset, char_tokenizer)
    first = run_tiny(*args, "run.steps=6")  # constant lr: the same run, cut short
    assert first["final_step"] == 6
    second = run_tiny(*args)
    assert second["start_step"] == 6
    want, got = losses(uninterrupted[0]), losses(tmp_path)
    np.testing.assert_array_equal([got[s] for s in range(1, 13)], [want[s] for s in range(1, 13)])


def test_second_run_of_the_same_shapes_reuses_the_compiled_step(tmp_path, uninterrupted,
                                                                 synth_dataset, char_tokenizer):
    """In one process, a run whose step has the same constants reuses the jitted step (no new
    compilation) and gives bitwise the same losses; another learning rate compiles its own."""
    same = run_tiny(*overrides(tmp_path / "same", synth_dataset, char_tokenizer))
    assert same["compiles"] == 0 and same["compile_s"] == 0.0
    want, got = losses(uninterrupted[0]), losses(tmp_path / "same")
    np.testing.assert_array_equal([got[s] for s in range(1, 13)], [want[s] for s in range(1, 13)])
    other = run_tiny(*overrides(tmp_path / "other", synth_dataset, char_tokenizer,
                                "optim.lr=5e-3", "run.steps=3"))
    assert other["compiles"] == 1 and other["compile_s"] > 0
    assert losses(tmp_path / "other")[3] != want[3]


def test_step_time_excludes_compilation_and_evaluation(tmp_path, synth_dataset,
                                                      char_tokenizer):
    """perf/step_s is the step alone: compilation is perf/compile_s (first step), and the time
    of an evaluation (here probes that sleep) is its perf/eval_s, in no step's time."""
    pause = 1.5

    def slow_probes(model, step):
        time.sleep(pause)
        return {"probe/step": float(step)}

    summary = loop.run(load_config(JOB, overrides(
        tmp_path, synth_dataset, char_tokenizer, "run.steps=6", "eval.every_steps=2",
        "optim.lr=2e-3", "checkpoint.every_steps=0")), probes=slow_probes)
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    steps = {r["step"]: r for r in recs if "loss" in r}
    evals = [r for r in recs if "probe/step" in r]
    assert summary["compiles"] == 1 and "perf/compile_s" in steps[1]
    assert steps[1]["perf/compile_s"] == pytest.approx(summary["compile_s"])
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(r["perf/eval_s"] >= pause for r in evals)
    assert "perf/eval_s" not in summary["eval_after"]  # the summary holds metrics only
    slowest = max(r["perf/step_s"] for r in steps.values())
    assert slowest < pause and slowest < steps[1]["perf/compile_s"], steps
    assert all("perf/compile_s" not in steps[s] for s in range(2, 7))


def test_truncate_records_keeps_steps_up_to_the_checkpoint(tmp_path):
    from qtarget_jax.train.setup import truncate_records
    path = tmp_path / "metrics.jsonl"
    assert truncate_records(path, 3) is None  # no file: nothing to do
    path.write_text("".join(f'{{"step": {s}, "loss": {s}.5}}\n' for s in (1, 2, 3, 4, 5))
                    + '{"step": 3, "eval/loss": 1.0}\n{"step": 6, "lo')  # cut by a kill
    assert truncate_records(path, 3) == 4
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1.5}, {"step": 2, "loss": 2.5}, {"step": 3, "loss": 3.5},
        {"step": 3, "eval/loss": 1.0}]
    assert truncate_records(path, 0) == 0 and not path.exists()  # a fresh start


def test_nan_loss_stops_naming_step_and_keeps_last_good(tmp_path, synth_dataset,
                                                         char_tokenizer):
    args = overrides(tmp_path, synth_dataset, char_tokenizer, "optim.lr=1e30",
                     "optim.clip_norm=null", "checkpoint.every_steps=1", "checkpoint.keep=5")
    with pytest.raises(FloatingPointError, match=r"at step (\d+)") as err:
        run_tiny(*args)
    bad = int(err.value.args[0].split("at step ")[1].split(":")[0])
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] == bad - 1, (steps, bad)


def test_unwritable_checkpoint_dir_fails_before_training(tmp_path, synth_dataset,
                                                         char_tokenizer):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    args = overrides(tmp_path / "run", synth_dataset, char_tokenizer,
                     f"checkpoint.dir={blocker}/ckpt")
    with pytest.raises(OSError, match="not writable"):
        run_tiny(*args)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_disk_too_small_is_a_startup_error(tmp_path):
    with pytest.raises(OSError, match="GiB free"):
        ckpt_lib.check_writable(str(tmp_path), need_bytes=1 << 60)


def _spawn(run_dir, synth_dataset, char_tokenizer, *extra):
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(JOB),
           *overrides(run_dir, synth_dataset, char_tokenizer, *extra)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def _wait_for_lines(path, n, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"finished early: {proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting for metrics")


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, uninterrupted,
                                                          synth_dataset, char_tokenizer):
    proc = _spawn(tmp_path, synth_dataset, char_tokenizer, "logging.plot=false")
    _wait_for_lines(tmp_path / "metrics.jsonl", 8, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=2).latest_step()
    assert latest is not None and 3 <= latest < 12, latest
    killed = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    summary = run_tiny(*overrides(tmp_path, synth_dataset, char_tokenizer))
    assert summary["start_step"] == latest
    want, got = losses(uninterrupted[0]), losses(tmp_path)  # each step once
    assert max(killed) >= 8 and sorted(got) == list(range(1, 13)), (killed, sorted(got))
    np.testing.assert_array_equal([got[s] for s in range(1, 13)], [want[s] for s in range(1, 13)])


@pytest.mark.slow
def test_sigkill_of_a_run_without_checkpoints_then_rerun_logs_each_step_once(
        tmp_path, uninterrupted, synth_dataset, char_tokenizer):
    """A killed run that cannot resume (checkpoint.every_steps=0, as the experiment's stages)
    starts over, and so do its records: the killed attempt's steps are not kept."""
    proc = _spawn(tmp_path, synth_dataset, char_tokenizer, "checkpoint.every_steps=0",
                  "run.steps=500", "logging.plot=false")
    _wait_for_lines(tmp_path / "metrics.jsonl", 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    summary = run_tiny(*overrides(tmp_path, synth_dataset, char_tokenizer,
                                  "checkpoint.every_steps=0"))
    assert summary["start_step"] == 0
    want, got = losses(uninterrupted[0]), losses(tmp_path)
    assert sorted(got) == list(range(1, 13))
    np.testing.assert_array_equal([got[s] for s in range(1, 13)], [want[s] for s in range(1, 13)])


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path, synth_dataset, char_tokenizer):
    proc = _spawn(tmp_path, synth_dataset, char_tokenizer, "run.steps=200",
                  "checkpoint.every_steps=1000")
    _wait_for_lines(tmp_path / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by SIGTERM; the same command resumes from" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_signal"] == "SIGTERM"
    stopped = summary["final_step"]
    assert 2 <= stopped < 200
    latest = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=2).latest_step()
    assert latest == stopped


def test_problem_accuracy_before_and_after(tmp_path, synth_dataset, char_tokenizer):
    """eval.problems: greedy exact-match accuracy before and after, per-example outputs saved.
    After: the outputs are what the saved step-2 params decode alone, and the accuracy is the
    count of those outputs whose answer is the problem's gold one."""
    from qtarget_jax.data import synthetic
    from qtarget_jax.problems.answers import score
    from qtarget_jax.evaluate.loading import load_checkpoint
    from qtarget_jax.generate import SamplingConfig, generate

    test_rows = synthetic.generate(4, 3, seed=1)["test"]
    rows = test_rows[:2]  # eval.problems_limit=2
    problems = tmp_path / "problems.jsonl"
    synthetic.write_jsonl(test_rows, str(problems))
    run_dir = tmp_path / "run"
    summary = run_tiny(*overrides(run_dir, synth_dataset, char_tokenizer), "run.steps=2",
                       "checkpoint.every_steps=2", f"eval.problems={problems}",
                       "eval.problems_limit=2", "eval.max_new_tokens=8")
    records = {}
    for key, step in (("eval_before", 0), ("eval_after", 2)):
        ev = summary[key]
        assert ev["eval/problems/n"] == 2 and "eval/loss" in ev
        records[step] = read_jsonl(run_dir / f"problems_step{step}.jsonl")
        assert [r["gold"] for r in records[step]] == [str(r["answer"]) for r in rows]
        right = [score(r["output"], str(g["answer"])).correct
                 for r, g in zip(records[step], rows)]
        assert ev["eval/problems/accuracy"] == sum(right) / 2
    model, tokenizer, _ = load_checkpoint(str(run_dir), step=2)
    gens = generate(model, tokenizer, [r["messages"][:1] for r in rows],
                    SamplingConfig(max_new_tokens=8))
    assert [r["output"] for r in records[2]] == [g.text for g in gens]
