"""experiments/oldskill.py on hand-written eval files: step lines in every solution template,
"solved, then kept going" counted by hand, seeds pooled per method, bad rows named."""
import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from experiment_helpers import load_script  # noqa: E402

oldskill = load_script("oldskill", "oldskill_test")

# template 0, and templates 1-2 (words around the step, a unit after the result)
SOLVED_THEN_ON = "Emma starts with 8 marbles.\n8 - 3 = 5\n5 * 3 = 15\n15 - 9 = 6\n#### 6"
WORDY_RIGHT = "At first there are 11.\nAdding 9 gives 11 + 9 = 20 stamps.\nAfter losing 8: 20 - 8 = 12.\n#### 12"
WRONG_NEVER = "Chloe starts with 12 shells.\n12 * 3 = 36\n36 + 5 = 31\n#### 31"


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_step_results_in_every_template():
    assert oldskill.step_results(SOLVED_THEN_ON) == ["5", "15", "6"]
    assert oldskill.step_results(WORDY_RIGHT) == ["20", "12"]
    assert oldskill.step_results("x = -4 apples\nno step\n#### -4") == ["-4"]


def test_counts_against_hand_counts_with_seeds_pooled(tmp_path):
    _write(tmp_path / "eval_B0_old.jsonl",
           [{"gold": "12", "output": WORDY_RIGHT, "correct": True, "id": "a"}])
    # seed 0: gold 15 is step 2's result, the answer 6 is wrong -> kept going
    _write(tmp_path / "eval_noise0_sft_0_old.jsonl",
           [{"gold": "15", "output": SOLVED_THEN_ON, "correct": False},
            {"gold": "41", "output": WRONG_NEVER, "correct": False}])
    # seed 1 of the same method, and a right answer (its gold is a step result: not counted)
    _write(tmp_path / "eval_noise0_sft_1_old.jsonl",
           [{"gold": "12", "output": WORDY_RIGHT, "correct": True}])
    _write(tmp_path / "eval_noise0_sft_0.jsonl",  # the new skill's file: not read
           [{"gold": "1", "output": "", "correct": False}])
    stats = oldskill.by_method(str(tmp_path))
    assert list(stats) == ["B0", "noise0_sft"]
    sft = stats["noise0_sft"]
    assert sft["n"] == 3
    assert sft["steps"] == pytest.approx((3 + 2 + 2) / 3)
    assert sft["wrong"] == pytest.approx(2 / 3)
    assert sft["kept_going"] == pytest.approx(1 / 3)
    assert stats["B0"] == {"n": 1, "steps": 2.0, "wrong": 0.0, "kept_going": 0.0}
    oldskill.main([str(tmp_path)])
    table = (tmp_path / "old_skill.md").read_text()
    assert "| noise0_sft | 3 | 2.33 | 66.7 | 33.3 |" in table


def test_bad_rows_name_the_file_and_line(tmp_path):
    path = tmp_path / "eval_noise0_dft_0_old.jsonl"
    path.write_text(json.dumps({"gold": "1", "output": "1 = 1", "correct": True}) + "\n\n"
                    + json.dumps({"gold": "1", "correct": True}) + "\n")
    with pytest.raises(ValueError, match=r"eval_noise0_dft_0_old\.jsonl:3: .*'output'"):
        oldskill.by_method(str(tmp_path))
    path.write_text(json.dumps({"gold": "1", "output": "1 = 1", "correct": True}) + "\n\n")
    assert oldskill.by_method(str(tmp_path))["noise0_dft"]["n"] == 1   # the blank line skipped
    with pytest.raises(FileNotFoundError, match="no eval_"):
        oldskill.by_method(str(tmp_path / "missing"))
