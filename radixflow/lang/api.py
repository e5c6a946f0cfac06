"""The public frontend API, SGLang-compatible: `import radixflow as sgl` and the program runs unchanged."""

from __future__ import annotations

import inspect
import json
import os
import weakref
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from radixflow.lang.choices import ChoiceMethod
from radixflow.lang.graph import TracedProgram, TracingError
from radixflow.lang.interpreter import ProgramState, StreamExecutor
from radixflow.lang.ir import Gen, Image, RoleBegin, RoleEnd, Select, Text, as_node
from radixflow.lang.tracer import TracerState, trace_program

if TYPE_CHECKING:
    from radixflow.lang.compiler import CompiledFunction

_default_backend = None
_engine_backends: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one backend per in-process Engine

# dtype= of gen: the regex the value must match (as SGLang; the variable stays a string, so programs that
# concatenate it keep working). str is a double-quoted string without quotes or newlines inside, quotes kept.
_DTYPE_REGEX = {
    int: r"[-+]?[0-9]+",
    float: r"[-+]?[0-9]+(\.[0-9]+)?",
    bool: r"(True|False)",
    str: r'"[^"\n]*"',
}
_DTYPE_NAMES = {"int": int, "float": float, "bool": bool, "str": str}


def set_default_backend(backend) -> None:
    global _default_backend
    _default_backend = backend


def _backend(backend=None):
    """A frontend backend from what the user passed: a backend, a `Runtime`, or an in-process `Engine`."""
    from radixflow.backends.engine_backend import EngineBackend
    from radixflow.engine import Engine
    from radixflow.lang.runtime import Runtime

    chosen = backend or _default_backend
    if chosen is None:
        raise RuntimeError("no backend: call set_default_backend(...) or pass backend= to run()")
    if isinstance(chosen, Runtime):
        return chosen.endpoint
    if isinstance(chosen, Engine):
        if chosen not in _engine_backends:
            _engine_backends[chosen] = EngineBackend(chosen)
        return _engine_backends[chosen]
    return chosen


def flush_cache(backend=None) -> bool:
    return _backend(backend).flush_cache()


def get_server_info(backend=None) -> dict:
    return _backend(backend).get_server_info()


# -- primitives ----------------------------------------------------------------------------------------------------
def gen(name: str | None = None, max_tokens: int | None = None, min_tokens: int | None = None, n: int | None = None,
        stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
        temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
        min_p: float | None = None, frequency_penalty: float | None = None, presence_penalty: float | None = None,
        ignore_eos: bool | None = None, return_logprob: bool | None = None, logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None, return_text_in_logprobs: bool | None = None, dtype=None,
        choices: list[str] | None = None, choices_method: ChoiceMethod | None = None, regex: str | None = None,
        json_schema=None):
    if choices is not None:
        return Select(name, list(choices), temperature or 0.0, choices_method)
    if dtype is not None:
        if regex is not None or json_schema is not None:
            raise ValueError("gen: give at most one of dtype, regex and json_schema")
        kind = _DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if kind not in _DTYPE_REGEX:
            raise ValueError(f"gen: dtype must be one of int, float, bool, str; got {dtype!r}")
        regex = _DTYPE_REGEX[kind]
    if n not in (None, 1):
        raise NotImplementedError("gen(n>1) inside a program: use s.fork(n) instead")
    params = {"max_new_tokens": max_tokens, "min_new_tokens": min_tokens, "stop": stop, "stop_token_ids": stop_token_ids,
              "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
              "frequency_penalty": frequency_penalty, "presence_penalty": presence_penalty, "ignore_eos": ignore_eos,
              "regex": regex, "json_schema": _schema_text(json_schema)}
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


def gen_int(name: str | None = None, max_tokens: int | None = None, **kwargs):
    return gen(name, max_tokens, dtype=int, **kwargs)


def gen_string(name: str | None = None, max_tokens: int | None = None, **kwargs):
    return gen(name, max_tokens, dtype=str, **kwargs)


