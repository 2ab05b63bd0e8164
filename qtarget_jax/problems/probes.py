"""Cheap teacher-forced probes of a model on demonstrations: accuracy on the answer tokens of
reference solutions, memorisation of corrupted demonstrations, and KL from a reference model.

    answer_token_accuracy(model, tokenizer, examples)   # {"answer_token_acc", "answer_tokens"}
    memorisation(model, tokenizer, [(id, prompt, shown, clean), ...])
                                                        # {"memorisation", "memorisation_n"}
    ref = reference_logprobs(ref_model, tokenizer, prompts, responses)
    kl_from_reference(model, ref)                       # {"kl_ref", "kl_ref_tokens"}
    per_epoch = EpochProbes(tokenizer, examples, pairs, ref)
    per_epoch(model)                                    # all of the above, one forward
    batches = answer_batches(tokenizer, examples)       # answer positions, batched once
    logits = answer_logits(model, batches)              # one forward, read by both below
    answer_hits(batches, logits)                        # = answer_token_accuracy
    target_mass(batches, logits, spec, answer_logits(teacher, batches))
                                                        # {"gamma", "p_y", "q_y", "teacher_p_y"}
    target_mass_by_confidence(batches, logits, spec, teacher_logits)
                                                        # the same per bucket of p_y

Every probe tokenises prompt + response with the chat template exactly as training does
(`data.chat.tokenize_conversation`), right-pads rows to a width rounded up to `PAD_MULTIPLE`
(segment id 0 in pad slots) and runs one jitted forward per batch, the same jitted function
for every probe, which applies the LM head only at the positions the probe reads (never
[B, T, V] logits); a small jitted reduction turns those logits into the
metric on the device, so only small arrays come back to the host (the [N, V] reference
log-probabilities of `reference_logprobs` excepted).

Cost: one compile per probe and batch size. Each call pads all its batches to one width W and
one count K of read positions (the largest of the call), so repeated calls with the same sets
never retrace. A row stops at the last position the probe reads (the forward is causal, so
the tokens after it cannot change the logits read): memorisation reads one position per row.

`EpochProbes` (the experiment's per-epoch metrics) prepares the three probes' rows once and
packs them (`pack_rows`): the prefix all rows share (the chat template's system prompt and
user header) runs once into a KV cache, the rest of every row goes end to end into a few
sequences with segment ids (no padding to the longest row), each token attending to the
prefix and causally to its own row; one compiled program runs the forward, the LM head at
the read positions and all three reductions.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qtarget_jax.data.chat import tokenize_conversation
from qtarget_jax.data.records import Conversation, Message
from qtarget_jax.models.cache import KVCache
from qtarget_jax.models.layers import attention_mask
from qtarget_jax.problems.examples import EvalExample
from qtarget_jax.targets import IGNORE_INDEX, get_preset, per_token_qtarget, qtarget_distribution

PAD_MULTIPLE = 16   # row width (and gathered-row count) rounded up to this: few distinct shapes

# ---------------------------------------------------------------------------------------------
# Pure functions over arrays.


def token_accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """Greedy next-token hits where `mask`.

    Args:
      logits: [B, T, V] float32; labels: [B, T] int32; mask: [B, T] bool.
    Returns:
      (correct, total) float32 scalars: count of argmax(logits) == labels where mask, count of
      mask. Positions outside the mask never count, whatever their logits (NaN included).
    """
    hit = (jnp.argmax(logits, axis=-1) == labels) & mask
    return hit.sum().astype(jnp.float32), mask.sum().astype(jnp.float32)


def preference(logits: jax.Array, position: jax.Array, preferred: jax.Array,
               other: jax.Array) -> jax.Array:
    """Whether each row's logits prefer one token over another at one position.

    Args:
      logits: [B, T, V] float32; position, preferred, other: [B] int32.
    Returns:
      [B] bool: logits[b, position[b], preferred[b]] > logits[b, position[b], other[b]].
    """
    rows = logits[jnp.arange(logits.shape[0]), position]                  # [B, V]
    take = lambda ids: jnp.take_along_axis(rows, ids[:, None], axis=-1)[:, 0]
    return take(preferred) > take(other)


def kl_rows(ref_logp: jax.Array, logp: jax.Array) -> jax.Array:
    """KL(ref || model) per row.

    Args:
      ref_logp, logp: [N, V] float32 log-probabilities (log-softmax) of the reference and the
        model.
    Returns:
      [N] float32: sum_v exp(ref) * (ref - logp); a vocabulary entry whose reference
      probability is 0 (ref = -inf) contributes exactly 0.
    """
    p = jnp.exp(ref_logp)
    terms = jnp.where(p > 0, p * (ref_logp - logp), 0.0)
    return terms.sum(axis=-1)


# ---------------------------------------------------------------------------------------------
# Text helpers.

_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?"
_STEP_RESULT = re.compile(r"=[ \t]*(" + _NUMBER + ")")    # "5 + 3 = 8" -> "8"
_FINAL = re.compile(r"####[ \t]*" + _NUMBER)             # "#### 8" -> "#### 8"


def answer_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the answer tokens of a worked solution, sorted.

    The answer tokens are each step's result (the number right after an ``=``: ``5 + 3 = 8``
    gives the span of ``8``) and the final answer ``#### N`` (``####`` and N together). The
    ``####`` pattern is not tied to a line start, so a text whose newlines a tokenizer dropped
    still has its final answer found.
    """
    spans = [m.span(1) for m in _STEP_RESULT.finditer(text)]
    spans += [m.span() for m in _FINAL.finditer(text)]
    return sorted(spans)


