"""Token ids of a sample's prompt, in the three parts the two protocols compress.

    | template head + context | question | template tail + answer prefix |
    |<------ context_ids ---->|<- qids ->|<-------- suffix_ids --------->|
    query-agnostic compresses context_ids (the question is not known yet);
    query-aware compresses the whole prompt (what a serving engine sees);
    question-cut compresses context_ids + question_ids, and the template tail comes after
    (kvpress's query-aware cut: it attributes differences to where the cut falls).

The chat template is rendered once around a separator and split there, the way kvpress's
pipeline does it, so the context, question and tail are tokenized separately and both
protocols (and kvpress) see exactly the same token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from strata.eval.sample import Sample

_SEPARATOR = "\x00STRATA-SPLIT\x00"


@dataclass(frozen=True)
class PromptIds:
    context: list[int]
    question: list[int]
    suffix: list[int]

    @property
    def all(self) -> list[int]:
        return self.context + self.question + self.suffix

    def __len__(self) -> int:
        return len(self.context) + len(self.question) + len(self.suffix)

    def compressible(self, protocol: str) -> int:
        """How many leading tokens the protocol compresses."""
        if protocol == "query-agnostic":
            return len(self.context)
        if protocol == "question-cut":
            return len(self.context) + len(self.question)
        if protocol == "query-aware":
            return len(self)
        raise ValueError(
            f"protocol must be query-aware, query-agnostic or question-cut, got {protocol!r}"
        )


def template_parts(tokenizer: Any) -> tuple[str, str]:
    """(head, tail) the chat template puts around a single user message, tail ending
    with the assistant's generation prompt; ("", "\\n") without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return (getattr(tokenizer, "bos_token", None) or ""), "\n"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SEPARATOR}], add_generation_prompt=True, tokenize=False
    )
    head, tail = text.split(_SEPARATOR)
    return head, tail


def prompt_ids(tokenizer: Any, sample: Sample, parts: tuple[str, str] | None = None) -> PromptIds:
    head, tail = parts if parts is not None else template_parts(tokenizer)

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    return PromptIds(
        context=encode(head + sample.context),
        question=encode(sample.question),
        suffix=encode(tail + sample.answer_prefix),
    )
