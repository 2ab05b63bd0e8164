"""Rows of user data: parse, validate and normalise to a conversation.

Two JSONL row formats are accepted (one JSON object per line):

- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
- prompt/response: ``{"prompt": str, "response": str}`` -> ``[user: prompt, assistant: response]``

Other top-level keys (e.g. ``"id"``, ``"meta"``) are allowed and not used. Every problem is a
`BadRow` carrying a short machine-readable ``reason`` (the key that skip counts are grouped by)
and where it happened (``file:line``). `Policy` decides what happens to a bad row: ``"error"``
(default) raises, ``"skip"`` counts it by reason; nothing is ever dropped silently.
"""
from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any, Iterator, Mapping, Sequence

ROLES = ("system", "user", "assistant")
POLICIES = ("error", "skip")

# Reasons a row can be rejected (the keys of the skip counts).
REASONS = (
    "malformed_json",     # the line is not a JSON object
    "bad_fields",         # missing, extra-ambiguous or non-string fields
    "unknown_role",       # a role outside ROLES
    "no_assistant_turn",  # nothing to supervise
    "empty_response",     # an assistant turn with empty / whitespace-only content
    "too_long",           # longer than seq_len and truncation is off
    "prompt_too_long",    # truncation on, but no supervised token fits in seq_len
)


@dataclasses.dataclass(frozen=True)
class Message:
    role: str     # one of ROLES
    content: str


Conversation = tuple[Message, ...]


class BadRow(ValueError):
    """A row that cannot be used; ``reason`` is one of REASONS, ``where`` is ``file:line``."""

    def __init__(self, reason: str, where: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"BadRow reason {reason!r} is not one of {REASONS}")
        self.reason = reason
        self.where = where
        self.detail = detail
        super().__init__(f"{where}: {reason}: {detail}")


class Policy:
    """What to do with a `BadRow`: raise (``"error"``) or count and skip (``"skip"``).

    ``counts`` maps reason -> number of rows skipped for it; ``examples`` keeps the first
    location per reason so the summary can point at one.
    """

    def __init__(self, mode: str = "error"):
        if mode not in POLICIES:
            raise ValueError(f"bad-row policy {mode!r} is not one of {POLICIES}")
        self.mode = mode
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}

    def handle(self, err: BadRow) -> None:
        """Raise ``err`` under "error"; count it under "skip"."""
        if self.mode == "error":
            raise err
        self.counts[err.reason] += 1
        self.examples.setdefault(err.reason, str(err))

    def summary(self) -> str:
        """One line per reason, e.g. ``skipped 3 rows: malformed_json=2 (first: a.jsonl:7 ...)``."""
        total = sum(self.counts.values())
        if not total:
            return "skipped 0 rows"
        parts = [f"  {r}={n} (first: {self.examples[r]})" for r, n in sorted(self.counts.items())]
        return f"skipped {total} rows:\n" + "\n".join(parts)


def _require_str(obj: Mapping[str, Any], key: str, where: str, what: str) -> str:
    if key not in obj:
        raise BadRow("bad_fields", where, f"{what} has no {key!r} field (keys: {sorted(obj)})")
    value = obj[key]
    if isinstance(value, bytes):  # tfds data sources return text as bytes
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise BadRow("bad_fields", where,
                     f"{what} field {key!r} must be a string, got {type(value).__name__}: "
                     f"{str(value)[:60]!r}")
    return value


def _check_conversation(messages: Sequence[Message], where: str) -> Conversation:
    if not messages:
        raise BadRow("bad_fields", where, "'messages' is empty")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise BadRow("unknown_role", where,
                         f"messages[{i}].role={m.role!r}, expected one of {ROLES}")
        if m.role == "assistant" and not m.content.strip():
            raise BadRow("empty_response", where, f"messages[{i}] (assistant) has empty content")
    if not any(m.role == "assistant" for m in messages):
        raise BadRow("no_assistant_turn", where,
                     f"no assistant message among roles {[m.role for m in messages]}")
    return tuple(messages)


def row_to_conversation(row: Any, where: str) -> Conversation:
    """Validates one decoded row (a dict) and returns its conversation.

    Args:
      row: the decoded JSON object (or a tfds record dict: text may be bytes, and ``messages``
        may be a dict of parallel arrays ``{"role": [...], "content": [...]}``).
      where: location for messages, e.g. ``"train.jsonl:12"``.
    Raises:
      BadRow: with the reason and location.
    """
    if not isinstance(row, Mapping):
        raise BadRow("malformed_json", where,
                     f"a row must be a JSON object, got {type(row).__name__}")
    has_chat, has_pr = "messages" in row, ("prompt" in row or "response" in row)
    if has_chat and has_pr:
        raise BadRow("bad_fields", where, "row has both 'messages' and 'prompt'/'response'")
    if has_pr:
        prompt = _require_str(row, "prompt", where, "row")
        response = _require_str(row, "response", where, "row")
        return _check_conversation(
            [Message("user", prompt), Message("assistant", response)], where)
    if not has_chat:
        raise BadRow("bad_fields", where,
                     f"row needs 'messages' or 'prompt'+'response', has keys {sorted(row)}")
    raw = row["messages"]
    if isinstance(raw, Mapping):  # tfds Sequence({"role", "content"}) -> dict of arrays
        roles, contents = raw.get("role"), raw.get("content")
        if roles is None or contents is None or len(roles) != len(contents):
            raise BadRow("bad_fields", where, "'messages' dict needs equal-length role/content")
        raw = [{"role": r, "content": c} for r, c in zip(roles, contents)]
    if not isinstance(raw, (list, tuple)):
        raise BadRow("bad_fields", where,
                     f"'messages' must be a list, got {type(raw).__name__}")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, Mapping):
            raise BadRow("bad_fields", where,
                         f"messages[{i}] must be an object, got {type(m).__name__}")
        role = _require_str(m, "role", where, f"messages[{i}]")
        content = _require_str(m, "content", where, f"messages[{i}]")
        messages.append(Message(role, content))
    return _check_conversation(messages, where)


def parse_jsonl_line(line: str, where: str) -> Conversation:
    """Parses and validates one JSONL line; raises `BadRow` naming ``where``."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRow("malformed_json", where, f"{e.msg} at column {e.colno}") from None
    return row_to_conversation(row, where)


def read_jsonl(path: str, policy: Policy) -> Iterator[tuple[str, Conversation]]:
    """Yields ``(where, conversation)`` for each valid non-blank line of ``path``.

    Bad rows go to ``policy`` (raise or count). Blank lines are ignored.
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, parse_jsonl_line(line, where)
            except BadRow as err:
                policy.handle(err)


def conversation_to_dicts(conv: Conversation) -> list[dict[str, str]]:
    """The ``[{"role", "content"}, ...]`` form that chat templates and JSONL use."""
    return [{"role": m.role, "content": m.content} for m in conv]
