"""Choosing tokens (greedy or temperature + top-p with a seed) and turning them into streamed text with stop
strings."""

from __future__ import annotations

import torch


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise sample from softmax(logits / T) restricted to the top_p nucleus."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        probs, order = probs.sort(descending=True)
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)  # the first token always stays
        return int(order[torch.multinomial(probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Incremental detokenization with stop strings. Hands out only text that can no longer change: a token that
    ends inside a multi-byte character waits for the next one, and a tail that could be the start of a stop
    string waits until it is not. Each step decodes a few tokens only (a window from the last committed text,
    as vLLM does), not the whole answer."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text, self.sent = "", 0  # the decoded text so far; how much of it was handed out
        self._prefix = self._read = 0  # the window: tokens[_prefix:_read] is already in `text`

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.tokens[start:end], skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def _pending(self) -> str:
        """Text of the tokens after the window, decoded with the window as context."""
        return self._decode(self._prefix)[len(self._decode(self._prefix, self._read)):]

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token: (new text safe to send, whether a stop string was reached)."""
        self.tokens.append(token)
        pending = self._pending()
        if pending and not pending.endswith("\ufffd"):  # complete characters: commit them
            self.text += pending
            self._prefix, self._read = self._read, len(self.tokens)
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self._hand_out(len(self.text)), True
        hold = 0
        for s in self.stop:
            hold = max(hold, next((k for k in range(min(len(s) - 1, len(self.text)), 0, -1)
                                   if self.text.endswith(s[:k])), 0))
        return self._hand_out(len(self.text) - hold), False

    def _hand_out(self, end: int) -> str:
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def flush(self) -> str:
        """The end of the answer (not at a stop string): everything left, an unfinished character included."""
        self.text += self._pending()
        self._prefix = self._read = len(self.tokens)
        return self._hand_out(len(self.text))
