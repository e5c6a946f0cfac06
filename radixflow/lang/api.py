"""The public frontend API, SGLang-compatible: `import radixflow as sgl` and the program runs unchanged."""

from __future__ import annotations

import json

from radixflow.lang.choices import ChoicesSamplingMethod
from radixflow.lang.function import SglFunction, function, resolve_backend, set_default_backend
from radixflow.lang.graph import TracingError
from radixflow.lang.ir import (
    Concat,
    Gen,
    Image,
    Node,
    RoleBegin,
    RoleEnd,
    Select,
    SeparateReasoning,
    Text,
    Video,
    as_node,
)
from radixflow.parsers.reasoning import check_model_type

# dtype= of gen: the regex the value must match (as SGLang; the variable stays a string, so programs that
# concatenate it keep working). str is a double-quoted string with no quote, backslash or control character inside
# (so it is also a valid JSON string), quotes kept.
_DTYPE_REGEX = {
    int: r"[-+]?[0-9]+",
    float: r"[-+]?[0-9]+(\.[0-9]+)?",
    bool: r"(True|False)",
    str: r'"[^"\\\x00-\x1f]*"',
}
_DTYPE_NAMES = {"int": int, "float": float, "bool": bool, "str": str}


def flush_cache(backend=None) -> bool:
    return resolve_backend(backend).flush_cache()


def get_server_info(backend=None) -> dict:
    return resolve_backend(backend).get_server_info()


# -- primitives ----------------------------------------------------------------------------------------------------
def gen(name: str | None = None, max_tokens: int | None = None, min_tokens: int | None = None, n: int | None = None,
        stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
        stop_regex: str | list[str] | None = None, temperature: float | None = None, top_p: float | None = None,
        top_k: int | None = None, min_p: float | None = None, frequency_penalty: float | None = None,
        presence_penalty: float | None = None, ignore_eos: bool | None = None, return_logprob: bool | None = None,
        logprob_start_len: int | None = None, top_logprobs_num: int | None = None,
        return_text_in_logprobs: bool | None = None, dtype=None, choices: list[str] | None = None,
        choices_method: ChoicesSamplingMethod | None = None, regex: str | None = None, json_schema=None):
    """Generate into variable `name` (SGLang's arguments). `n > 1` makes the variable the list of n samples (the
    text continues with the first); `choices=` is `select`; `dtype` (int, float, bool, str) constrains the value
    to that type's text, and wins over `regex` as in SGLang."""
    if choices:
        return Select(name, list(choices), temperature or 0.0, choices_method)
    if dtype is not None:
        kind = _DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if kind not in _DTYPE_REGEX:
            raise ValueError(f"gen: dtype must be one of int, float, bool, str; got {dtype!r}")
        if json_schema is not None:
            raise ValueError("gen: give at most one of dtype and json_schema")
        regex = _DTYPE_REGEX[kind]
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"gen: n must be a positive integer, got {n!r}")
    params = {"max_new_tokens": max_tokens, "min_new_tokens": min_tokens, "n": n, "stop": stop,
              "stop_token_ids": stop_token_ids, "stop_regex": stop_regex, "temperature": temperature,
              "top_p": top_p, "top_k": top_k, "min_p": min_p, "frequency_penalty": frequency_penalty,
              "presence_penalty": presence_penalty, "ignore_eos": ignore_eos, "regex": regex,
              "json_schema": _schema_text(json_schema)}
    return Gen(name, params, bool(return_logprob), logprob_start_len, top_logprobs_num, bool(return_text_in_logprobs))


def _schema_text(schema) -> str | None:
    """A JSON schema as the runtime takes it, from a JSON string, a dict, or a pydantic model class."""
    if schema is None or isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        return json.dumps(schema)
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return json.dumps(schema.model_json_schema())
    raise TypeError(f"gen: json_schema must be a JSON string, a dict or a pydantic model class, not {schema!r}")


