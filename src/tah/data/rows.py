"""Reading conversation rows: JSONL (optionally .gz) or a `datasets` dataset saved to disk.

A row is either chat `messages` ([{role, content}, ...]) or `prompt` + `response` (aliases
`question` + `answer`), which becomes [user: prompt, assistant: response]. Malformed rows are
skipped and counted in a `DataReport`; with `strict=True` the first one raises `InputError`.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tah.errors import InputError

ROLES = ("system", "user", "assistant", "tool")
PAIRS = (("prompt", "response"), ("question", "answer"))
SHOWN = 5  # how many skipped rows a summary names


@dataclass
class DataReport:
    """What reading (and tokenising) a data source kept and skipped.

    rows: 1-based row numbers of the kept rows, in order (JSONL: line numbers);
    skipped: (row number, reason) of each skipped row; total: rows seen.
    """

    source: str
    total: int = 0
    rows: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return len(self.rows)

    def skip(self, row: int, reason: str, strict: bool) -> None:
        """Record a skipped row; with `strict` raise instead, naming the row and the fix."""
        if strict:
            raise InputError(f"{self.source} row {row}: {reason}; fix or remove the row "
                             "(or drop --strict / strict=True to skip malformed rows)")
        self.skipped.append((row, reason))

    def summary(self) -> str:
        """One paragraph: rows kept / skipped, and the first few skipped rows with their reasons."""
        text = f"{self.source}: kept {self.kept} of {self.total} rows"
        if self.skipped:
            text += f", skipped {len(self.skipped)}"
            shown = "; ".join(f"row {row}: {reason}" for row, reason in self.skipped[:SHOWN])
            more = f"; ... and {len(self.skipped) - SHOWN} more" if len(self.skipped) > SHOWN else ""
            text += f" ({shown}{more})"
        return text


def load_rows(path: str | os.PathLike, strict: bool = False) -> tuple[list[list[dict]], DataReport]:
    """The conversations at `path` (one list of {role, content, ...} messages per kept row) and the
    report of what was skipped. Raises `InputError` if the path is missing, a row is malformed under
    `strict`, or no row is usable."""
    path = Path(path)
    report = DataReport(str(path))
    if not path.exists():
        raise InputError(f"data file {path} does not exist; give a JSONL file or a `datasets` dataset "
                         "directory (save_to_disk)")
    conversations = []
    for row, record, error in _records(path):
        report.total += 1
        messages, reason = (None, error) if error else to_messages(record)
        if reason:
            report.skip(row, reason, strict)
            continue
        conversations.append(messages)
        report.rows.append(row)
    if not conversations:
        raise InputError(empty_message(report, path))
    return conversations, report


def empty_message(report: DataReport, path: Path) -> str:
    hint = "each row needs chat `messages` or `prompt` + `response` (or `question` + `answer`)"
    if path.is_file() and path.read_bytes()[:64].lstrip().startswith(b"["):
        hint = "the file looks like one JSON array: write one JSON object per line (JSONL)"
    detail = f" ({report.summary()})" if report.total else " (the file has no rows)"
    return f"{path}: no usable rows{detail}; {hint}"


def _records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(1-based row number, parsed record or None, parse error or None) per row."""
    if path.is_dir():
        yield from _dataset_records(path)
        return
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue  # blank lines (e.g. a trailing newline) are not rows
                try:
                    yield number, json.loads(line), None
                except json.JSONDecodeError as err:
                    yield number, None, f"invalid JSON ({err.msg} at column {err.colno})"
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read data file {path}: {err}; give a UTF-8 JSONL file") from err


def _dataset_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise InputError(f"{path} is a directory but not a `datasets` dataset saved with save_to_disk; "
                         "give a JSONL file or such a directory") from err
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data and len(data) != 1:
            raise InputError(f"{path} holds splits {sorted(data)}; save the split to use on its own, "
                             "or name one `train`")
        data = data["train"] if "train" in data else next(iter(data.values()))
    for index, record in enumerate(data):
        yield index + 1, record, None


def to_messages(record: Any) -> tuple[list[dict] | None, str | None]:
    """A record as chat messages, or (None, why it is malformed)."""
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    if record.get("messages") is not None:
        return _check_messages(record["messages"])
    for prompt_key, response_key in PAIRS:
        if record.get(prompt_key) is not None or record.get(response_key) is not None:
            messages = []
            for key, role in ((prompt_key, "user"), (response_key, "assistant")):
                value = record.get(key)
                if value is None:
                    return None, f"missing field `{key}` (rows with `{prompt_key}` need `{response_key}` too)"
                if not isinstance(value, str):
                    return None, f"field `{key}` must be a string, got {type(value).__name__}"
                if not value.strip():
                    return None, f"empty text in `{key}`"
                messages.append({"role": role, "content": value})
            return messages, None
    return None, "missing field: need `messages`, or `prompt` + `response` (or `question` + `answer`)"


def _check_messages(messages: Any) -> tuple[list[dict] | None, str | None]:
    if not isinstance(messages, list):
        return None, f"`messages` must be a list of {{role, content}} objects, got {type(messages).__name__}"
    if not messages:
        return None, "empty `messages` list"
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            return None, f"{where} must be an object with `role` and `content`, got {type(message).__name__}"
        role, content = message.get("role"), message.get("content")
        if role is None or content is None:
            return None, f"{where} is missing field `{'role' if role is None else 'content'}`"
        if not isinstance(role, str) or not isinstance(content, str):
            bad = "role" if not isinstance(role, str) else "content"
            return None, f"{where}.{bad} must be a string, got {type(message[bad]).__name__}"
        if role not in ROLES:
            return None, f"{where} has unknown role {role!r} (expected one of {', '.join(ROLES)})"
        if not content.strip():
            return None, f"empty text in {where}.content"
        # Drop keys a dataset on disk fills with None for other rows' extra fields.
        out.append({key: value for key, value in message.items() if value is not None})
    if not any(m["role"] == "assistant" for m in out):
        return None, "no assistant message (nothing to train on)"
    return out, None
