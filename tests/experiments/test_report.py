"""experiments/report.py on a hand-written runs.jsonl of the learn design: the three answers
(a)-(c) against numpy, the verdict rules at their edges, a condition not yet complete, the
cost summed over a resumed experiment, and no negative zero in the table."""
import json
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from experiment_helpers import load_script  # noqa: E402

report = load_script("report", "report_test")

CONFIG = {
    "data": {"noise": None, "n_test": 40, "n_skill_test": 40,
             "new": {"ops": [4, 5], "n_test": 80, "n_b": 48, "n_teacher": 512}},
    "eval": {"samples": 8, "temperature": 1.0, "max_new_tokens": 128},
    "teacher": {"epochs": 2}, "stage1": {"epochs": 3},
    "conditions": [{"name": "clean", "noise": 0.0}, {"name": "noisy", "noise": 0.2}],
    "methods": [{"name": "sft", "target": {"preset": "sft"}, "teacher": "none"},
                {"name": "dft", "target": {"preset": "dft"}, "teacher": "none"},
                {"name": "tsft", "target": {"preset": "target_sft", "eta": 0.5}, "teacher": "T"},
                {"name": "tsft_b0", "target": {"preset": "target_sft", "eta": 0.5},
                 "teacher": "B0"}],
}
B0 = {"new_avg@8": 0.04, "new_accuracy": 0.05, "accuracy": 0.35, "skill_accuracy": 0.6,
      "kl_ref": -6e-10}
# condition clean, per method, per seed: (new Average@8, old greedy, KL)
CLEAN = {"sft": [(0.10, 0.1, 0.30), (0.12, 0.2, 0.35), (0.14, 0.3, 0.40)],
         "dft": [(0.05, 0.5, 0.05), (0.06, 0.5, 0.08), (0.07, 0.6, 0.06)],
         "tsft": [(0.20, 0.3, 0.10), (0.22, 0.35, 0.12), (0.25, 0.4, 0.11)],
         "tsft_b0": [(0.03, 0.4, 0.02), (0.05, 0.4, 0.03), (0.09, 0.4, 0.04)]}


def _run(cond, name, seed, avg, old, kl, seconds):
    metrics = {"new_avg@8": avg, "new_accuracy": avg, "accuracy": old, "skill_accuracy": 0.5,
               "kl_ref": kl, "new_answer_token_acc": 0.9}
    epochs = [{"epoch": 0.0, "new_gamma": 0.8, "new_p_y": 0.8, "kl_ref": 0.0},
              {"epoch": 3.0, "new_gamma": 0.9, "new_p_y": 0.9, "kl_ref": kl}]
    return {"event": "run", "condition": cond, "name": name, "seed": seed,
            "teacher": {"tsft": "T", "tsft_b0": "B0"}.get(name, "none"), "seconds": seconds,
            "eval_s": 100.0, "epochs": epochs, **metrics}


def _records():
    start = {"event": "start", "config": CONFIG, "elapsed_s": 0.1}
    models = [{"event": "model", "name": "B0", "seed": 0, "per_epoch": {}, "by_condition": {},
               "seconds": 60.0, **B0},
              {"event": "model", "name": "T", "seed": 0, "per_epoch": {}, "by_condition": {},
               "seconds": 40.0, "new_avg@8": 0.3, "accuracy": 0.35, "skill_accuracy": 0.0}]
    clean = [_run("clean", n, s, *v, seconds=500.0 + s) for n, seeds in CLEAN.items()
             for s, v in enumerate(seeds)]
    noisy = [_run("noisy", "sft", 0, 0.1, 0.1, 0.3, 450.0)]     # the rest not run yet
    first = [start, {"event": "stage0", "name": "B0", "seconds": 300.0},
             {"event": "stage0", "name": "T", "seconds": 900.0},
             *models, *clean[:5], {**clean[4], "event": "note", "elapsed_s": 1000.0}]
    # A resume: the finished records logged again after a new start, then the rest.
    second = [start, *models, *clean, *noisy, {"event": "done", "elapsed_s": 2000.0}]
    return first + second, clean + noisy