def select(name: str | None = None, choices: list[str] | None = None, temperature: float = 0.0,
           choices_method: ChoiceMethod | None = None) -> Select:
    if not choices:
        raise ValueError("select: choices must be a non-empty list of strings")
    return Select(name, list(choices), temperature, choices_method)


def image(path: str) -> Image:
    return Image(path)


def _role(role: str, expr=None):
    if expr is None:
        return RoleBegin(role)
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


# -- functions -----------------------------------------------------------------------------------------------------
_SAMPLING_KEYS = ("max_new_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "min_p",
                  "frequency_penalty", "presence_penalty", "ignore_eos")
_LOGPROB_KEYS = ("return_logprob", "logprob_start_len", "top_logprobs_num")
MIN_PREFETCH_CHARS = 64  # as SGLang: a shorter shared prefix is not worth a request of its own


class SglFunction:
    def __init__(self, func, num_api_spec_tokens: int | None = None, bind_arguments: dict | None = None):
        self.func = func
        self.num_api_spec_tokens = num_api_spec_tokens
        self.bind_arguments = bind_arguments or {}

    def bind(self, **kwargs) -> "SglFunction":
        return SglFunction(self.func, self.num_api_spec_tokens, {**self.bind_arguments, **kwargs})

    def __call__(self, *args, **kwargs):
        """Inside another program, `other_fn(s, ...)` appends to that program's state; called on its own,
        `fn(question=..., temperature=0)` is `fn.run(...)`, as in SGLang."""
        if args and isinstance(args[0], (ProgramState, TracerState)):
            return self.func(*args, **{**self.bind_arguments, **kwargs})
        return self.run(*args, **kwargs)

    def run(self, *args, max_new_tokens: int = 128, stop=None, stop_token_ids=None, temperature: float = 1.0,
            top_p: float = 1.0, top_k: int = -1, min_p: float = 0.0, frequency_penalty: float = 0.0,
            presence_penalty: float = 0.0, ignore_eos: bool = False, return_logprob: bool = False,
            logprob_start_len: int | None = None, top_logprobs_num: int | None = None, stream: bool = False,
            backend=None, **kwargs) -> ProgramState:
        local = dict(locals())
        defaults = _defaults(local)
        return self._run_one(args, {**self.bind_arguments, **kwargs}, defaults, stream, _backend(backend))

    def run_batch(self, batch_kwargs: list[dict], *, max_new_tokens: int = 128, stop=None, stop_token_ids=None,
                  temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, min_p: float = 0.0,
                  frequency_penalty: float = 0.0, presence_penalty: float = 0.0, ignore_eos: bool = False,
                  return_logprob: bool = False, logprob_start_len: int | None = None,
                  top_logprobs_num: int | None = None, backend=None, num_threads="auto",
                  progress_bar: bool = False) -> list[ProgramState]:
        defaults = _defaults(dict(locals()))
        chosen = _backend(backend)
        if not batch_kwargs:
            return []
        if not isinstance(batch_kwargs[0], dict):  # SGLang also takes each program's arguments as a tuple
            names = list(inspect.signature(self.func).parameters)[1:]
            batch_kwargs = [dict(zip(names, values)) for values in batch_kwargs]
        if num_threads == "auto":
            # Threads mostly wait on the runtime, so many are cheap; too few would feed the engine in waves
            # (32 threads for 64 programs doubled the decode steps on this 2-core machine).
            num_threads = min(len(batch_kwargs), max(96, 16 * (os.cpu_count() or 1)))
        if len(batch_kwargs) > 1:
            self._prefetch(chosen, batch_kwargs)
        run = lambda kw: self._run_one((), {**self.bind_arguments, **kw}, defaults, False, chosen)  # noqa: E731
        with ThreadPoolExecutor(num_threads) as pool:
            futures = [pool.submit(run, kw) for kw in batch_kwargs]
            if progress_bar:
                from tqdm import tqdm

                for _ in tqdm((f for f in futures), total=len(futures), desc="run_batch"):
                    _.result()
            return [f.result() for f in futures]

    def trace(self, **kwargs) -> TracedProgram:
        """Run the function on symbolic arguments (those not given here or bound) and return the graph of what it
        appends, without running anything. Raises TracingError where the program needs a value only a run has."""
        return trace_program(self.func, {**self.bind_arguments, **kwargs})

    def compile(self, *, hoist_constants: bool = False, **kwargs) -> CompiledFunction:
        """Trace (arguments given here are fixed) and optimise into a CompiledFunction, whose run / run_batch give
        the same results as this function's; see radixflow/lang/compiler.py for the passes."""
        # Imported here: the compiler builds on this module.
        from radixflow.lang.compiler import compile_function

        return compile_function(self, kwargs, hoist_constants)

    def _prefetch(self, backend, batch_kwargs: list[dict]) -> None:
        """Before a batch: compute the program's argument-independent prefix once, so every program finds it in the
        radix cache instead of all of them computing it at the same time."""
        try:
            prefix = self._batch_prefix(backend.get_chat_template(), batch_kwargs)
            if len(prefix) >= MIN_PREFETCH_CHARS:
                backend.cache_prefix(prefix)
        except Exception:  # noqa: BLE001 - only an optimisation: the programs run (and report errors) without it
            return

    def _batch_prefix(self, template, batch_kwargs: list[dict]) -> str:
        """Traced up to where tracing stops: the nodes before that point are what every program appends first."""
        shared = _shared_arguments(self.func, [{**self.bind_arguments, **kw} for kw in batch_kwargs])
        return trace_program(self.func, shared, partial=True).constant_prefix(template)

    def _run_one(self, args, kwargs, defaults: dict, stream: bool, backend) -> ProgramState:
        executor = StreamExecutor(backend, defaults, stream)
        state = ProgramState(executor)
        if stream:
            threading.Thread(target=self._execute, args=(state, executor, args, kwargs), daemon=True).start()
        else:
            self._execute(state, executor, args, kwargs)
        return state

    def _execute(self, state: ProgramState, executor: StreamExecutor, args, kwargs) -> None:
        executor.owner = threading.current_thread()
        try:
            state.ret_value = self.func(state, *args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - one failing program must not take a batch down
            executor.sync()
            executor.error = executor.error or exc
        finally:
            executor.end()


def _defaults(local: dict) -> dict:
    sampling = {k: local[k] for k in _SAMPLING_KEYS if local.get(k) is not None}
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]
    logprob = {k: local[k] for k in _LOGPROB_KEYS if local.get(k) not in (None, False)}
    return {"sampling": sampling, "logprob": logprob}


