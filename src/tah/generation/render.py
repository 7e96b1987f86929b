"""Show which tokens iterated: text coloured by the number of passes each token got."""

from __future__ import annotations

from rich.text import Text

# One pass is the plain model (no colour); each extra pass gets a hotter colour.
PASS_STYLES = {1: "", 2: "bold yellow", 3: "bold red", 4: "bold magenta"}


def pass_style(passes: int) -> str:
    return PASS_STYLES.get(passes, "bold magenta reverse")


def depth_text(pieces: list[str], passes: list[int]) -> Text:
    """rich Text of `pieces` (decoded tokens), each styled by its pass count."""
    text = Text()
    for piece, count in zip(pieces, passes, strict=True):
        text.append(piece, style=pass_style(int(count)))
    return text


def legend(max_iter: int) -> Text:
    text = Text("passes: ")
    for n in range(1, max_iter + 1):
        text.append(f" {n} ", style=pass_style(n) or "dim")
    return text
