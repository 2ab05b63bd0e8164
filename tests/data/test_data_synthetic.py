"""The synthetic arithmetic set: correct worked solutions, fixed splits, measured noise."""
import hashlib
import json
import re

import pytest

from qtarget_jax.data import records, synthetic

_STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


def _check_solution(text, ops=(2, 3)):
    """Independent checker: every 'a op b = c' is true, steps chain, '#### c' is the last c,
    and there are ops[0]..ops[1] steps."""
    lines = text.split("\n")
    steps = [tuple(_STEP.search(line).groups()) for line in lines[1:-1]]
    prev = None
    for a, op, b, c in steps:
        a, b, c = int(a), int(b), int(c)
        if prev is not None and a != prev:
            return False
        if c != {"+": a + b, "-": a - b, "*": a * b}[op]:
            return False
        prev = c
    return lines[-1] == f"#### {prev}" and ops[0] <= len(steps) <= ops[1]


def test_clean_rows_are_correct_and_valid():
    data = synthetic.generate(300, 100, seed=3, noise=0.0)
    assert len(data["train"]) == 600 and len(data["test"]) == 100
    for row in data["train"] + data["test"]:
        conv = records.row_to_conversation(row, "synth")
        assert [m.role for m in conv] == ["user", "assistant"]
        assert _check_solution(conv[1].content), conv[1].content
        assert synthetic.extract_answer(conv[1].content) == row["answer"]
        assert row["noise"] is None
        assert 1 <= row["answer"] <= synthetic.MAX_VALUE


def test_splits_fixed_by_seed_and_disjoint():
    a = synthetic.generate(200, 50, seed=0)
    b = synthetic.generate(400, 50, seed=0)
    assert a["test"] == b["test"]                 # test split does not depend on n_train
    assert a == synthetic.generate(200, 50, seed=0)
    assert a["test"] != synthetic.generate(200, 50, seed=1)["test"]
    test_q = {r["messages"][0]["content"] for r in a["test"]}
    train_q = {r["messages"][0]["content"] for r in a["train"]}
    assert not test_q & train_q


def test_several_phrasings_per_problem():
    data = synthetic.generate(100, 0, seed=0, phrasings=3)
    by_problem = {}
    for row in data["train"]:
        by_problem.setdefault(row["id"].rsplit("-", 1)[0], []).append(row)
    assert all(len(v) == 3 for v in by_problem.values())
    distinct = sum(len({r["messages"][1]["content"] for r in v}) > 1
                   for v in by_problem.values())
    assert distinct >= 90  # the same problem has several observed solutions


@pytest.mark.parametrize("noise", [0.0, 0.2, 0.5])
def test_noise_fraction_and_kinds(noise):
    rows = synthetic.generate(1000, 10, seed=0, noise=noise)["train"]
    noisy = [r for r in rows if r["noise"]]
    assert abs(len(noisy) / len(rows) - noise) < 0.03
    for r in rows:
        sol = r["messages"][1]["content"]
        assert _check_solution(sol) == (r["noise"] is None), sol
        # Both kinds end on a wrong final answer (a wrong step propagates to the end).
        assert (synthetic.extract_answer(sol) == r["answer"]) == (r["noise"] is None), sol
    assert {r["noise"] for r in noisy} == ({"wrong_step", "wrong_answer"} if noise else set())


def test_extract_answer():
    assert synthetic.extract_answer("a\n#### 12") == 12
    assert synthetic.extract_answer("#### 3\nx\n#### 4\n") == 4
    assert synthetic.extract_answer("the answer is 12") is None
    with pytest.raises(ValueError, match="noise"):
        synthetic.generate(1, 1, noise=1.5)


def test_solution_pair_keeps_the_template_draws_and_fixes_the_numbers():
    import random

    from qtarget_jax.data.synthetic import draw_problems, solution, solution_pair
    for k, p in enumerate(draw_problems(30, seed=4)):
        kind = ("wrong_step", "wrong_answer", None)[k % 3]
        shown, clean = solution_pair(p, random.Random(k), kind)
        assert shown == solution(p, random.Random(k), kind)       # same stream, same text
        assert clean.endswith(f"#### {p.answer}")
        assert (shown == clean) == (kind is None)
        assert [line.rstrip("0123456789.") for line in shown.splitlines()][:1] == \
            [line.rstrip("0123456789.") for line in clean.splitlines()][:1]
        for t in (0, 1, 2):
            text = solution(p, random.Random(k), None, templates=(t,))
            # the first step line is template t of its operation
            op = p.ops[0][0]
            want = synthetic._S_OP[op][t].split("{")[0]
            assert text.splitlines()[1].startswith(want), (t, text)


def test_largest_rows_answer_the_maximum():
    rows = synthetic.largest_rows(20, "x", seed=3)
    for r in rows:
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        numbers = [int(t) for t in re.findall(r"\d+", q)]
        assert 3 <= len(numbers) <= 5 and r["answer"] == max(numbers)
        assert synthetic.extract_answer(a) == max(numbers)
    assert rows == synthetic.largest_rows(20, "x", seed=3)
    assert rows != synthetic.largest_rows(20, "x", seed=4)


# The first test row of generate(50, 10, seed=3) and a digest of all its rows, as written by the
# generator before it took `ops`: the default (2-3 operations) must stay bit-identical.
GOLDEN_FIRST_TEST = {
    "id": "test-0", "answer": 30, "noise": None, "messages": [
        {"role": "user", "content": "Hugo has 5 books. Then the number of books becomes 2 times "
                                    "as large. Hugo's books are multiplied by 3. How many books "
                                    "does Hugo have now?"},
        {"role": "assistant", "content": "Start: 5 books.\n2 times as many is 5 * 2 = 10 books."
                                         "\n10 * 3 = 30\n#### 30"}]}
GOLDEN_DIGESTS = {(50, 10, 3, 0.0): "366b1e0b7933a4c4862774f94fd6e420afa2fa410a4080a3670499c7a34d7832",
                  (300, 40, 0, 0.2): "9960fcbd39c2d237503d113cea43e1b4b97296495e67ecd57d82906aa24647e6"}


@pytest.mark.parametrize("key", sorted(GOLDEN_DIGESTS))
def test_default_ops_rows_unchanged(key):
    n_train, n_test, seed, noise = key
    data = synthetic.generate(n_train, n_test, seed=seed, noise=noise)
    assert data == synthetic.generate(n_train, n_test, seed=seed, noise=noise, ops=(2, 3))
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    assert digest == GOLDEN_DIGESTS[key]
    if seed == 3:
        assert data["test"][0] == GOLDEN_FIRST_TEST


@pytest.mark.parametrize("ops", [(1, 1), (1, 2), (4, 5)])
def test_ops_range_is_respected_and_every_count_occurs(ops):
    data = synthetic.generate(200, 50, seed=0, ops=ops)
    counts = set()
    for row in data["train"] + data["test"]:
        text = row["messages"][1]["content"]
        assert _check_solution(text, ops), text
        assert synthetic.extract_answer(text) == row["answer"]
        counts.add(len(text.split("\n")) - 2)
    assert counts == set(range(ops[0], ops[1] + 1))


@pytest.mark.parametrize("bad", [(0, 1), (3, 2), (1,), (1, 2, 3), (1.0, 2), (True, 2)])
def test_bad_ops_range_names_the_value(bad):
    with pytest.raises(ValueError, match=re.escape(repr(tuple(bad)))):
        synthetic.generate(2, 1, ops=bad)