def token_char_spans(tokenizer: Any, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character span ``[start, end)`` of each token in ``text = tokenizer.decode(ids)``.

    Found by incremental decoding: token k ends where ``decode(ids[:k+1])`` stops agreeing with
    ``text``, so a character made of several tokens' bytes (byte-level BPE) belongs to the token
    that completes it, and the earlier ones get empty spans. The spans are contiguous and cover
    ``text``: ``"".join(text[s:e] for s, e in spans) == text``. O(len(ids)^2) characters decoded.
    """
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids)
    spans, start = [], 0
    for k in range(1, len(ids) + 1):
        end = len(text) if k == len(ids) else len(os.path.commonprefix(
            [tokenizer.decode(ids[:k]), text]))
        end = max(end, start)
        spans.append((start, end))
        start = end
    return spans


def _overlaps(span: tuple[int, int], targets: list[tuple[int, int]]) -> bool:
    return any(span[0] < e and s < span[1] for s, e in targets)


# ---------------------------------------------------------------------------------------------
# Batches and the jitted forwards.


def _conversation(prompt: Any, response: str, where: str) -> Conversation:
    """prompt (a user string, or messages as dicts / `Message`s) + one assistant turn."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError(f"{where}: prompt must be a string or a non-empty list of messages, "
                         f"got {prompt!r:.80}")
    if not isinstance(response, str) or not response.strip():
        raise ValueError(f"{where}: response must be non-empty text, got {response!r:.80}")
    msgs = []
    for i, m in enumerate(prompt):
        if isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(
                m.get("content"), str):
            m = Message(m["role"], m["content"])
        if not isinstance(m, Message):
            raise ValueError(f"{where}: prompt[{i}] must be a Message or a dict with string "
                             f"'role' and 'content', got {m!r:.80}")
        msgs.append(m)
    return tuple(msgs) + (Message("assistant", response),)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")


