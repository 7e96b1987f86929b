"""Exact-match answer accuracy by greedy generation from the chat-template prompt."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from tah.errors import InputError
from tah.generation.generate import generate
from tah.toy.task import extract_answer


def answer_accuracy(model, tokenizer, problems, max_new_tokens: int | None = None, batch_size: int = 32,
                    answer_of: Callable[[str], object] = extract_answer, progress: bool | None = None) -> dict:
    """Greedy-generate a solution to each problem and grade its final answer.

    problems: objects with `.question` and `.answer` (and `.solution` when max_new_tokens is None,
    which then becomes the longest reference solution in tokens + 8). Each prompt is
    [user: question] rendered with the tokenizer's chat template and the generation prompt, left-
    padded into batches of `batch_size`; generation stops at the tokenizer's EOS.
    A problem is correct iff answer_of(generated text) == problem.answer.

    Returns {"accuracy", "correct", "problems", "iterated_share" (share of generated tokens, EOS
    included, that got more than one pass; None if nothing was generated), "generated_tokens",
    "records": one per problem: {"question", "answer", "generated" (text, special tokens dropped),
    "predicted" (answer_of of it), "correct", "tokens" (text of each generated token),
    "iter_counts" (its passes)}}.
    """
    problems = list(problems)
    if not problems:
        raise InputError("answer_accuracy needs at least one problem")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    if max_new_tokens is None:
        max_new_tokens = _default_budget(tokenizer, problems)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    records = []
    starts = range(0, len(problems), batch_size)
    quiet = (not progress) if progress is not None else (True if len(starts) < 2 else None)
    for start in tqdm(starts, desc="answers", leave=False, disable=quiet):
        chunk = problems[start:start + batch_size]
        ids, mask = _prompts(tokenizer, [p.question for p in chunk], pad, model.device)
        out = generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        new_ids, counts = out.sequences[:, ids.shape[1]:].cpu(), out.iter_counts.cpu()
        for problem, row_ids, row_counts in zip(chunk, new_ids, counts, strict=True):
            made = row_counts > 0  # 0 marks the steps after the row finished
            tokens, passes = row_ids[made].tolist(), row_counts[made].tolist()
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            predicted = answer_of(text)
            records.append({"question": problem.question, "answer": problem.answer, "generated": text,
                            "predicted": predicted, "correct": predicted == problem.answer,
                            "tokens": [tokenizer.decode([t]) for t in tokens], "iter_counts": passes})
    correct = sum(r["correct"] for r in records)
    generated = sum(len(r["iter_counts"]) for r in records)
    iterated = sum(c > 1 for r in records for c in r["iter_counts"])
    return {"accuracy": correct / len(records), "correct": correct, "problems": len(records),
            "iterated_share": iterated / generated if generated else None, "generated_tokens": generated,
            "records": records}


def _default_budget(tokenizer, problems) -> int:
    if not all(hasattr(p, "solution") for p in problems):
        raise InputError("give max_new_tokens: the problems have no reference `.solution` to size it from")
    return max(len(tokenizer(p.solution, add_special_tokens=False)["input_ids"]) for p in problems) + 8


def _prompts(tokenizer, questions: list[str], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) left-padded chat-template prompts with the generation prompt, and their mask."""
    rows = []
    for question in questions:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        rows.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)
