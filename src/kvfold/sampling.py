"""Choosing tokens (greedy, or temperature + top-p with a seed) and turning them into streamed text with stop
strings; shared by `kvfold.decoding` and `kvfold serve`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import KVFoldError


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: greedy at temperature 0, else softmax(logits / temperature) over the top-p nucleus,
    from a generator seeded with `seed` (None: torch's global one)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise KVFoldError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise KVFoldError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def choose_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits [batch, vocab], on their device (the generator's device must match)."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        probs, order = probs.sort(dim=-1, descending=True)
        probs = probs * ((probs.cumsum(-1) - probs) < sampling.top_p)  # the most likely token always stays
        return order.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)



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