def _round_up(n: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def _right_pad(rows: Sequence[np.ndarray], num_rows: int, width: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens, positions, segment_ids [num_rows, W] int32 (W = `width`, default the longest row
    rounded up to PAD_MULTIPLE): each row's tokens from slot 0 with positions 0, 1, ... and
    segment 1; pad slots (and rows past len(rows)) hold token 0, position 0, segment 0."""
    width = width or _round_up(max(len(r) for r in rows))
    tokens = np.zeros((num_rows, width), np.int32)
    positions = np.zeros((num_rows, width), np.int32)
    segments = np.zeros((num_rows, width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
        positions[i, :len(row)] = np.arange(len(row))
        segments[i, :len(row)] = 1
    return tokens, positions, segments


def _chunks(n: int, batch_size: int) -> list[range]:
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits_at(graphdef: Any, state: Any, tokens, positions, segment_ids,
               flat_index) -> jax.Array:
    """The one jitted forward of every probe: logits [K, V] float32 at the flat positions
    [K] int32 of [B * W] only (the trunk runs on [B, W]; the LM head only on the K rows the
    probe reads, never [B, W, V])."""
    model = nnx.merge(graphdef, state)
    hidden = model(tokens, positions, segment_ids, return_hidden=True)
    rows = hidden.reshape(-1, hidden.shape[-1])[flat_index]
    return model.logits(rows).astype(jnp.float32)


@jax.jit
def _log_softmax(logits: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(logits, axis=-1)


@jax.jit
def _kl_sum(logits, ref_logp, valid) -> jax.Array:
    """Sum over valid rows [K] bool of KL(ref_logp [K, V] || log-softmax of logits [K, V])."""
    return jnp.where(valid, kl_rows(ref_logp, jax.nn.log_softmax(logits, axis=-1)), 0.0).sum()


# ---------------------------------------------------------------------------------------------
# Model-level probes.


def _accuracy_rows(tokenizer: Any, examples: Sequence[EvalExample]
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """answer_token_accuracy's rows: per example, the input ids [n] int32 (prompt + reference
    cut after the last answer token's input) and labels [n] int32 (label[t] = ids[t + 1] where
    token t + 1 is an answer token, else -1). Raises its ValueErrors."""
    if not examples:
        raise ValueError("answer_token_accuracy: no examples")
    inputs, labels = [], []
    for ex in examples:
        if ex.reference is None:
            raise ValueError(f"answer_token_accuracy: example {ex.id!r} has no reference")
        where = f"example {ex.id!r}"
        ids, mask = tokenize_conversation(tokenizer, _conversation(ex.prompt, ex.reference,
                                                                   where), where)
        resp = np.flatnonzero(mask)                           # indices into ids
        text = tokenizer.decode(ids[resp].tolist())
        targets = answer_spans(text)
        spans = token_char_spans(tokenizer, ids[resp].tolist())
        answer = [j for j, sp in zip(resp, spans) if _overlaps(sp, targets)]
        if not answer:
            raise ValueError(f"answer_token_accuracy: example {ex.id!r}: reference has no answer "
                             f"tokens (no '= N' step result or '#### N' in {text!r:.120})")
        end = answer[-1]                                      # no label after the last answer
        label = np.full(end, -1, np.int32)                    # label[t] = ids[t + 1] at answers
        label[np.asarray(answer) - 1] = ids[np.asarray(answer)]
        inputs.append(ids[:end])
        labels.append(label)
    return inputs, labels


def _memorisation_rows(tokenizer: Any, pairs: Sequence[tuple[str, Any, str, str]]
                       ) -> tuple[list[np.ndarray], list[int], list[int], list[int]]:
    """memorisation's rows: per pair, the input ids [j] int32 of the shown sequence up to its
    first corrupted token j (exclusive), the read position j - 1, the shown and the clean token
    ids at j. Raises its ValueErrors."""
    if not pairs:
        raise ValueError("memorisation: no pairs")
    inputs, where_at, shown_tok, clean_tok = [], [], [], []
    for k, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 4:
            raise ValueError(f"memorisation: pairs[{k}] must be (id, prompt, shown, clean), "
                             f"got {pair!r:.120}")
        pid, prompt, shown, clean = pair
        where = f"pair {pid!r}"
        ids_s, _ = tokenize_conversation(tokenizer, _conversation(prompt, shown, where), where)
        ids_c, _ = tokenize_conversation(tokenizer, _conversation(prompt, clean, where), where)
        n = min(len(ids_s), len(ids_c))
        diff = np.flatnonzero(ids_s[:n] != ids_c[:n])
        if diff.size == 0:
            kind = "identical" if len(ids_s) == len(ids_c) else "differ only in length"
            raise ValueError(f"memorisation: {where}: shown and clean token ids are {kind}; "
                             "no corrupted position")
        j = int(diff[0])
        inputs.append(ids_s[:j])                              # read at j - 1 only
        where_at.append(j - 1)
        shown_tok.append(int(ids_s[j]))
        clean_tok.append(int(ids_c[j]))
    return inputs, where_at, shown_tok, clean_tok


@dataclasses.dataclass(frozen=True, eq=False)
class AnswerBatches:
    """The answer-token positions of reference solutions, batched once for repeated probes.

    tokens, positions, segment_ids: per batch, [B, W] int32 (right-padded, segment 0 = pad; one
      W for all batches). flat: per batch, [K] int32 flat positions in [B * W] whose next token
      is an answer token (one K for all batches, padded with 0). valid: per batch, [K] bool.
      labels: per batch, [K] int32, the answer token read at each flat position (0 at padding).
    """
    tokens: tuple[np.ndarray, ...]
    positions: tuple[np.ndarray, ...]
    segment_ids: tuple[np.ndarray, ...]
    flat: tuple[np.ndarray, ...]
    valid: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]

    @property
    def num_tokens(self) -> int:
        return int(sum(v.sum() for v in self.valid))


def answer_batches(tokenizer: Any, examples: Sequence[EvalExample], *, batch_size: int = 16
                   ) -> AnswerBatches:
    """`AnswerBatches` of the examples' references (see `answer_token_accuracy` for which
    tokens are answer tokens).

    Raises:
      ValueError: no examples, an example without a reference, or a reference without answer
        tokens (naming the example id).
    """
    _check_batch_size(batch_size)
    inputs, labels = _accuracy_rows(tokenizer, examples)
    bsz = min(batch_size, len(inputs))
    width = _round_up(max(len(r) for r in inputs))    # one [B, W] and one K for the call
    chunks = _chunks(len(inputs), bsz)
    k = _round_up(max(sum(int((labels[i] >= 0).sum()) for i in c) for c in chunks))
    out: dict[str, list] = {f.name: [] for f in dataclasses.fields(AnswerBatches)}
    for chunk in chunks:
        tokens, positions, segments = _right_pad([inputs[i] for i in chunk], bsz, width)
        lab = np.full(tokens.shape, -1, np.int32)
        for r, i in enumerate(chunk):
            lab[r, :len(labels[i])] = labels[i]
        flat, valid = _flat_index(lab >= 0, k)
        for name, arr in (("tokens", tokens), ("positions", positions),
                          ("segment_ids", segments), ("flat", flat), ("valid", valid),
                          ("labels", np.where(valid, lab.reshape(-1)[flat], 0))):
            out[name].append(arr)
    return AnswerBatches(**{name: tuple(v) for name, v in out.items()})


def answer_logits(model: nnx.Module, batches: AnswerBatches) -> list[jax.Array]:
    """Per batch, the model's logits [K, V] float32 at the answer positions of `batches`."""
    graphdef, state = nnx.split(model)
    return [_logits_at(graphdef, state, t, p, s, f) for t, p, s, f in
            zip(batches.tokens, batches.positions, batches.segment_ids, batches.flat)]


def answer_hits(batches: AnswerBatches, logits: Sequence[jax.Array]) -> dict[str, float]:
    """{"answer_token_acc", "answer_tokens"} of `answer_logits` on `batches`."""
    correct = total = 0.0
    for lab, valid, z in zip(batches.labels, batches.valid, logits):
        c, t = token_accuracy(z[None], jnp.asarray(lab)[None], jnp.asarray(valid)[None])
        correct += float(c)
        total += float(t)
    return {"answer_token_acc": correct / total, "answer_tokens": total}


