"""answers.py: extraction order, normalisation, and unparsable outputs scored wrong."""
import pytest

from qtarget_jax.problems.answers import extract_answer, normalize_answer, score


@pytest.mark.parametrize("text,want,method", [
    ("5 + 3 = 8\n#### 8", "8", "hash"),
    ("#### 3\nwait\n#### 12 ", "12", "hash"),
    ("so the answer is \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}", "boxed"),
    ("\\boxed{1} then \\boxed{{2}+1}", "{2}+1", "boxed"),
    ("costs $1,200.50 in total", "$1,200.50", "last_number"),
    ("from 3 to -7", "-7", "last_number"),
    ("no numbers here", None, "none"),
    ("\\boxed{7 unclosed", "7", "last_number"),
])
def test_extract(text, want, method):
    assert extract_answer(text) == (want, method)


@pytest.mark.parametrize("raw,want", [
    ("1,000", "1000"), ("1000.0", "1000"), ("$1000", "1000"), ("-0", "0"), ("3/6", "1/2"),
    ("0.50", "1/2"), ("\\frac{1}{2}", "1/2"), ("50%", "50"), ("12.", "12"),
    ("7 \\text{apples}", "7"), (" Paris ", "paris"), ("", None),
])
def test_normalize(raw, want):
    assert normalize_answer(raw) == want


def test_score():
    assert score("2 + 3 = 5\n#### 5", 5).correct
    assert score("the result is 5.0", "5").correct
    assert not score("#### 6", 5).correct
    bad = score("I do not know", 5)
    assert (bad.correct, bad.method, bad.extracted) == (False, "none", None)
    assert "no '####'" in bad.parse_error
    assert score("#### ,", 5).parse_error == "empty answer after hash"
    with pytest.raises(ValueError, match="gold answer"):
        score("#### 5", " ")
