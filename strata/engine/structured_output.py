"""StructuredOutput: the grammar a request's output must follow.

    kind          spec                                   output
    json          a JSON schema (JSON text, keys in order) JSON valid against the schema
    json_object   ""                                     any JSON object
    regex         a regular expression                   a full match of it
    choice        a JSON list of strings                 exactly one of them
    grammar       EBNF (GBNF: root ::= ...)              a sentence of the grammar

`strict` (json only): properties the schema does not name are not generated unless it
allows them, as OpenAI's strict mode. The (kind, spec, strict) triple is the cache key
of the compiled grammar (grammar_compiler.py), so equal schemas compile once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from strata.errors import InvalidRequestError

Kind = Literal["json", "json_object", "regex", "choice", "grammar"]
KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    kind: Kind
    spec: str = ""
    strict: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(
                f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}",
                "structured_output",
            )
        if self.kind != "json_object" and (not isinstance(self.spec, str) or not self.spec):
            raise InvalidRequestError(
                f"a {self.kind} structured output needs a non-empty spec", "structured_output"
            )

    @staticmethod
    def json_schema(schema: dict[str, Any] | str, strict: bool = True) -> StructuredOutput:
        """From a schema as a dict or JSON text; raises InvalidRequestError if not JSON."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                message = f"the JSON schema is not JSON: {exc}"
                raise InvalidRequestError(message, "response_format") from exc
        if not isinstance(schema, dict):
            raise InvalidRequestError(
                f"a JSON schema must be an object, got {type(schema).__name__}", "response_format"
            )
        return StructuredOutput("json", json.dumps(schema), strict)  # key order is output order

    @staticmethod
    def json_object() -> StructuredOutput:
        return StructuredOutput("json_object")

    @staticmethod
    def regex(pattern: str) -> StructuredOutput:
        return StructuredOutput("regex", pattern)

    @staticmethod
    def choice(options: Sequence[str]) -> StructuredOutput:
        if isinstance(options, str) or not options:
            message = "guided_choice must be a non-empty list of strings"
            raise InvalidRequestError(message, "guided_choice")
        if any(not isinstance(o, str) or not o for o in options):
            raise InvalidRequestError(
                f"guided_choice must be a list of non-empty strings, got {list(options)!r}",
                "guided_choice",
            )
        return StructuredOutput("choice", json.dumps(list(options)))

    @staticmethod
    def grammar(ebnf: str) -> StructuredOutput:
        return StructuredOutput("grammar", ebnf)

    @property
    def choices(self) -> list[str]:
        return list(json.loads(self.spec)) if self.kind == "choice" else []
