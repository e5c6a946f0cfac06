"""What a request constrains its output to, validated at request time (before the scheduler sees it).

A constraint is one of SGLang's sampling parameters `regex`, `json_schema` (a JSON string; dicts are accepted
and serialised) or `ebnf` (a GBNF grammar as SGLang takes it, or a Lark grammar). At most one per request.
Validation compiles the grammar without the tokenizer, so a broken regex or schema is a 400 naming the field,
never an error inside the scheduler.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from radixflow.errors import InvalidRequestError

CONSTRAINT_FIELDS = ("regex", "json_schema", "ebnf")
MAX_SPEC_CHARS = 100_000

# Separators fixed as Python's json.dumps writes them, no free whitespace: the output is canonical JSON, a small
# model cannot wander into endless whitespace, and the separators become forced text that jump-forward skips.
# A schema can override this with its own "x-guidance" options.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_object_schema() -> str:
    """OpenAI's `response_format: json_object`: any JSON object."""
    return json.dumps({"type": "object"})


@dataclass(frozen=True)
class Constraint:
    kind: str  # one of CONSTRAINT_FIELDS
    spec: str

    def grammar(self) -> str:
        """The llguidance grammar for this constraint (raises InvalidRequestError for a malformed spec)."""
        return _grammar(self.kind, self.spec)

    def validate(self) -> None:
        if len(self.spec) > MAX_SPEC_CHARS:
            raise InvalidRequestError(self.kind, f"at most {MAX_SPEC_CHARS} characters, got {len(self.spec)}")
        error = _validation_error(self.kind, self.spec)
        if error:
            raise InvalidRequestError(self.kind, error)


def constraint_of(regex: str | None, json_schema, ebnf: str | None) -> Constraint | None:
    given = {k: v for k, v in (("regex", regex), ("json_schema", json_schema), ("ebnf", ebnf)) if v is not None}
    if not given:
        return None
    if len(given) > 1:
        raise InvalidRequestError(sorted(given)[1], f"give at most one of {', '.join(CONSTRAINT_FIELDS)}")
    kind, spec = next(iter(given.items()))
    if kind == "json_schema" and isinstance(spec, (dict, bool)):
        spec = json.dumps(spec)
    if not isinstance(spec, str) or not spec:
        raise InvalidRequestError(kind, f"must be a non-empty string, got {spec!r}")
    return Constraint(kind, spec)


@lru_cache(maxsize=1024)
def _grammar(kind: str, spec: str) -> str:
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "json_schema":
        try:
            schema = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError("json_schema", f"is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequestError("json_schema", f"must be a JSON object, got {type(schema).__name__}")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
        except ValueError as exc:
            raise InvalidRequestError("json_schema", str(exc)) from None
    try:
        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(spec))
    except Exception as exc:  # noqa: BLE001 - the GBNF converter raises plain exceptions on bad syntax
        raise InvalidRequestError("ebnf", f"cannot parse the grammar: {exc}") from None


@lru_cache(maxsize=1024)
def _validation_error(kind: str, spec: str) -> str:
    error = llguidance.LLMatcher.validate_grammar(_grammar(kind, spec))
    # llguidance's messages repeat the whole grammar; keep the first lines, which say what and where.
    return "\n".join(error.strip().splitlines()[:4])
