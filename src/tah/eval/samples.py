"""samples.html: solutions with every token coloured by its number of passes.

Colours follow the terminal renderer (`tah.generation.render`): one pass plain, then yellow, red,
magenta as passes grow. A token whose iteration decision differs from its hard label (iterated
but labelled easy, or labelled hard but not iterated) is underlined with a wavy line; a wrong
teacher-forced prediction gets a red corner mark. Hovering a token shows its details.
"""

from __future__ import annotations

import os
from html import escape
from pathlib import Path

from tah.errors import InputError

# Background per pass count, in the order of render.PASS_STYLES (plain, yellow, red, magenta).
PASS_COLOURS = {1: "#f1f1f1", 2: "#ffe066", 3: "#ff8a80", 4: "#e1a6f0"}
DEEPEST_COLOUR = "#b35fd6"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; color: #222; }
.sample { margin: 1.2em 0; padding: .6em .8em; border: 1px solid #ddd; border-radius: 6px; }
.head { font-size: .9em; color: #555; margin-bottom: .4em; }
.text { font-family: ui-monospace, monospace; font-size: 1.05em; white-space: pre-wrap; line-height: 1.7; }
.tok { padding: 1px 0; border-radius: 2px; }
.mismatch { text-decoration: underline wavy #c00; text-underline-offset: 3px; }
.wrong { box-shadow: inset 0 -3px 0 #c00; }
.legend span.tok { padding: 1px 6px; margin-right: .6em; }
.ok { color: #080; } .bad { color: #c00; }
"""


def pass_colour(passes: int) -> str:
    return PASS_COLOURS.get(int(passes), DEEPEST_COLOUR)


def samples_html(records: list[dict], path: str | os.PathLike, title: str = "Think-at-Hard: passes per token",
                 max_iter: int | None = None) -> Path:
    """Write a standalone HTML page of `records` (from `solution_records` or `answer_accuracy`):
    each needs "tokens" (text per token) and "iter_counts" (passes per token, same length); used
    when present: "hard" (per token: bool or the label's pass count, > 1 = hard), "token_correct",
    "predicted" (per token), "question", "answer", "generated", "correct" (per record), "name".
    Every token becomes one `<span class="tok pN">`. Text is HTML-escaped. Written atomically.
    Raises `InputError` on a record whose lists differ in length."""
    deepest = max([max(r["iter_counts"], default=1) for r in records] + [max_iter or 2])
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{escape(title)}</title>",
             f"<style>{STYLE}{_pass_classes(deepest)}</style>\n</head>\n<body>",
             f"<h1>{escape(title)}</h1>", _legend(deepest)]
    for number, record in enumerate(records, start=1):
        parts.append(_sample(number, record))
    parts.append("</body>\n</html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _pass_classes(deepest: int) -> str:
    return "".join(f".p{n} {{ background: {pass_colour(n)}; }}\n" for n in range(1, deepest + 1))


def _legend(deepest: int) -> str:
    swatches = "".join(f'<span class="tok p{n}">{n} pass{"es" if n > 1 else ""}</span>' for n in range(1, deepest + 1))
    return ('<p class="legend"><b>Legend:</b> ' + swatches
            + '<span class="mismatch">iteration differs from the hard label</span> '
            + '<span class="wrong">&nbsp;wrong prediction&nbsp;</span></p>')


def _sample(number: int, record: dict) -> str:
    tokens, passes = record["tokens"], record["iter_counts"]
    per_token = {key: record.get(key) for key in ("hard", "token_correct", "predicted")}
    for key, values in [("iter_counts", passes), *per_token.items()]:
        if values is not None and len(values) != len(tokens):
            raise InputError(f"record {number}: {key} has {len(values)} entries but tokens has {len(tokens)}")
    head = [f"#{number}"]
    if record.get("name"):
        head.append(escape(str(record["name"])))
    if record.get("question") is not None:
        head.append(f"question: <code>{escape(str(record['question']))}</code>")
    if record.get("answer") is not None:
        head.append(f"answer: <code>{escape(str(record['answer']))}</code>")
    if record.get("correct") is not None:
        head.append('<span class="ok">correct</span>' if record["correct"] else '<span class="bad">wrong</span>')
    spans = [_token(i, tokens[i], passes[i], per_token) for i in range(len(tokens))]
    return (f'<div class="sample"><div class="head">{" &middot; ".join(head)}</div>'
            f'<div class="text">{"".join(spans)}</div></div>')


def _token(i: int, piece: str, passes: int, per_token: dict) -> str:
    classes = ["tok", f"p{int(passes)}"]
    tip = [f"passes {int(passes)}"]
    hard = per_token["hard"]
    if hard is not None:
        labelled_hard = hard[i] is True or (not isinstance(hard[i], bool) and hard[i] > 1)
        tip.append("hard label" if labelled_hard else "easy label")
        if labelled_hard != (passes > 1):
            classes.append("mismatch")
    if per_token["predicted"] is not None:
        tip.append(f"predicted {per_token['predicted'][i]!r}")
    if per_token["token_correct"] is not None and not per_token["token_correct"][i]:
        classes.append("wrong")
    shown = piece.replace("\n", "\u21b5\n")  # a visible mark for the newline, then the line break
    return (f'<span class="{" ".join(classes)}" data-passes="{int(passes)}" title="{escape(", ".join(tip))}">'
            f"{escape(shown)}</span>")
