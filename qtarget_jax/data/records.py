"""Rows of user data: parse, validate and normalise to a conversation.

A row is a JSON object (a JSONL line) or a Parquet row as a dict. Without a `RowFormat`, a
row is recognised by its keys, in this order:

- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
- ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}``
- prompt/response: ``{"prompt": str, "response": str}`` -> ``[user: prompt, assistant: response]``

A `RowFormat` names the columns instead (``problem``/``solution``, a system prompt...). Other
keys (e.g. ``"id"``, ``"source"``) are not used; `RowFormat.keep` copies some into metadata.
Every problem is a `BadRow` carrying a short machine-readable ``reason`` (the key that skip
counts are grouped by) and where it happened (``file:line`` or ``file:row N``). `Policy`
decides what happens to a bad row: ``"error"`` (default) raises, ``"skip"`` counts it by
reason; nothing is ever dropped silently. A file that cannot be read at all (a truncated
Parquet or gzip shard) is a `BadFile`, raised under both policies.
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
    "bad_encoding",       # the line is not valid UTF-8
    "malformed_json",     # the line is not a JSON object
    "bad_fields",         # missing, null or non-string fields (or columns)
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


class BadFile(ValueError):
    """A file that cannot be read (truncated, corrupt, not Parquet/gzip). Never skipped: the
    number of rows it held is unknown, so a skip count could not say what was lost."""

    def __init__(self, path: str, detail: str):
        self.path = path
        self.detail = detail
        super().__init__(f"{path}: {detail}")


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

    def handle(self, err: BadRow, rows: int = 1) -> None:
        """Raise ``err`` under "error"; count it (as ``rows`` rows) under "skip"."""
        if self.mode == "error":
            raise err
        self.counts[err.reason] += rows
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


# ShareGPT speakers -> our roles ("human"/"gpt" in ShareGPT exports; some use our names).
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}


@dataclasses.dataclass(frozen=True)
class RowFormat:
    """Which columns of a row make the conversation. All ``None``: recognise it by its keys.

    messages: column of ``[{role, content}]`` (or ShareGPT ``[{from, value}]``) lists.
    prompt / response: columns of the user and assistant text (both or neither).
    system: column of a per-row system prompt (prompt/response rows).
    system_prompt: fixed text, added as the first (system) turn of every conversation that
      has none.
    keep: columns copied as they are into the example's metadata (e.g. ``source``, ``answer``).
    """
    messages: str | None = None
    prompt: str | None = None
    response: str | None = None
    system: str | None = None
    system_prompt: str | None = None
    keep: tuple[str, ...] = ()

    def __post_init__(self):
        if (self.prompt is None) != (self.response is None):
            raise ValueError("a row format needs both a prompt and a response column "
                             f"(got prompt={self.prompt!r}, response={self.response!r})")
        if self.messages is not None and self.prompt is not None:
            raise ValueError("a row format takes a messages column or prompt/response "
                             f"columns, not both ({self.messages!r}, {self.prompt!r})")
        if self.system is not None and self.prompt is None:
            raise ValueError("a system column goes with prompt/response columns")

    @property
    def explicit(self) -> bool:
        """True when the columns are named (no recognition by keys)."""
        return self.messages is not None or self.prompt is not None

    def columns_for(self, names: Sequence[str]) -> tuple[list[str], list[str]]:
        """``(columns to read, required columns missing from names)`` for a file's columns.

        Explicit formats need their columns; recognition picks the first of ``messages``,
        ``conversations``, ``prompt`` + ``response`` the file has. ``keep`` columns are always
        needed.
        """
        if self.messages is not None:
            want = [self.messages]
        elif self.prompt is not None:
            want = [self.prompt, self.response] + ([self.system] if self.system else [])
        elif "messages" in names:
            want = ["messages"]
        elif "conversations" in names:
            want = ["conversations"]
        else:
            want = ["prompt", "response"]
        want = want + [c for c in self.keep if c not in want]
        return want, [c for c in want if c not in names]

    def describe(self) -> dict[str, Any]:
        """JSON-able summary kept in the prepared dataset's metadata."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, ())}