def _shared_arguments(func, batch: list[dict]) -> dict:
    """The arguments every program of the batch has with the same value (or leaves at the same default): tracing
    with them concrete makes more of the prefix constant."""
    shared = {}
    for parameter in list(inspect.signature(func).parameters.values())[1:]:
        first, *rest = [kw.get(parameter.name, parameter.default) for kw in batch]
        if first is not inspect.Parameter.empty and all(_same(first, value) for value in rest):
            shared[parameter.name] = first
    return shared


def _same(a, b) -> bool:
    try:
        return a is b or (type(a) is type(b) and bool(a == b))
    except Exception:  # noqa: BLE001 - values without a plain == (arrays, ...) are not shared
        return False


def function(func=None, *, num_api_spec_tokens: int | None = None):
    """`@function` / `@function(num_api_spec_tokens=...)`: the first argument of `func` is the state `s`."""
    if func is None:
        return lambda f: SglFunction(f, num_api_spec_tokens)
    return SglFunction(func, num_api_spec_tokens)


__all__ = ["function", "gen", "gen_int", "gen_string", "select", "image", "system", "user", "assistant",
           "system_begin", "system_end", "user_begin", "user_end", "assistant_begin", "assistant_end",
           "set_default_backend", "flush_cache", "get_server_info", "Text", "TracingError"]
