"""Text of a completion as it streams: decoded incrementally, cut at a stop string, and the
logprobs in each endpoint's layout."""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what decoding shows for an incomplete multi-byte character


class TextStream:
    """Tokens in, text deltas out. Text that may still turn out to start a stop string, or an
    incomplete character, is held back until the next tokens (or the end) settle it; the text
    ends before the first stop string, as OpenAI's does."""

    def __init__(self, tokenizer, stop: list[str] | None) -> None:
        self.tokenizer, self.stop = tokenizer, stop or []
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.tokens: list[int] = []
        self.sent = 0  # characters handed out

    def add(self, tokens: list[int]) -> None:
        self.tokens += tokens

    def delta(self, final: bool) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stop if s in text]
        if cuts:
            end = min(cuts)
        elif final:
            end = len(text)
        else:
            end = len(text) - self.hold
            while end > self.sent and text[end - 1] == REPLACEMENT:
                end -= 1
        piece = text[self.sent:max(end, self.sent)]
        self.sent = max(end, self.sent)
        return piece


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def chat_logprobs(tokenizer, tokens: list[int], logprobs: list, top: int) -> dict:
    """Chat's layout: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    def entry(token: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for token, (logprob, best) in zip(tokens, logprobs, strict=True):
        content.append({**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in best[:top]]})
    return {"content": content}


def completion_logprobs(tokenizer, tokens: list[int], logprobs: list, top: int) -> dict:
    """Completions' layout: parallel lists tokens, token_logprobs, top_logprobs (dicts), text_offset."""
    texts = [_token_text(tokenizer, token) for token in tokens]
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {"tokens": texts, "token_logprobs": [logprob for logprob, _ in logprobs],
            "top_logprobs": [{_token_text(tokenizer, t): lp for t, lp in best[:top]} for _, best in logprobs],
            "text_offset": offsets}
