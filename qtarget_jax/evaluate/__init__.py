"""Evaluation: accuracy / Average@k (`qtarget_jax.problems`) plus the held-out loss (runner.py,
the training loop's eval step), model and checkpoint loading (loading.py, the checkpoint layout
from `train.state.TrainState`); `python -m qtarget_jax.evaluate`. Depends on `train`, never the
reverse."""
from qtarget_jax.evaluate.loading import load_checkpoint, load_source
from qtarget_jax.evaluate.runner import evaluate_model, heldout_loss
from qtarget_jax.problems import (EvalExample, Scored, extract_answer, load_examples,
                                  normalize_answer, score)

__all__ = ["EvalExample", "Scored", "evaluate_model", "extract_answer", "heldout_loss",
           "load_checkpoint", "load_examples", "load_source", "normalize_answer", "score"]