def answer_token_accuracy(model: nnx.Module, tokenizer: Any, examples: Sequence[EvalExample],
                          *, batch_size: int = 16) -> dict[str, float]:
    """Teacher-forced greedy accuracy on the answer tokens of the reference solutions.

    Each example's prompt + reference is tokenised with the chat template as in training; the
    reference tokens (the supervised ones) are decoded and `answer_spans` is applied to that
    text (the reference itself for a lossless tokenizer); a reference token counts when its
    character span (`token_char_spans`) overlaps an answer span, and is a hit when the argmax of
    the logits at the position before it is that token.

    Args:
      model: a Decoder, `model(tokens [B, T] int32, positions, segment_ids) -> [B, T, V]`.
      examples: `EvalExample`s with a reference.
      batch_size: rows per forward (the last batch is padded to the same size).
    Returns:
      {"answer_token_acc": hits / answer tokens, "answer_tokens": count} as floats.
    Raises:
      ValueError: no examples, an example without a reference, or a reference without answer
        tokens (naming the example id).
    """
    batches = answer_batches(tokenizer, examples, batch_size=batch_size)
    return answer_hits(batches, answer_logits(model, batches))


@functools.partial(jax.jit, static_argnames=("spec",))
def _target_tokens(logits, labels, valid, teacher_logits, spec) -> dict[str, jax.Array]:
    """Per row [K]: gamma, p_y, Q(y) and the teacher's p(y) (0 without one) under `spec`, from
    logits [K, V], labels [K], valid [K] and teacher_logits [K, V] or None (invalid rows:
    values of label 0, to be masked by the caller)."""
    labels = jnp.where(valid, labels, IGNORE_INDEX)
    per = per_token_qtarget(logits, labels, spec, teacher_logits=teacher_logits, valid=valid)
    q = qtarget_distribution(logits, labels, spec, teacher_logits=teacher_logits)
    index = jnp.where(valid, labels, 0)[:, None]
    q_y = jnp.take_along_axis(q, index, axis=-1)[:, 0]
    t_y = (jnp.zeros_like(q_y) if teacher_logits is None else
           jnp.take_along_axis(jax.nn.softmax(teacher_logits.astype(jnp.float32), axis=-1),
                               index, axis=-1)[:, 0])
    return {"gamma": per["gamma"], "p_y": per["p_y"], "q_y": q_y, "teacher_p_y": t_y}


@functools.partial(jax.jit, static_argnames=("spec",))
def _target_sums(logits, labels, valid, teacher_logits, spec) -> dict[str, jax.Array]:
    """Sums over valid rows [K] of `_target_tokens` (one compiled program, as before the
    split)."""
    per = _target_tokens(logits, labels, valid, teacher_logits, spec)
    return {name: jnp.where(valid, x, 0.0).sum() for name, x in per.items()}


def _batches_of(caller: str, spec: Any, logits: Sequence[jax.Array],
                teacher_logits: Sequence[jax.Array] | None) -> tuple[Any, Sequence]:
    """(the TargetSpec of `spec` (a spec or preset name), per batch the teacher logits to pass:
    `teacher_logits` when the spec needs a teacher, else None each); a teacher-needing spec
    without teacher_logits is a ValueError naming `caller`."""
    spec = get_preset(spec) if isinstance(spec, str) else spec
    if spec.needs_teacher and teacher_logits is None:
        raise ValueError(f"{caller}: preset {spec.name!r} needs teacher_logits")
    return spec, (teacher_logits if spec.needs_teacher else [None] * len(logits))


def target_mass(batches: AnswerBatches, logits: Sequence[jax.Array], spec: Any,
                teacher_logits: Sequence[jax.Array] | None = None) -> dict[str, float]:
    """Where the Q-target of `spec` puts its mass at the answer tokens of `batches`: means over
    those tokens of gamma (the label's trust), p_y (the model's probability of the label),
    Q(y) = gamma + (1 - gamma) pi_tilde(y), and the teacher's probability of the label.
    (1 - gamma) is the mass of the residual term, Q(y) - gamma its share on the label.

    Args:
      batches: from `answer_batches`; logits: `answer_logits` of the model on them.
      spec: a TargetSpec or preset name; teacher_logits: `answer_logits` of the teacher
        (when spec.needs_teacher).
    Returns:
      {"gamma", "p_y", "q_y", "teacher_p_y" (with a teacher only)} as floats.
    """
    spec, teachers = _batches_of("target_mass", spec, logits, teacher_logits)
    sums: dict[str, float] = {}
    for lab, valid, z, t in zip(batches.labels, batches.valid, logits, teachers):
        got = _target_sums(z, jnp.asarray(lab), jnp.asarray(valid), t, spec)
        for name, v in got.items():
            sums[name] = sums.get(name, 0.0) + float(v)
    if not spec.needs_teacher:
        del sums["teacher_p_y"]
    return {name: v / batches.num_tokens for name, v in sums.items()}


