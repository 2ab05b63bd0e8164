"""Tokenise a conversation with the model's chat template and mark the supervised tokens.

Supervised (mask 1): the content of every assistant turn and the template text that closes it
up to the first whitespace after it (for ChatML: ``<|im_end|>``, so the model learns to stop).
Not supervised: system/user turns and the assistant header (``<|im_start|>assistant\\n``).

How spans are found: render the conversation prefixes with the template,
``P_i = render(messages[:i], add_generation_prompt=True)`` (text before assistant turn i) and
``Q_i = render(messages[:i+1])`` (text through it). The full rendering must start with ``Q_i``,
and ``Q_i`` with ``P_i``; then ``[len(P_i), len(Q_i))`` minus trailing whitespace is the turn.
The text is cut at those boundaries and each piece tokenised on its own, which is also how
inference sees it (prompt tokenised, then answer tokens generated after it).

Example -> training positions (``to_training_example``): with token ids ``x[0..n-1]`` and mask
``m``, inputs are ``x[0..n-2]`` and ``labels[t] = x[t+1] if m[t+1] else -100``: the first
supervised label sits at the position of the last header token (``\\n`` after ``assistant``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from qtarget_jax.data.records import BadRow, Conversation, conversation_to_dicts

IGNORE = -100  # label value for unsupervised positions (design.md data contract)


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One conversation as model inputs.

    tokens: [L] int32 input ids (L = n - 1 for n rendered tokens).
    labels: [L] int32 next token where supervised, IGNORE elsewhere.
    truncated: True when the tail was cut to fit seq_len.
    """
    tokens: np.ndarray
    labels: np.ndarray
    truncated: bool = False

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def _render(tokenizer: Any, messages: list[dict[str, str]], gen_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=gen_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def assistant_spans(tokenizer: Any, conv: Conversation, where: str) -> tuple[str, list]:
    """Renders ``conv`` and returns ``(text, [(start, end), ...])`` character spans to supervise.

    Raises:
      ValueError: when the template is not prefix-stable (rendering a prefix of the
        conversation does not give a prefix of the full text), naming ``where``.
    """
    messages = conversation_to_dicts(conv)
    full = _render(tokenizer, messages, gen_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], gen_prompt=True)
        through = (full if i == len(messages) - 1   # the same render: skip it
                   else _render(tokenizer, messages[: i + 1], gen_prompt=False))
        if not (full.startswith(through) and through.startswith(before)):
            raise ValueError(
                f"{where}: chat template is not prefix-stable at messages[{i}]: rendering the "
                f"first {i} messages (with generation prompt) and the first {i + 1} does not "
                "give prefixes of the full conversation; cannot locate the assistant turn")
        end = len(through.rstrip())
        if end <= len(before):
            raise BadRow("empty_response", where, f"messages[{i}] renders to no text")
        spans.append((len(before), end))
    return full, spans


def _pieces(tokenizer: Any, conv: Conversation, where: str) -> list[tuple[str, bool]]:
    """The rendered text cut at the assistant spans: ``[(text, supervised), ...]``."""
    full, spans = assistant_spans(tokenizer, conv, where)
    cuts, pos = [], 0
    for start, end in spans:
        cuts.append((full[pos:start], False))
        cuts.append((full[start:end], True))
        pos = end
    cuts.append((full[pos:], False))
    return [(text, sup) for text, sup in cuts if text]


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # same ids as tokenizer(texts), without its per-call overhead
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _join(pieces: list[tuple[str, bool]], encoded: Sequence[list[int]]
          ) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([np.asarray(e, np.int32) for e in encoded])
    mask = np.concatenate([np.full(len(e), sup, bool) for e, (_, sup) in zip(encoded, pieces)])
    return ids, mask


def tokenize_conversation(tokenizer: Any, conv: Conversation, where: str
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(ids [n] int32, mask [n] bool)`` for the rendered conversation.

    ``mask[j]`` is True for tokens of an assistant span. Special tokens come from the template
    text itself (``add_special_tokens=False``), so nothing is added twice.
    """
    pieces = _pieces(tokenizer, conv, where)
    return _join(pieces, _encode(tokenizer, [t for t, _ in pieces]))


def tokenize_conversations(tokenizer: Any, items: Sequence[tuple[str, Conversation]]
                           ) -> list[tuple[np.ndarray, np.ndarray] | BadRow]:
    """`tokenize_conversation` of many ``(where, conversation)`` items with ONE batched encode
    (the Rust tokenizer spreads a batch over its threads). Returns, per item, ``(ids, mask)``
    or the `BadRow` it raised, in order; the same ids as one call per item."""
    out: list[Any] = [None] * len(items)
    cut = []
    for k, (where, conv) in enumerate(items):
        try:
            cut.append((k, _pieces(tokenizer, conv, where)))
        except BadRow as err:
            out[k] = err
    encoded = _encode(tokenizer, [t for _, pieces in cut for t, _ in pieces])
    pos = 0
    for k, pieces in cut:
        out[k] = _join(pieces, encoded[pos:pos + len(pieces)])
        pos += len(pieces)
    return out


def to_training_example(ids: np.ndarray, mask: np.ndarray, seq_len: int, *, truncate: bool,
                        where: str) -> TokenizedExample:
    """Shifts ``(ids [n], mask [n])`` into inputs/labels of length ``n - 1`` and applies seq_len.

    Args:
      ids: [n] int32 token ids; mask: [n] bool supervised tokens.
      seq_len: maximum number of positions (T of the batch).
      truncate: False -> a longer example raises ``BadRow("too_long")``. True -> keep the first
        seq_len positions (the response tail is cut); if no supervised label is left (the prompt
        alone fills seq_len) raise ``BadRow("prompt_too_long")``.
    """
    if ids.shape != mask.shape or ids.ndim != 1:
        raise ValueError(f"ids {ids.shape} and mask {mask.shape} must be equal 1-D shapes")
    tokens = ids[:-1]
    labels = np.where(mask[1:], ids[1:], IGNORE).astype(np.int32)
    truncated = False
    if tokens.shape[0] > seq_len:
        if not truncate:
            raise BadRow("too_long", where, f"{tokens.shape[0]} positions > seq_len={seq_len}")
        tokens, labels, truncated = tokens[:seq_len], labels[:seq_len], True
        if not (labels != IGNORE).any():
            raise BadRow("prompt_too_long", where,
                         f"no assistant token within the first seq_len={seq_len} positions")
    if not (labels != IGNORE).any():
        raise BadRow("empty_response", where, "no supervised label after tokenisation")
    return TokenizedExample(tokens.astype(np.int32), labels, truncated)
