"""Evaluation problems and their scoring, below both `train` and `evaluate`: final-answer
parsing (answers.py), reading evaluation sets (examples.py), greedy accuracy and Average@k of
generated outputs (accuracy.py), teacher-forced probes: answer-token accuracy, memorisation of
corrupted demonstrations, KL from a reference model, the Q-target's mass at answer tokens
(probes.py). Imports nothing from `train` or `evaluate`."""
from qtarget_jax.problems.accuracy import solve
from qtarget_jax.problems.answers import (Scored, extract_answer, gold_answer, normalize_answer,
                                          score)
from qtarget_jax.problems.examples import EvalExample, load_examples
from qtarget_jax.problems.probes import (AnswerBatches, EpochProbes, RefLogprobs,
                                         answer_batches, answer_hits, answer_logits,
                                         answer_spans, answer_token_accuracy, kl_from_reference,
                                         kl_rows, memorisation, preference, reference_logprobs,
                                         target_mass, token_accuracy, token_char_spans)

__all__ = ["AnswerBatches", "EpochProbes", "EvalExample", "RefLogprobs", "Scored",
           "answer_batches", "answer_hits", "answer_logits", "answer_spans",
           "answer_token_accuracy", "extract_answer", "gold_answer", "kl_from_reference",
           "kl_rows", "load_examples", "memorisation", "normalize_answer", "preference",
           "reference_logprobs", "score", "solve", "target_mass", "token_accuracy",
           "token_char_spans"]
