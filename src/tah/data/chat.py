"""Chat-template tokenisation with loss only on assistant tokens.

Most chat templates lack `{% generation %}` markers, so the assistant spans are found by rendering
the template incrementally: the text of messages[:i] with the generation prompt ends where
assistant message i begins, and the text of messages[:i+1] ends where it ends (its end-of-turn
marker included, trailing whitespace not). Templates that render history differently from the
last turn (e.g. Qwen3's think blocks) fall back to locating the message's text itself. Character
spans become token masks through the fast tokenizer's offsets.
"""

from __future__ import annotations

import logging
import os

from jinja2 import TemplateError

from tah.data.rows import DataReport, load_rows
from tah.errors import InputError

logger = logging.getLogger("tah.data")
IGNORE = -100


class TemplateMismatch(ValueError):
    """The rendered conversation does not contain an assistant message's text."""


def build_dataset(path: str | os.PathLike, tokenizer, max_length: int, strict: bool = False,
                  return_report: bool = False):
    """The conversations at `path` tokenised with `tokenizer`'s chat template, as a `datasets.Dataset`
    with columns `input_ids` and `labels` (labels[t] = input_ids[t] on assistant tokens, -100
    elsewhere; the model shifts them). Rows are truncated to `max_length` tokens. Skipped rows are
    logged as a warning, or with `return_report` left to the caller: returns (dataset, DataReport).
    Raises `InputError` on a missing file, a skipped row under `strict`, or an empty result."""
    import datasets

    conversations, report = load_rows(path, strict=strict)
    columns = tokenize_conversations(conversations, tokenizer, max_length, report, strict=strict)
    if not columns["input_ids"]:
        raise InputError(f"{path}: no usable rows after tokenisation ({report.summary()}); "
                         "raise --max-length or fix the rows")
    if report.skipped and not return_report:
        logger.warning("%s", report.summary())
    features = datasets.Features({name: datasets.List(datasets.Value("int32")) for name in columns})
    dataset = datasets.Dataset.from_dict(columns, features=features)
    return (dataset, report) if return_report else dataset


def tokenize_conversations(conversations: list[list[dict]], tokenizer, max_length: int,
                           report: DataReport | None = None, strict: bool = False) -> dict[str, list[list[int]]]:
    """{"input_ids", "labels"}: one list per conversation that has an assistant token within
    `max_length`. Conversations the template rejects or that truncation leaves without an assistant
    token are skipped into `report` (which names them by `report.rows`), or raise under `strict`."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the tokenizer has no chat template; use a tokenizer that has one (an instruct "
                         "model's) or set `tokenizer.chat_template` before tokenising")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise InputError(f"max_length must be an integer >= 2, got {max_length!r}")
    report = report or DataReport("<conversations>", total=len(conversations),
                                  rows=list(range(1, len(conversations) + 1)))
    input_ids, labels, kept_rows = [], [], []
    for row, messages in zip(report.rows, conversations, strict=True):
        try:
            ids, mask = tokenize_chat(tokenizer, messages)
        except (TemplateMismatch, TemplateError, ValueError, TypeError) as err:
            report.skip(row, f"the chat template cannot render this conversation ({err})", strict)
            continue
        ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask):
            report.skip(row, f"no assistant token within max_length={max_length} (the prompt is too long)", strict)
            continue
        input_ids.append(ids)
        labels.append([i if m else IGNORE for i, m in zip(ids, mask, strict=True)])
        kept_rows.append(row)
    report.rows = kept_rows
    return {"input_ids": input_ids, "labels": labels}


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(token ids, is-assistant mask) of one conversation rendered with the chat template."""
    text = render(tokenizer, messages, generation_prompt=False)
    spans = assistant_spans(tokenizer, messages, text)
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        # A token that straddles a span edge counts as assistant: all of the reply is learned.
        mask = [any(start < span_end and end > span_start for span_start, span_end in spans)
                for start, end in encoded["offset_mapping"]]
        return list(encoded["input_ids"]), mask
    # Slow tokenizers have no offsets: tokenise the pieces between span edges separately.
    ids, mask, cursor = [], [], 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, inside in ((text[cursor:start], False), (text[start:end], True)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                mask += [inside] * len(piece_ids)
        cursor = end
    return ids, mask


def render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of `text` (the rendered conversation) that the assistant writes."""
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content = message["content"].strip()
        before = render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        start = len(before) if before and text.startswith(before) and len(before) >= cursor else None
        found = text.find(content, cursor if start is None else start)
        if found < 0:
            raise TemplateMismatch(f"messages[{i}]'s text does not appear in the rendered conversation")
        content_end = found + len(content)
        last = i + 1 == len(messages)  # then `text` is that render already (a third of the time on 2-turn chats)
        after = text if last else render(tokenizer, messages[:i + 1], generation_prompt=False)
        if text.startswith(after) and len(after) >= content_end:
            end = len(after)
        else:  # history rendered differently: take the end-of-turn text the template puts after it
            terminator = after[after.rfind(content) + len(content):] if content in after else ""
            end = content_end + len(terminator) if text.startswith(terminator, content_end) else content_end
        while end > content_end and text[end - 1].isspace():
            end -= 1
        spans.append((found if start is None else start, end))
        cursor = end
    return spans
