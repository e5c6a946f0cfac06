"""Per-request sampling parameters, validated once at submission.

Field names follow SGLang's `sampling_params` so native requests carry over unchanged. Validation errors name
the field and the allowed range; they are raised before the request reaches the scheduler, so a bad request
never disturbs the others.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from radixflow.errors import InvalidRequestError
from radixflow.runtime.constrained.spec import constraint_of


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (SGLang's spelling) or 0 mean "no top-k"; normalised to None in __post_init__
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    # Regexes: the request stops once its output text matches one (the match is kept, as SGLang keeps it).
    stop_regex: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    seed: int | None = None
    n: int = 1
    # Constrained decoding (at most one): a regex, a JSON schema (JSON string or dict), or a GBNF / Lark grammar.
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop or [], (list, tuple)):
            raise InvalidRequestError("stop", f"must be a string or a list of strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids or [], (list, tuple)):
            raise InvalidRequestError("stop_token_ids", f"must be a list of integers, got {self.stop_token_ids!r}")
        if isinstance(self.stop_regex, str):
            self.stop_regex = [self.stop_regex]
        if not isinstance(self.stop_regex or [], (list, tuple)):
            raise InvalidRequestError("stop_regex", f"must be a regex or a list of regexes, got {self.stop_regex!r}")
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.stop_regex = list(self.stop_regex or [])
        self.validate()
        self.constraint = constraint_of(self.regex, self.json_schema, self.ebnf)
        if self.constraint is not None:
            self.json_schema = self.constraint.spec if self.constraint.kind == "json_schema" else None
            self.constraint.validate()

    @classmethod
    def from_dict(cls, params: dict | None) -> "SamplingParams":
        """Build from a JSON-like dict, rejecting unknown keys (a typo must not be silently ignored)."""
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise InvalidRequestError(unknown[0], f"unknown sampling parameter (known: {', '.join(sorted(known))})")
        return cls(**params)

    @property
    def greedy(self) -> bool:
        # A temperature this small is greedy in effect, and dividing logits by it overflows (SGLang's epsilon).
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def top_k_or_none(self) -> int | None:
        return self.top_k if self.top_k > 0 else None

    @property
    def has_penalties(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0

    def validate(self) -> None:
        _check_int(self, "max_new_tokens", 0)
        _check_int(self, "min_new_tokens", 0)
        _check_int(self, "top_k", -1)
        _check_int(self, "n", 1, 128)
        _check_float(self, "temperature", 0.0, 100.0)
        _check_float(self, "min_p", 0.0, 1.0)
        _check_float(self, "frequency_penalty", -2.0, 2.0)
        _check_float(self, "presence_penalty", -2.0, 2.0)
        _check_float(self, "repetition_penalty", 0.0, 10.0, low_inclusive=False)
        _check_float(self, "top_p", 0.0, 1.0, low_inclusive=False)
        if self.min_new_tokens > self.max_new_tokens:
            raise InvalidRequestError("min_new_tokens",
                                      f"{self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError("stop", "must be a non-empty string or a list of non-empty strings")
        if len(self.stop) > 16:
            raise InvalidRequestError("stop", f"at most 16 stop strings, got {len(self.stop)}")
        if len(self.stop_regex) > 16:
            raise InvalidRequestError("stop_regex", f"at most 16 regexes, got {len(self.stop_regex)}")
        for pattern in self.stop_regex:
            if not isinstance(pattern, str) or not pattern:
                raise InvalidRequestError("stop_regex", "must be a non-empty regex or a list of them")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InvalidRequestError("stop_regex", f"{pattern!r} is not a valid regex: {exc}") from None
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids", "must be a list of non-negative integers")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise InvalidRequestError("seed", f"must be an integer, got {self.seed!r}")


GREEDY_TEMPERATURE = 1e-6


def _check_int(params, name: str, low: int, high: int | None = None) -> None:
    value = getattr(params, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(name, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidRequestError(name, f"must be {bound}, got {value}")


def _check_float(params, name: str, low: float, high: float, low_inclusive: bool = True) -> None:
    value = getattr(params, name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidRequestError(name, f"must be a number, got {value!r}")
    value = float(value)
    setattr(params, name, value)
    too_low = value < low if low_inclusive else value <= low
    if too_low or value > high or value != value:
        bracket = "[" if low_inclusive else "("
        raise InvalidRequestError(name, f"must be in {bracket}{low}, {high}], got {value}")
