"""The request fields that ask for structured output, and the StructuredOutput they make.

    response_format  {"type": "json_object"}                       any JSON object
                     {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    guided_json      a schema (object or JSON text)                vLLM's extensions,
    guided_regex     a regular expression                          on both routes
    guided_choice    a list of strings
    guided_grammar   an EBNF grammar

At most one of them may be set.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from strata.engine.structured_output import StructuredOutput
from strata.errors import InvalidRequestError


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JSONSchemaFormat | None = None


class GuidedFields(BaseModel):
    """vLLM's guided-decoding fields."""

    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def guided_output(
        self, response_format: ResponseFormat | None = None
    ) -> tuple[str | None, StructuredOutput | None]:
        """The one field that asks for structured output and its spec ((None, None) if
        none does); InvalidRequestError (naming the field) if several are set or one is
        malformed."""
        found: list[tuple[str, StructuredOutput]] = []
        if response_format is not None and response_format.type != "text":
            found.append(("response_format", _from_response_format(response_format)))
        for name, make in _MAKERS.items():
            value = getattr(self, name)
            if value is not None:
                found.append((name, _param(make, value, name)))
        if len(found) > 1:
            names = ", ".join(name for name, _ in found)
            raise InvalidRequestError(f"set at most one of {names}", found[1][0])
        return found[0] if found else (None, None)


_MAKERS: dict[str, Any] = {
    "guided_json": StructuredOutput.json_schema,
    "guided_regex": StructuredOutput.regex,
    "guided_choice": StructuredOutput.choice,
    "guided_grammar": StructuredOutput.grammar,
}


def _param(make: Any, value: Any, param: str) -> StructuredOutput:
    try:
        return make(value)
    except InvalidRequestError as exc:
        raise InvalidRequestError(str(exc), param) from exc


def _from_response_format(fmt: ResponseFormat) -> StructuredOutput:
    if fmt.type == "json_object":
        return StructuredOutput.json_object()
    if fmt.json_schema is None:
        raise InvalidRequestError(
            "response_format of type json_schema needs a json_schema object", "response_format"
        )
    if not fmt.json_schema.schema_:
        raise InvalidRequestError("response_format.json_schema needs a schema", "response_format")
    return StructuredOutput.json_schema(
        fmt.json_schema.schema_, fmt.json_schema.strict is not False
    )
