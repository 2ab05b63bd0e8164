"""The lines train.py prints at the end of a run, on fabricated results of `loop.run`."""
import json
import pathlib

from qtarget_jax.config import load_config
from qtarget_jax.train.summary import metric_lines, summary_lines, write_summary

JOB = pathlib.Path(__file__).resolve().parents[2] / "configs" / "smollm2_target_sft.yaml"

BEFORE = {"eval/loss": 0.8613, "eval/gamma": 0.5761, "eval/p_y": 0.5761, "eval/accuracy": 0.6486,
          "eval/entropy": 1.0448, "eval/kl_q_p": 0.04792, "eval/problems/accuracy": 0.09375,
          "eval/problems/parse_errors": 1.0, "eval/problems/n": 32.0}
AFTER = {**BEFORE, "eval/loss": 0.4901, "eval/accuracy": 0.7713, "eval/p_y": 0.7602,
         "eval/gamma": 0.7602, "eval/problems/accuracy": 0.1875,
         "eval/problems/parse_errors": 0.0}


def _cfg(*overrides):
    return load_config(str(JOB), ("run.dir=runs/job", "run.steps=24", *overrides)).config


def _result(**kw):
    return {"start_step": 0, "final_step": 24, "stop_signal": None, "eval_before": BEFORE,
            "eval_after": AFTER, "last": {"loss": 0.3}, "compiles": 1, **kw}


def test_finished_run_shows_each_metric_and_where_to_go_next():
    lines = summary_lines(_result(), _cfg("checkpoint.export_hf=true"))
    text = "\n".join(lines)
    assert lines[0] == ("target_sft (eta=0.5, gamma_floor=0.5; teacher: the frozen initial "
                        "model) on smollm2: steps 0 -> 24 of 24")
    assert lines[1] == "held-out (data/synth_easy/test.jsonl), before -> after:"
    rows = {line.split("  ")[1].strip(): line.split()[-3:] for line in lines[2:8]}
    assert rows == {
        "exact match (first 32 problems, greedy)": ["3/32", "->", "6/32"],
        "held-out loss": ["0.861", "->", "0.490"],
        "token accuracy": ["64.9%", "->", "77.1%"],
        "mean p_y": ["0.576", "->", "0.760"],
        "entropy of p": ["1.045", "->", "1.045"],
        "KL(Q || p)": ["0.0479", "->", "0.0479"],
    }
    assert lines[8].split()[-3:] == ["1", "->", "0"]  # outputs with no answer
    assert len(lines) == 13  # gamma = p_y is shown once; eval/problems/n is in the exact match
    assert lines[9] == ("run folder: runs/job (metrics.jsonl, summary.json, config.yaml, "
                        "problems_step0.jsonl, problems_step24.jsonl, checkpoints/)")
    assert lines[10] == "TensorBoard: tensorboard --logdir runs/job/tb"
    assert lines[11].startswith("exported: runs/job/hf (Hugging Face folder")
    assert lines[12] == 'chat: python -m qtarget_jax.generate --model runs/job "What is 7 + 5?"'
    assert "stopped" not in text


def test_stopped_run_says_how_to_resume_and_that_nothing_was_exported():
    result = _result(final_step=9, eval_after=None, stop_signal="SIGTERM")
    lines = summary_lines(result, _cfg("checkpoint.export_hf=true", "logging.tensorboard=false"))
    assert lines[0].endswith("steps 0 -> 9 of 24")
    assert lines[1] == "stopped by SIGTERM; the same command resumes from runs/job/checkpoints"
    assert "3/32 -> -" in " ".join(lines[3].split())
    assert not any(line.startswith(("TensorBoard", "exported", "chat:")) for line in lines)
    assert lines[-2].startswith("export: checkpoint.export_hf=true on the command line writes "
                                "runs/job/hf")
    assert lines[-1].startswith("chat, once exported: python -m qtarget_jax.generate")


def test_resumed_run_has_no_before_and_other_teachers_and_probes_are_named():
    result = _result(start_step=24, eval_before=None,
                     eval_after={"eval/loss": 0.5, "probe/memorised": 0.25})
    lines = summary_lines(result, _cfg("model.teacher=teacher_run", "lora.rank=4",
                                       "eval.problems_limit=0"))
    assert lines[0] == ("target_sft (eta=0.5, gamma_floor=0.5; teacher: teacher_run) on smollm2, "
                        "LoRA rank 4: steps 24 -> 24 of 24")
    assert lines[1].endswith("resumed at step 24: - -> after:")
    assert [line.split() for line in lines[2:4]] == [["held-out", "loss", "-", "->", "0.500"],
                                                     ["probe/memorised", "-", "->", "0.25"]]
    assert "problems_step24.jsonl" in lines[4] and "problems_step0" not in lines[4]


def test_plain_sft_names_no_teacher_and_columns_line_up():
    after = {**AFTER, "eval/gamma": 1.0}  # sft trusts every label: gamma is its own line
    lines = summary_lines(_result(eval_after=after), _cfg("loss.target={preset: sft}"))
    assert lines[0].startswith("sft on smollm2:")
    assert [line.split()[-3:] for line in lines if "gamma" in line] == [["0.576", "->", "1.000"]]
    arrows = {line.index("->") for line in lines if " -> " in line and line.startswith("  ")}
    assert len(arrows) == 1
    assert metric_lines(None, None) == []


def test_write_summary_keeps_the_result_as_json(tmp_path):
    cfg = _cfg(f"run.dir={tmp_path}")
    path = write_summary(_result(), cfg)
    assert path == tmp_path / "summary.json"
    assert json.loads(path.read_text()) == {
        "start_step": 0, "final_step": 24, "stop_signal": None, "eval_before": BEFORE,
        "eval_after": AFTER}