def gen_int(name: str | None = None, max_tokens: int | None = None, n: int | None = None,
            stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
            stop_regex: str | list[str] | None = None, temperature: float | None = None, top_p: float | None = None,
            top_k: int | None = None, min_p: float | None = None, frequency_penalty: float | None = None,
            presence_penalty: float | None = None, ignore_eos: bool | None = None,
            return_logprob: bool | None = None, logprob_start_len: int | None = None,
            top_logprobs_num: int | None = None, return_text_in_logprobs: bool | None = None,
            min_tokens: int | None = None):
    """`gen(..., dtype=int)` with SGLang's parameters."""
    return gen(name, max_tokens, min_tokens, n, stop, stop_token_ids, stop_regex, temperature, top_p, top_k, min_p,
               frequency_penalty, presence_penalty, ignore_eos, return_logprob, logprob_start_len, top_logprobs_num,
               return_text_in_logprobs, dtype=int)


def gen_string(name: str | None = None, max_tokens: int | None = None, n: int | None = None,
               stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
               stop_regex: str | list[str] | None = None, temperature: float | None = None,
               top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
               frequency_penalty: float | None = None, presence_penalty: float | None = None,
               ignore_eos: bool | None = None, return_logprob: bool | None = None,
               logprob_start_len: int | None = None, top_logprobs_num: int | None = None,
               return_text_in_logprobs: bool | None = None, min_tokens: int | None = None):
    """`gen(..., dtype=str)` (a double-quoted string, quotes kept) with SGLang's parameters."""
    return gen(name, max_tokens, min_tokens, n, stop, stop_token_ids, stop_regex, temperature, top_p, top_k, min_p,
               frequency_penalty, presence_penalty, ignore_eos, return_logprob, logprob_start_len, top_logprobs_num,
               return_text_in_logprobs, dtype=str)


def select(name: str | None = None, choices: list[str] | None = None, temperature: float = 0.0,
           choices_method: ChoicesSamplingMethod | None = None) -> Select:
    if not choices:
        raise ValueError("select: choices must be a non-empty list of strings")
    return Select(name, list(choices), temperature, choices_method)


def image(path: str) -> Image:
    return Image(path)


def video(path: str, num_frames: int) -> Video:
    return Video(path, num_frames)


def separate_reasoning(expr=None, model_type: str | None = None) -> Node:
    """`s += sgl.separate_reasoning(sgl.gen("answer"), model_type="deepseek-r1")`: after generating, the
    `<think>...</think>` block moves from `answer` to `answer_reasoning_content` (SGLang's name)."""
    if expr is None:
        raise ValueError("separate_reasoning: give the gen (or select) whose output holds the reasoning")
    node = as_node(expr)
    names = [n.name for n in (node.parts if isinstance(node, Concat) else [node])
             if isinstance(n, (Gen, Select)) and n.name]
    if not names:
        raise ValueError("separate_reasoning: the expression has no named gen or select to split")
    check_model_type(model_type)  # refuses an unknown model type here, at the call
    return Concat([node, *(SeparateReasoning(name, model_type) for name in names)])


def _role(role: str, expr=None) -> Concat:
    if expr is None:  # as SGLang: an empty block of that role
        return Concat([RoleBegin(role), RoleEnd(role)])
    return RoleBegin(role) + as_node(expr) + RoleEnd(role)


def system(expr=None):
    return _role("system", expr)


def user(expr=None):
    return _role("user", expr)


def assistant(expr=None):
    return _role("assistant", expr)


def system_begin():
    return RoleBegin("system")


def system_end():
    return RoleEnd("system")


def user_begin():
    return RoleBegin("user")


def user_end():
    return RoleEnd("user")


def assistant_begin():
    return RoleBegin("assistant")


def assistant_end():
    return RoleEnd("assistant")


__all__ = ["SglFunction", "function", "gen", "gen_int", "gen_string", "select", "image", "video",
           "separate_reasoning", "system", "user", "assistant",
           "system_begin", "system_end", "user_begin", "user_end", "assistant_begin", "assistant_end",
           "set_default_backend", "flush_cache", "get_server_info", "Text", "TracingError"]
