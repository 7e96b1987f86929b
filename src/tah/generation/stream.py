"""Print generated text as it comes, each token coloured by its number of passes."""

from __future__ import annotations

import torch
from rich.console import Console

from tah.generation.render import pass_style


class DepthStreamer:
    """An HF-style streamer (`put`, `end`) for one row that colours text by passes per token."""

    wants_passes = True

    def __init__(self, tokenizer, console: Console, show_depth: bool = True) -> None:
        self.tokenizer, self.console, self.show_depth = tokenizer, console, show_depth
        self.tokens: list[int] = []
        self.printed = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor, passes: int = 1) -> None:
        if not self.prompt_seen:  # the first call carries the prompt, as with HF's TextStreamer
            self.prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.flatten().tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        piece, self.printed = text[len(self.printed):], text
        self.console.print(piece, style=pass_style(passes) if self.show_depth else "", end="",
                           soft_wrap=True, highlight=False, markup=False)

    def end(self) -> None:
        self.console.print()
