"""PromptEncoder: a prompt (text or token ids) to checked token ids, and the cheap bound
on a text's length; needs the tokenizer and the model's limits, not the model.

The front end of a server whose engine runs in another process tokenizes with it;
RequestFactory (requests.py) extends it with the checks that need the engine.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from functools import cached_property
from typing import Any

from strata.errors import ContextLengthError, InvalidRequestError


class PromptEncoder:
    def __init__(
        self, tokenizer: Any | None, model_name: str, vocab_size: int, max_model_len: int
    ) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    @cached_property
    def max_prompt_chars(self) -> int:
        """No text longer than this fits the context, whatever it tokenizes to: each token
        stands for at most `longest token` characters (a byte-level token's string has a
        character per byte, and a text's character is at least one byte)."""
        vocab = self.tokenizer.get_vocab() if self.tokenizer is not None else {}
        longest = max((len(token) for token in vocab), default=1)
        return self.max_model_len * max(longest, 1)

    def check_text_length(self, num_chars: int, param: str = "prompt") -> None:
        """The cheap bound before tokenizing: ContextLengthError if a text of num_chars
        characters cannot fit the context."""
        if num_chars > self.max_prompt_chars:
            raise ContextLengthError(
                f"the {param} has {num_chars} characters; no text over {self.max_prompt_chars} "
                f"characters fits the context of {self.max_model_len} tokens (max_model_len)",
                param,
            )  # fmt: skip

    def encode_prompt(self, prompt: str | Seq[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError(
                    f"model {self.model_name} has no tokenizer: pass prompts as token ids",
                    "prompt",
                )
            self.check_text_length(len(prompt))
            ids = list(self.tokenizer(prompt).input_ids)
            if ids and max(ids) >= self.vocab_size:  # a tokenizer larger than the model
                raise InvalidRequestError(
                    f"the prompt tokenizes to id {max(ids)}, outside model {self.model_name}'s "
                    f"vocabulary of {self.vocab_size} ids: its tokenizer does not match it",
                    "prompt",
                )
            return prompt, ids
        ids = list(prompt)
        bad = self._bad_token_ids(ids)
        if bad:
            raise InvalidRequestError(
                f"prompt token ids must be integers in [0, {self.vocab_size}); got {bad[:5]}",
                "prompt",
            )
        return None, ids

    def _bad_token_ids(self, ids: Seq[object]) -> list[object]:
        """The entries of ids that are not token ids of this vocabulary (bools included)."""
        vocab = self.vocab_size
        return [
            t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab
        ]
