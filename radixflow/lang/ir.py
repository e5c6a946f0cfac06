"""The frontend's IR: small node classes a program appends to its state (`s += node`).

`"text" + gen("x")` builds a `Concat`, so expressions compose the way SGLang programs write them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# SGLang's regexes for typed values, for programs that import them from here (`gen(regex=REGEX_INT)`). `gen(dtype=)`
# uses tighter ones (api.py: no trailing whitespace), so a small model cannot pad a number with spaces.
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""  # SGLang's: a double-quoted run of word characters and spaces


class Node:
    def __add__(self, other) -> "Concat":
        return Concat([self, as_node(other)])

    def __radd__(self, other) -> "Concat":
        return Concat([as_node(other), self])


def as_node(value) -> Node:
    if isinstance(value, Node):
        return value
    if isinstance(value, str):
        return Text(value)
    raise TypeError(f"cannot append {type(value).__name__} to a program state (use str or a primitive)")


@dataclass
class Text(Node):
    value: str


@dataclass
class Concat(Node):
    parts: list[Node]

    def __add__(self, other) -> "Concat":
        return Concat([*self.parts, as_node(other)])

    def __radd__(self, other) -> "Concat":
        return Concat([as_node(other), *self.parts])


@dataclass
class Gen(Node):
    name: str | None
    params: dict[str, Any] = field(default_factory=dict)  # sampling params in SGLang's names
    return_logprob: bool = False
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool = False


@dataclass
class Select(Node):
    name: str | None
    choices: list[str]
    temperature: float = 0.0
    choices_method: Any = None  # a ChoiceMethod; None means token_length_normalized


@dataclass
class RoleBegin(Node):
    role: str


@dataclass
class RoleEnd(Node):
    role: str


@dataclass
class VarScopeBegin(Node):
    name: str


@dataclass
class VarScopeEnd(Node):
    name: str


@dataclass
class Image(Node):
    path: str


@dataclass
class Video(Node):
    path: str
    num_frames: int


@dataclass
class SeparateReasoning(Node):
    """Split the `<think>...</think>` block out of variable `name` into `{name}_reasoning_content`."""

    name: str
    model_type: str | None = None

    @property
    def reasoning_name(self) -> str:
        return f"{self.name}_reasoning_content"