def target_mass_by_confidence(batches: AnswerBatches, logits: Sequence[jax.Array], spec: Any,
                              teacher_logits: Sequence[jax.Array] | None = None,
                              edges: Sequence[float] = (0.0, 0.1, 0.5, 0.9, 1.0)
                              ) -> list[dict[str, Any]]:
    """`target_mass` per bucket of the model's own p_y: where the target puts its mass on the
    tokens the model is unsure of (the ones left to learn) against the ones it knows.

    Args:
      batches, logits, spec, teacher_logits: as in `target_mass`.
      edges: increasing bucket edges over [0, 1]; bucket i holds edges[i] <= p_y < edges[i+1],
        the last one also p_y == edges[-1].
    Returns:
      per bucket {"lo", "hi", "tokens", "share" (of all answer tokens), and, for a non-empty
      bucket (None when empty), the means "gamma", "p_y", "q_y", "teacher_p_y" (with a teacher
      only), "pull" (Q(y) - p_y: the minus logit gradient of the label, how hard the target
      pulls it up) and "pull_vs_sft" (sum of pull over sum of SFT's 1 - p_y in the bucket;
      None when that is 0)}.
    Raises:
      ValueError: edges not increasing, or not within [0, 1]; a teacher-needing spec without
        teacher_logits.
    """
    edges = [float(e) for e in edges]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])) or edges[0] < 0 \
            or edges[-1] > 1:
        raise ValueError(f"target_mass_by_confidence: edges must increase within [0, 1], "
                         f"got {edges}")
    spec, teachers = _batches_of("target_mass_by_confidence", spec, logits, teacher_logits)
    names = ["gamma", "p_y", "q_y"] + (["teacher_p_y"] if spec.needs_teacher else [])
    cols: dict[str, list[np.ndarray]] = {}
    for lab, valid, z, t in zip(batches.labels, batches.valid, logits, teachers):
        got = _target_tokens(z, jnp.asarray(lab), jnp.asarray(valid), t, spec)
        for name, v in got.items():
            cols.setdefault(name, []).append(np.asarray(v, np.float64)[valid])
    per = {name: np.concatenate(v) for name, v in cols.items()}
    p_y, total = per["p_y"], per["p_y"].size
    which = np.clip(np.searchsorted(edges, p_y, side="right") - 1, 0, len(edges) - 2)
    out = []
    for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
        inside = which == i
        n = int(inside.sum())
        row: dict[str, Any] = {"lo": lo, "hi": hi, "tokens": n, "share": n / total}
        for name in names:
            row[name] = float(per[name][inside].mean()) if n else None
        pull = per["q_y"][inside] - p_y[inside]
        row["pull"] = float(pull.mean()) if n else None
        sft_pull = float((1.0 - p_y[inside]).sum())     # 0 only if every p_y is exactly 1
        row["pull_vs_sft"] = float(pull.sum()) / sft_pull if sft_pull > 0 else None
        out.append(row)
    return out


def memorisation(model: nnx.Module, tokenizer: Any,
                 pairs: Sequence[tuple[str, Any, str, str]], *, batch_size: int = 16
                 ) -> dict[str, float]:
    """Share of corrupted demonstrations whose corrupted token the model prefers.

    Each pair is ``(id, prompt, shown, clean)``: prompt messages (or a user string), the shown
    (corrupted) response and the clean response (the same text with the correct numbers).
    Both are tokenised with the chat template; the first token where the two id sequences
    differ is the corrupted one. On the teacher-forced SHOWN sequence, the logits at the
    position before it are compared: memorised when logit[shown token] > logit[clean token].

    Args:
      model: a Decoder; pairs: see above; batch_size: rows per forward.
    Returns:
      {"memorisation": share of pairs memorised in [0, 1], "memorisation_n": number of pairs}.
    Raises:
      ValueError: no pairs, a malformed pair, or shown and clean whose ids do not differ in a
        common position (identical, or one a prefix of the other), naming the id.
    """
    _check_batch_size(batch_size)
    inputs, where_at, shown_tok, clean_tok = _memorisation_rows(tokenizer, pairs)
    graphdef, state = nnx.split(model)
    bsz = min(batch_size, len(inputs))
    width = _round_up(max(len(r) for r in inputs))    # one [B, W] for the call
    hits = 0
    for chunk in _chunks(len(inputs), bsz):
        tokens, positions, segments = _right_pad([inputs[i] for i in chunk], bsz, width)
        vec = lambda xs: np.asarray([xs[i] for i in chunk] + [0] * (bsz - len(chunk)), np.int32)
        flat = np.arange(bsz, dtype=np.int32) * tokens.shape[1] + vec(where_at)
        logits = _logits_at(graphdef, state, tokens, positions, segments, flat)
        pref = preference(logits[:, None], np.zeros(bsz, np.int32), vec(shown_tok),
                          vec(clean_tok))
        hits += int(np.asarray(pref)[:len(chunk)].sum())
    return {"memorisation": hits / len(inputs), "memorisation_n": float(len(inputs))}


@dataclasses.dataclass(frozen=True, eq=False)
class RefLogprobs:
    """A reference model's next-token log-probabilities on responses, per batch.

    tokens, positions, segment_ids: per batch, [B, W] int32 (right-padded, segment 0 = pad).
    response_masks: per batch, [B, W] bool: positions whose next token is a response token
      (the assistant turn and its closing template token).
    logp: [N, V] float32 log-softmax of the reference at those positions, batches in order and
      each batch's positions in row-major order (N = total of the masks).
    """
    tokens: tuple[np.ndarray, ...]
    positions: tuple[np.ndarray, ...]
    segment_ids: tuple[np.ndarray, ...]
    response_masks: tuple[np.ndarray, ...]
    logp: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.logp.shape[0])


