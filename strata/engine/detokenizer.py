"""Incremental detokenization and stop-string matching for one sequence.

Decoding token by token can split a multi-byte character or change how a word joins its
neighbour, so each new piece is the difference between decoding a short window ending at
the newest token and the same window without it. A piece that ends in an incomplete
character ("\ufffd") waits for the next token.
"""

from __future__ import annotations

from typing import Any

_WINDOW = 6  # tokens of left context kept for joining rules


def decode_ids(tokenizer: Any, ids: list[int], skip_special_tokens: bool) -> str:
    """Decode, ignoring ids beyond the tokenizer (random models may sample them)."""
    vocab = len(tokenizer)
    return tokenizer.decode([i for i in ids if i < vocab], skip_special_tokens=skip_special_tokens)


class Detokenizer:
    def __init__(
        self, tokenizer: Any, skip_special_tokens: bool, stop: tuple[str, ...], min_tokens: int = 0
    ) -> None:
        """Stop strings are looked for in text that tokens after the first min_tokens add."""
        self.tokenizer = tokenizer
        self.min_tokens = min_tokens
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # all text decoded so far (stop string cut off once matched)
        self.stopped = False
        self._emitted = 0  # characters of `text` handed out as deltas

    def _decode(self, ids: list[int]) -> str:
        return decode_ids(self.tokenizer, ids, self.skip_special_tokens)

    def add(self, token_id: int) -> bool:
        """Append a token. True if a stop string now appears (text is cut before it)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(self._ids[self._prefix_offset :])
        if self.stopped or after.endswith("\ufffd") or len(after) <= len(before):
            return self.stopped
        search_from = max(0, len(self.text) - self._hold)
        self.text += after[len(before) :]
        self._prefix_offset = max(0, len(self._ids) - _WINDOW)
        self._read_offset = len(self._ids)
        if len(self._ids) <= self.min_tokens:
            return False
        hits = [at for s in self.stop if (at := self.text.find(s, search_from)) != -1]
        if hits:
            self.text = self.text[: min(hits)]  # the earliest stop string wins
            self.stopped = True
        return self.stopped

    def flush(self) -> None:
        """At the end of a sequence, keep what an incomplete character decoded to, as a
        decode of all tokens at once would."""
        if self.stopped or self._read_offset == len(self._ids):
            return
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(self._ids[self._prefix_offset :])
        self.text += after[len(before) :]
        self._read_offset = len(self._ids)

    def take_delta(self, finished: bool) -> str:
        """New text since the last call. Holds back a tail that could begin a stop string."""
        end = len(self.text) if finished else max(self._emitted, len(self.text) - self._hold)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
