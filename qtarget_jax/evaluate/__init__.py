"""Evaluation: final-answer parsing (answers.py), accuracy / Average@k / held-out loss
(runner.py), model loading for the CLI (loading.py); `python -m qtarget_jax.evaluate`."""
from qtarget_jax.evaluate.answers import Scored, extract_answer, normalize_answer, score
from qtarget_jax.evaluate.runner import EvalExample, evaluate_model, heldout_loss, load_examples

__all__ = ["EvalExample", "Scored", "evaluate_model", "extract_answer", "heldout_loss",
           "load_examples", "normalize_answer", "score"]