def _flat_index(mask: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Flat positions [K] int32 of `mask` [B, W], padded with 0 to K (default: the count
    rounded up to PAD_MULTIPLE), and valid [K] bool."""
    idx = np.flatnonzero(mask)
    k = k or _round_up(max(len(idx), 1))
    flat = np.zeros(k, np.int32)
    flat[:len(idx)] = idx
    return flat, np.arange(k) < len(idx)


def reference_logprobs(ref_model: nnx.Module, tokenizer: Any, prompts: Sequence[Any],
                       responses: Sequence[str], *, batch_size: int = 16) -> RefLogprobs:
    """The reference model's log-softmax at every response position of prompt + response.

    Args:
      ref_model: a Decoder (e.g. the model before fine-tuning).
      prompts: user strings or message lists; responses: the assistant turns (same length).
      batch_size: rows per forward.
    Returns:
      `RefLogprobs`; its `logp` is [N, V] float32 on the host (N response tokens: N * V * 4
      bytes, so keep the responses few and short for a large vocabulary).
    Raises:
      ValueError: empty or unequal-length prompts / responses, an empty response.
    """
    _check_batch_size(batch_size)
    if not prompts:
        raise ValueError("reference_logprobs: no prompts")
    if len(prompts) != len(responses):
        raise ValueError(f"reference_logprobs: {len(prompts)} prompts but {len(responses)} "
                         "responses")
    inputs, masks = [], []
    for k, (prompt, response) in enumerate(zip(prompts, responses)):
        where = f"reference_logprobs: row {k}"
        ids, mask = tokenize_conversation(tokenizer, _conversation(prompt, response, where),
                                          where)
        inputs.append(ids[:-1])
        masks.append(mask[1:])
    graphdef, state = nnx.split(ref_model)
    bsz = min(batch_size, len(inputs))
    width = _round_up(max(len(r) for r in inputs))    # one [B, W] and one K for the call
    chunks = _chunks(len(inputs), bsz)
    k = _round_up(max(sum(int(masks[i].sum()) for i in c) for c in chunks))
    out = {"tokens": [], "positions": [], "segment_ids": [], "response_masks": []}
    logps = []
    for chunk in chunks:
        tokens, positions, segments = _right_pad([inputs[i] for i in chunk], bsz, width)
        resp = np.zeros(tokens.shape, bool)
        for r, i in enumerate(chunk):
            resp[r, :len(masks[i])] = masks[i]
        flat, valid = _flat_index(resp, k)
        logp = _log_softmax(_logits_at(graphdef, state, tokens, positions, segments, flat))
        logps.append(np.asarray(logp, np.float32)[valid])
        for key, arr in zip(out, (tokens, positions, segments, resp)):
            out[key].append(arr)
    return RefLogprobs(**{k: tuple(v) for k, v in out.items()},
                       logp=np.concatenate(logps, axis=0))


def kl_from_reference(model: nnx.Module, ref: RefLogprobs) -> dict[str, float]:
    """Mean over response tokens of KL(reference || model) on the batches of `ref`.

    Args:
      model: a Decoder with the reference's vocabulary; ref: from `reference_logprobs`.
    Returns:
      {"kl_ref": mean KL in nats, "kl_ref_tokens": number of response tokens} as floats.
    Raises:
      ValueError: a vocabulary size that differs from the reference's.
    """
    vocab = int(ref.logp.shape[1])
    masked = sum(int(m.sum()) for m in ref.response_masks)
    if masked != ref.num_tokens:
        raise ValueError(f"kl_from_reference: the response masks mark {masked} positions but "
                         f"logp has {ref.num_tokens} rows")
    if model.cfg.vocab_size != vocab:
        raise ValueError(f"kl_from_reference: model vocabulary {model.cfg.vocab_size} != "
                         f"reference {vocab}")
    graphdef, state = nnx.split(model)
    k = _round_up(max(int(m.sum()) for m in ref.response_masks))     # one K for the call
    total, start = 0.0, 0
    for tokens, positions, segments, resp in zip(ref.tokens, ref.positions, ref.segment_ids,
                                                 ref.response_masks):
        flat, valid = _flat_index(resp, k)
        n = int(valid.sum())
        rows = np.zeros((len(flat), vocab), np.float32)
        rows[:n] = ref.logp[start:start + n]
        start += n
        logits = _logits_at(graphdef, state, tokens, positions, segments, flat)
        total += float(_kl_sum(logits, rows, valid))
    return {"kl_ref": total / ref.num_tokens, "kl_ref_tokens": float(ref.num_tokens)}


# ---------------------------------------------------------------------------------------------
# All three probes as one packed forward (the experiment's per-epoch metrics).

PACK_WIDTH = 256    # packed sequence width: short rows share a sequence (segment ids)


def _common_prefix(rows: Sequence[np.ndarray]) -> int:
    """Length of the longest token prefix shared by all `rows` (1-D int arrays)."""
    n = min(len(r) for r in rows)
    for r in rows[1:]:
        diff = np.flatnonzero(np.asarray(r[:n]) != np.asarray(rows[0][:n]))
        n = int(diff[0]) if diff.size else n
    return n


@dataclasses.dataclass(frozen=True, eq=False)
class PackedRows:
    """Rows with the positions read from each, packed for one forward.

    prefix: [P] int32, the tokens every row starts with (computed once; P may be 0).
    tokens, positions, segment_ids: [B, T] int32, each row's tokens after the prefix laid end
      to end in the B sequences (segment 1, 2, ... per row within a sequence, 0 = pad), with
      positions P, P + 1, ... as in the unpacked row.
    flat: [K] int32 indices into the [B * T] slots, one per read position, in the order of the
      rows given and each row's reads in the order given.
    """
    prefix: np.ndarray
    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    flat: np.ndarray

    @property
    def padded_tokens(self) -> int:
        """Tokens the forward runs: P + B * T."""
        return len(self.prefix) + self.tokens.size


def pack_rows(rows: Sequence[np.ndarray], reads: Sequence[np.ndarray],
              width: int = PACK_WIDTH) -> PackedRows:
    """Packs token rows (1-D int32) whose logits are read at `reads` (per row, 1-D int
    positions into it). The longest prefix common to all rows, cut before the first read of
    any row, becomes `prefix`; the rest of each row goes into sequences of width
    max(`width`, longest rest rounded up to PAD_MULTIPLE), first fit by decreasing length.
    A causal model with the prefix visible to every segment gives each read position the same
    logits as the unpacked row (up to float rounding)."""
    if not rows or len(rows) != len(reads):
        raise ValueError(f"pack_rows: {len(rows)} rows and {len(reads)} read lists")
    reads = [np.asarray(r, np.int64) for r in reads]
    for i, (row, r) in enumerate(zip(rows, reads)):
        if r.size == 0 or r.min() < 0 or r.max() >= len(row):
            raise ValueError(f"pack_rows: row {i} (length {len(row)}) reads {r.tolist()[:8]}")
    p = min(_common_prefix(rows), min(int(r.min()) for r in reads))
    rests = [np.asarray(row[p:], np.int32) for row in rows]
    width = max(width, _round_up(max(len(r) for r in rests)))
    bins: list[list[int]] = []          # row indices per sequence
    room: list[int] = []
    for i in sorted(range(len(rests)), key=lambda i: -len(rests[i])):
        j = next((j for j, free in enumerate(room) if free >= len(rests[i])), None)
        if j is None:
            bins.append([])
            room.append(width)
            j = len(bins) - 1
        bins[j].append(i)
        room[j] -= len(rests[i])
    shape = (len(bins), width)
    tokens, positions, segments = (np.zeros(shape, np.int32) for _ in range(3))
    start = np.zeros(len(rests), np.int64)      # flat slot of each row's first token
    for b, members in enumerate(bins):
        at = 0
        for seg, i in enumerate(members, start=1):
            n = len(rests[i])
            tokens[b, at:at + n] = rests[i]
            positions[b, at:at + n] = p + np.arange(n)
            segments[b, at:at + n] = seg
            start[i] = b * width + at
            at += n
    flat = np.concatenate([start[i] + reads[i] - p for i in range(len(rows))]).astype(np.int32)
    return PackedRows(np.asarray(rows[0][:p], np.int32), tokens, positions, segments, flat)


def _packed_hidden(model: nnx.Module, prefix, tokens, positions, segment_ids) -> jax.Array:
    """Final-normed hidden states [B, T, D] of packed rows (prefix [P] int32; tokens,
    positions, segment_ids [B, T] int32, see `PackedRows`): the prefix runs once, alone, into
    a KV cache; every non-pad token then attends to all prefix slots and causally to its own
    segment."""
    b, t = tokens.shape
    p = prefix.shape[0]
    window = model.cfg.sliding_window
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    own = attention_mask(slots, segment_ids, slots, segment_ids, window)        # [B, T, T]
    if p == 0:
        return model(tokens, positions, segment_ids, return_hidden=True, mask=own)
    pre_pos = jnp.arange(p, dtype=jnp.int32)[None]
    cache = model.init_cache(1, p, jnp.float32)    # float32: the keys read back unrounded
    _, cache = model(prefix[None], pre_pos, jnp.ones((1, p), jnp.int32), return_hidden=True,
                     cache=cache)
    def grow(c, axis):   # the prefix's P slots in every row, then T empty slots on `axis`
        rows = jnp.broadcast_to(c, (b,) + c.shape[1:])            # k [1, K, Dh, P], v [1, K, P, Dh]
        empty = rows.shape[:axis] + (t,) + rows.shape[axis + 1:]
        return jnp.concatenate([rows, jnp.zeros(empty, c.dtype)], axis=axis)

    cache = KVCache(k=tuple(grow(k, 3) for k in cache.k), v=tuple(grow(v, 2) for v in cache.v),
                    segment_ids=jnp.concatenate([jnp.ones((b, p), jnp.int32),
                                                 jnp.zeros((b, t), jnp.int32)], axis=1),
                    index=jnp.asarray(p, jnp.int32))
    see_prefix = jnp.broadcast_to((segment_ids != 0)[:, :, None], (b, t, p))
    if window is not None:
        see_prefix &= positions[:, :, None] - pre_pos[:, None, :] < window
    mask = jnp.concatenate([see_prefix, own], axis=-1)                       # [B, T, P + T]
    hidden, _ = model(tokens, positions, segment_ids, return_hidden=True, cache=cache,
                      mask=mask)
    return hidden


@functools.partial(jax.jit, static_argnames=("graphdef", "k_acc", "k_mem"))
def _epoch_metrics(graphdef: Any, state: Any, prefix, tokens, positions, segment_ids, flat,
                   labels, shown, clean, ref_logp, *, k_acc: int, k_mem: int):
    """The one compiled program of `EpochProbes`: the packed forward, the LM head at the K
    read slots `flat` [K] int32 only, then each probe's reduction on its slice of the reads
    (accuracy [:k_acc], memorisation [k_acc:k_acc + k_mem], KL the rest). labels [k_acc],
    shown and clean [k_mem] int32; ref_logp [K - k_acc - k_mem, V] float32.
    Returns float32 scalars (answer hits, memorised rows, summed KL)."""
    model = nnx.merge(graphdef, state)
    hidden = _packed_hidden(model, prefix, tokens, positions, segment_ids)
    logits = model.logits(hidden.reshape(-1, hidden.shape[-1])[flat]).astype(jnp.float32)
    acc, mem, kl = logits[:k_acc], logits[k_acc:k_acc + k_mem], logits[k_acc + k_mem:]
    hits = token_accuracy(acc[None], labels[None], jnp.ones((1, k_acc), bool))[0]
    memorised = preference(mem[:, None], jnp.zeros(k_mem, jnp.int32), shown,
                           clean).sum().astype(jnp.float32)
    kl_sum = kl_rows(ref_logp, jax.nn.log_softmax(kl, axis=-1)).sum()
    return hits, memorised, kl_sum


class EpochProbes:
    """`answer_token_accuracy`, `memorisation` and `kl_from_reference` on fixed inputs,
    prepared once (tokenised, packed with `pack_rows`) and run as one compiled forward per
    call: the rows of all three share packed sequences, their common chat prefix (the system
    prompt and user header) runs once, and the LM head runs at the read positions only.
    The metrics are the three functions' (same rows, labels, read positions and reductions);
    only the float rounding of the forward differs (other shapes, the prefix computed apart).

        probes = EpochProbes(tokenizer, examples, pairs, ref)   # any of the three may be None
        probes(model)   # {"answer_token_acc", "answer_tokens", "memorisation",
                        #  "memorisation_n", "kl_ref", "kl_ref_tokens"} (of those given)
    """

    def __init__(self, tokenizer: Any, examples: Sequence[EvalExample] | None = None,
                 pairs: Sequence[tuple[str, Any, str, str]] | None = None,
                 reference: RefLogprobs | None = None, *, width: int = PACK_WIDTH):
        """examples: as answer_token_accuracy's; pairs: as memorisation's; reference: from
        reference_logprobs; width: packed sequence width (see pack_rows). Raises the three
        functions' ValueErrors, and one when all three are None."""
        rows, reads = [], []
        self.n_acc = self.n_mem = self.n_kl = 0
        labels = shown = clean = np.zeros(0, np.int32)
        if examples is not None:
            inputs, labs = _accuracy_rows(tokenizer, examples)
            for ids, lab in zip(inputs, labs):
                rows.append(ids)
                reads.append(np.flatnonzero(lab >= 0))
            labels = np.concatenate([lab[lab >= 0] for lab in labs]).astype(np.int32)
            self.n_acc = len(labels)
        if pairs is not None:
            inputs, where_at, shown_tok, clean_tok = _memorisation_rows(tokenizer, pairs)
            rows += inputs
            reads += [np.asarray([w]) for w in where_at]
            shown, clean = np.asarray(shown_tok, np.int32), np.asarray(clean_tok, np.int32)
            self.n_mem = len(inputs)
        if reference is not None:
            masked = sum(int(m.sum()) for m in reference.response_masks)
            if masked != reference.num_tokens:
                raise ValueError(f"EpochProbes: the response masks mark {masked} positions but "
                                 f"logp has {reference.num_tokens} rows")
            for tokens, segments, resp in zip(reference.tokens, reference.segment_ids,
                                              reference.response_masks):
                for r in range(tokens.shape[0]):
                    n = int((segments[r] != 0).sum())
                    if n:
                        rows.append(tokens[r, :n])
                        reads.append(np.flatnonzero(resp[r, :n]))
            self.n_kl = reference.num_tokens
        if not rows:
            raise ValueError("EpochProbes: no examples, pairs or reference")
        self.packed = pack_rows(rows, reads, width)
        self.vocab = None if reference is None else int(reference.logp.shape[1])
        ref_logp = (np.zeros((0, 1), np.float32) if reference is None
                    else np.asarray(reference.logp, np.float32))
        self._args = tuple(jnp.asarray(a) for a in (
            self.packed.prefix, self.packed.tokens, self.packed.positions,
            self.packed.segment_ids, self.packed.flat, labels, shown, clean, ref_logp))

    def __call__(self, model: nnx.Module) -> dict[str, float]:
        """The probes' metrics of `model` (a Decoder; for KL with the reference's vocabulary)
        as floats, in the order accuracy, memorisation, KL."""
        if self.vocab is not None and model.cfg.vocab_size != self.vocab:
            raise ValueError(f"kl_from_reference: model vocabulary {model.cfg.vocab_size} != "
                             f"reference {self.vocab}")
        graphdef, state = nnx.split(model)
        hits, memorised, kl_sum = _epoch_metrics(graphdef, state, *self._args,
                                                 k_acc=self.n_acc, k_mem=self.n_mem)
        out = {}
        if self.n_acc:
            out.update(answer_token_acc=float(hits) / self.n_acc,
                       answer_tokens=float(self.n_acc))
        if self.n_mem:
            out.update(memorisation=float(memorised) / self.n_mem,
                       memorisation_n=float(self.n_mem))
        if self.n_kl:
            out.update(kl_ref=float(kl_sum) / self.n_kl, kl_ref_tokens=float(self.n_kl))
        return out