@pytest.fixture
def out(tmp_path):
    events, _ = _records()
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return tmp_path


def test_answers_match_numpy_and_verdict_rules(out):
    text = report.main(str(out))
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["answers"]) == ["clean"]            # noisy lacks dft and Target-SFT
    ans = summary["answers"]["clean"]
    avg = {n: np.array([v[0] for v in seeds]) for n, seeds in CLEAN.items()}

    # (a) mean - B0 against the seed range (max - min)
    for name in ("tsft", "tsft_b0"):
        a = ans["a"][name]
        assert a["delta"] == pytest.approx(avg[name].mean() - B0["new_avg@8"])
        assert a["range"] == pytest.approx(np.ptp(avg[name])) and a["seeds"] == 3
    assert ans["a"]["tsft"]["above"] is True          # +0.183 > range 0.05
    assert ans["a"]["tsft_b0"]["above"] is False      # +0.017 < range 0.06

    # (b) the best variant by mean Average@8, against SFT and DFT
    assert ans["best"] == "tsft"
    assert ans["b"]["sft"]["delta"] == pytest.approx(avg["tsft"].mean() - avg["sft"].mean())
    assert ans["b"]["sft"]["versus"] == ans["b"]["dft"]["versus"] == "above"

    # (c) retention: old-skill greedy tsft [0.3, 0.4] vs sft [0.1, 0.3] touch at 0.3: overlap;
    # vs dft [0.5, 0.6] every seed below. KL: lower is better, so tsft beats sft, loses to dft.
    c = ans["c"]
    assert c["sft"]["accuracy"]["versus"] == "within spread"
    assert c["dft"]["accuracy"]["versus"] == "below"
    assert c["sft"]["kl_ref"]["versus"] == "above" and c["dft"]["kl_ref"]["versus"] == "below"
    assert c["sft"]["kl_ref"]["delta"] == pytest.approx(0.11 - 0.35)
    assert "memorisation" not in c["sft"]                   # not measured at noise 0

    lines = text.splitlines()
    assert lines[0] == "### Answer, condition clean (noise 0.0)"
    assert lines[2].startswith("- (a) above B0 (Average@8 4.0) by more than the seed spread? "
                               "tsft 22.3 (+18.3 vs B0, range over 3 seeds 5.0: yes); "
                               "tsft_b0 5.7 (+1.7 vs B0, range over 3 seeds 6.0: no).")
    assert lines[3] == ("- (b) best Target-SFT variant, tsft, on Average@8: vs sft +10.3 "
                        "(above); vs dft +16.3 (above).")
    assert "vs sft: old-skill greedy +15.0 (within spread), 2nd skill +0.0 (within spread), " \
           "KL(B0‖model) -0.240 (above)" in lines[4]
    assert "### Answer, condition noisy" not in text


def test_cost_sums_stage0_and_runs_over_a_resume_and_no_negative_zero(out):
    text = report.main(str(out))
    _, runs = _records()
    runs_s = sum(r["seconds"] for r in runs)
    stage0_s = 300.0 + 900.0 + 60.0 + 40.0
    cost = next(line for line in text.splitlines() if line.startswith("Cost, as logged:"))
    assert cost == (f"Cost, as logged: stage 0 {stage0_s / 60:.1f} min (training: B0 300 s, "
                    f"T 900 s; evaluations 100 s), {len(runs)} stage-1 runs "
                    f"{runs_s / 60:.1f} min ({runs_s / len(runs):.0f} s a run), "
                    f"{(stage0_s + runs_s) / 3600:.2f} h in all; wall time over the "
                    f"invocations {(1000.0 + 2000.0) / 60:.1f} min.")
    b0_row = next(line for line in text.splitlines() if line.startswith("| B0 |"))
    assert "| 0.000 |" in b0_row and "-0.000" not in text
