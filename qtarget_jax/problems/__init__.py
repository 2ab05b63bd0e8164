"""Evaluation problems and their scoring, below both `train` and `evaluate`: final-answer
parsing (answers.py), reading evaluation sets (examples.py), greedy accuracy and Average@k of
generated outputs (accuracy.py). Imports nothing from `train` or `evaluate`."""
from qtarget_jax.problems.accuracy import solve
from qtarget_jax.problems.answers import (Scored, extract_answer, gold_answer, normalize_answer,
                                          score)
from qtarget_jax.problems.examples import EvalExample, load_examples

__all__ = ["EvalExample", "Scored", "extract_answer", "gold_answer", "load_examples",
           "normalize_answer", "score", "solve"]