def _message_list(raw: Any, key: str, where: str) -> list[Message]:
    """``[{role, content}]`` or ShareGPT ``[{from, value}]`` entries -> Messages."""
    if isinstance(raw, Mapping):  # tfds Sequence({"role", "content"}) -> dict of arrays
        roles, contents = raw.get("role"), raw.get("content")
        if roles is None or contents is None or len(roles) != len(contents):
            raise BadRow("bad_fields", where, f"{key!r} dict needs equal-length role/content")
        raw = [{"role": r, "content": c} for r, c in zip(roles, contents)]
    if not isinstance(raw, (list, tuple)):
        raise BadRow("bad_fields", where, f"{key!r} must be a list, got {type(raw).__name__}")
    messages = []
    for i, m in enumerate(raw):
        what = f"{key}[{i}]"
        if not isinstance(m, Mapping):
            raise BadRow("bad_fields", where, f"{what} must be an object, got {type(m).__name__}")
        if "from" in m and "role" not in m:  # ShareGPT
            speaker = _require_str(m, "from", where, what)
            if speaker not in SHAREGPT_ROLES:
                raise BadRow("unknown_role", where, f"{what}.from={speaker!r}, expected one "
                             f"of {tuple(SHAREGPT_ROLES)}")
            messages.append(Message(SHAREGPT_ROLES[speaker],
                                    _require_str(m, "value", where, what)))
        else:
            messages.append(Message(_require_str(m, "role", where, what),
                                    _require_str(m, "content", where, what)))
    return messages


def row_to_conversation(row: Any, where: str, fmt: RowFormat | None = None) -> Conversation:
    """Validates one decoded row (a dict) and returns its conversation.

    Args:
      row: the decoded JSON object or Parquet row (or a tfds record dict: text may be bytes,
        and ``messages`` may be a dict of parallel arrays ``{"role": [...], "content": [...]}``).
      where: location for messages, e.g. ``"train.jsonl:12"`` or ``"a.parquet:row 7"``.
      fmt: the columns to use; default: recognise the row by its keys (module doc).
    Raises:
      BadRow: with the reason and location.
    """
    fmt = fmt or _AUTO
    if not isinstance(row, Mapping):
        raise BadRow("malformed_json", where,
                     f"a row must be a JSON object, got {type(row).__name__}")
    if fmt.messages is not None:
        if fmt.messages not in row:
            raise BadRow("bad_fields", where, f"row has no {fmt.messages!r} field "
                         f"(keys: {sorted(row)})")
        messages = _message_list(row[fmt.messages], fmt.messages, where)
    elif fmt.prompt is not None:
        messages = [Message("user", _require_str(row, fmt.prompt, where, "row")),
                    Message("assistant", _require_str(row, fmt.response, where, "row"))]
        if fmt.system is not None:
            messages.insert(0, Message("system", _require_str(row, fmt.system, where, "row")))
    elif "messages" in row:
        messages = _message_list(row["messages"], "messages", where)
    elif "conversations" in row:
        messages = _message_list(row["conversations"], "conversations", where)
    elif "prompt" in row or "response" in row:
        messages = [Message("user", _require_str(row, "prompt", where, "row")),
                    Message("assistant", _require_str(row, "response", where, "row"))]
    else:
        raise BadRow("bad_fields", where,
                     f"row needs 'messages', 'conversations' or 'prompt'+'response', has keys "
                     f"{sorted(row)}; name other columns with a row format (--prompt-column "
                     "... --response-column ..., or --messages-column ...)")
    if fmt.system_prompt is not None and not (messages and messages[0].role == "system"):
        messages.insert(0, Message("system", fmt.system_prompt))
    return _check_conversation(messages, where)


def row_metadata(row: Mapping[str, Any], where: str, keep: Sequence[str]) -> dict[str, Any]:
    """The ``keep`` columns of a row, as they are; a missing one is a ``bad_fields`` BadRow."""
    out = {}
    for key in keep:
        if key not in row:
            raise BadRow("bad_fields", where, f"row has no {key!r} field to keep "
                         f"(keys: {sorted(row)})")
        out[key] = row[key]
    return out


_AUTO = RowFormat()


def parse_json(line: str | bytes, where: str) -> Any:
    """Decodes one JSONL line (UTF-8 bytes or text; a leading byte-order mark is dropped);
    raises `BadRow` naming ``where``."""
    if isinstance(line, bytes):
        line = line.removeprefix(b"\xef\xbb\xbf")
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRow("bad_encoding", where, f"not UTF-8: byte 0x{line[e.start]:02x} at "
                         f"column {e.start + 1}") from None
    try:
        return json.loads(line.removeprefix("\ufeff"))
    except json.JSONDecodeError as e:
        raise BadRow("malformed_json", where, f"{e.msg} at column {e.colno}") from None


def parse_jsonl_line(line: str | bytes, where: str, fmt: RowFormat | None = None
                     ) -> Conversation:
    """Parses and validates one JSONL line; raises `BadRow` naming ``where``."""
    return row_to_conversation(parse_json(line, where), where, fmt)


def read_jsonl(path: str, policy: Policy) -> Iterator[tuple[str, Conversation]]:
    """Yields ``(where, conversation)`` for each valid non-blank line of a plain JSONL file.

    Bad rows go to ``policy`` (raise or count). Blank lines are ignored. `readers.read_rows`
    reads every supported format (gzip, Parquet, row formats, kept columns).
    """
    with open(path, "rb") as f:
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
