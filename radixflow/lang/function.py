"""Program functions: `@function` makes an `SglFunction`, whose `run` / `run_batch` execute the program on a
backend (interpreter.py), and whose `trace` / `compile` turn it into a graph (tracer.py, compiler.py)."""

from __future__ import annotations

import inspect
import os
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from radixflow.lang.compiler import GraphProgram, hoist_constant_text
from radixflow.lang.global_config import global_config
from radixflow.lang.graph import TracedProgram
from radixflow.lang.interpreter import StreamExecutor
from radixflow.lang.program_state import ProgramState
from radixflow.lang.tracer import TracerState, trace_program

_SAMPLING_KEYS = ("max_new_tokens", "n", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
                  "min_p", "frequency_penalty", "presence_penalty", "ignore_eos")
_LOGPROB_KEYS = ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")
# `run`'s own keywords and their defaults (SGLang's).
RUN_OPTIONS = {"max_new_tokens": 128, "n": 1, "stop": None, "stop_token_ids": None, "stop_regex": None,
               "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "frequency_penalty": 0.0,
               "presence_penalty": 0.0, "ignore_eos": False, "return_logprob": False, "logprob_start_len": None,
               "top_logprobs_num": None, "return_text_in_logprobs": None, "stream": False, "backend": None,
               "use_thread": True}
_BATCH_CHUNK = 200  # generator_style submits this many programs at a time, so results come back as they finish
MIN_PREFETCH_CHARS = 64  # as SGLang: a shorter shared prefix is not worth a request of its own


class SglFunction:
    def __init__(self, func, num_api_spec_tokens: int | None = None, bind_arguments: dict | None = None):
        self.func = func
        self.num_api_spec_tokens = num_api_spec_tokens
        self.bind_arguments = bind_arguments or {}

    def bind(self, **kwargs) -> SglFunction:
        """Fix some arguments. As in SGLang, a bound argument wins over the same argument given to `run`."""
        return SglFunction(self.func, self.num_api_spec_tokens, {**self.bind_arguments, **kwargs})

    def __call__(self, *args, **kwargs):
        """Inside another program, `other_fn(s, ...)` appends to that program's state; called on its own,
        `fn(question=..., temperature=0)` is `fn.run(...)`, as in SGLang."""
        if args and isinstance(args[0], (ProgramState, TracerState)):
            return self.func(*args, **{**kwargs, **self.bind_arguments})
        return self.run(*args, **kwargs)

    def run(self, *args, **kwargs) -> ProgramState:
        """Run the program once. SGLang's options (`RUN_OPTIONS`: the sampling defaults for its `gen`s, `stream`,
        `backend`, `use_thread`) are taken here; every other keyword is a program argument, and so is an option
        name the program function has a parameter of (`def skeleton(s, topic, n)` gets its `n`; SGLang would
        take it as the sampling `n`). An exception the program raises propagates here (with stream=True it is
        kept in `state.error()` and raised when `text_iter()` reaches the end)."""
        parameters = set(inspect.signature(self.func).parameters)
        options = {**RUN_OPTIONS, **{k: kwargs.pop(k) for k in list(kwargs) if k in RUN_OPTIONS
                                     and k not in parameters}}
        stream, use_thread = options["stream"], options["use_thread"]
        executor = StreamExecutor(resolve_backend(options["backend"]), _defaults(options), stream, use_thread,
                                  self.num_api_spec_tokens)
        state = ProgramState(executor)
        arguments = {**kwargs, **self.bind_arguments}
        if stream:
            threading.Thread(target=self._execute, args=(state, executor, args, arguments, False),
                             daemon=True).start()
        else:
            self._execute(state, executor, args, arguments, True)
        return state

    def run_batch(self, batch_kwargs: list[dict], *, max_new_tokens: int = 128, n: int = 1, stop=None,
                  stop_token_ids=None, stop_regex=None, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = -1, min_p: float = 0.0, frequency_penalty: float = 0.0,
                  presence_penalty: float = 0.0, ignore_eos: bool = False, return_logprob: bool = False,
                  logprob_start_len: int | None = None, top_logprobs_num: int | None = None,
                  return_text_in_logprobs: bool | None = None, backend=None, num_threads="auto",
                  progress_bar: bool = False, generator_style: bool = False):
        """Run the program once per argument set, concurrently. Returns the states in order, or with
        `generator_style=True` yields them in order as they finish. As in SGLang, an exception a program raises
        propagates (when its state is collected); a failed primitive is kept in that state's `error()`."""
        defaults = _defaults(dict(locals()))
        chosen = resolve_backend(backend)
        if not batch_kwargs:
            return iter(()) if generator_style else []
        batch_kwargs = self._as_keywords(batch_kwargs)
        if num_threads == "auto":
            # Threads mostly wait on the runtime, so many are cheap; too few would feed the engine in waves (fewer
            # requests per step, more steps: bench/RESULTS.md).
            num_threads = max(96, 16 * (os.cpu_count() or 1))
        num_threads = min(num_threads, len(batch_kwargs))
        if len(batch_kwargs) > 1 and global_config.enable_precache_with_tracing:
            self._prefetch(chosen, batch_kwargs)
        states = self._states(batch_kwargs, defaults, chosen, num_threads, progress_bar)
        return states if generator_style else list(states)

    def _states(self, batch_kwargs: list[dict], defaults: dict, backend, num_threads: int,
                progress_bar: bool) -> Iterator[ProgramState]:
        def run_one(kw: dict) -> ProgramState:
            executor = StreamExecutor(backend, defaults, num_api_spec_tokens=self.num_api_spec_tokens)
            state = ProgramState(executor)
            self._execute(state, executor, (), {**kw, **self.bind_arguments}, True)
            return state

        bar = tqdm(total=len(batch_kwargs), desc="run_batch") if progress_bar else None
        with ThreadPoolExecutor(num_threads) as pool:
            for start in range(0, len(batch_kwargs), _BATCH_CHUNK):
                futures = [pool.submit(run_one, kw) for kw in batch_kwargs[start:start + _BATCH_CHUNK]]
                for future in futures:
                    state = future.result()
                    if bar is not None:
                        bar.update()
                    yield state
        if bar is not None:
            bar.close()

    def _as_keywords(self, batch_kwargs: list) -> list[dict]:
        """SGLang also takes each program's arguments as a tuple, in the order of the function's parameters."""
        if isinstance(batch_kwargs[0], dict):
            return list(batch_kwargs)
        parameters = list(inspect.signature(self.func).parameters.values())[1:]
        required = sum(p.default is inspect.Parameter.empty for p in parameters)
        for values in batch_kwargs:
            if not isinstance(values, (list, tuple)) or not required <= len(values) <= len(parameters):
                raise TypeError(f"run_batch: {values!r} does not match the arguments of {self.func.__name__}"
                                f"({', '.join(p.name for p in parameters)})")
        return [dict(zip((p.name for p in parameters), values)) for values in batch_kwargs]

    def trace(self, *, backend=None, **kwargs) -> TracedProgram:
        """Run the function on symbolic arguments (those not given here or bound) and return the graph of what it
        appends, without running anything. Raises TracingError where the program needs a value only a run has.
        `backend` is accepted for SGLang's signature; tracing needs none."""
        del backend
        return trace_program(self.func, {**kwargs, **self.bind_arguments})

    def compile(self, *, backend=None, hoist_constants: bool = False, **kwargs) -> CompiledFunction:
        """Trace (arguments given here are fixed) and optimise into a CompiledFunction, whose run / run_batch give
        the same results as this function's; see radixflow/lang/compiler.py for the passes. `backend` is accepted
        for SGLang's signature; the compiled function runs on the one `run` is given."""
        del backend
        graph = self.trace(**kwargs)
        if hoist_constants:
            graph = hoist_constant_text(graph)
        return CompiledFunction(graph, self.num_api_spec_tokens)

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

    def _execute(self, state: ProgramState, executor: StreamExecutor, args, kwargs, raise_errors: bool) -> None:
        """Run the program function; what it raises propagates when `raise_errors` (SGLang's run_internal), else
        it is kept in `state.program_error`. A failed primitive is warned about, as SGLang does."""
        executor.owner = threading.current_thread()
        try:
            state.ret_value = self.func(state, *args, **kwargs)
        except BaseException as exc:
            state.program_error = exc
            if raise_errors:
                raise
        finally:
            executor.end()
            if executor.error is not None:
                warnings.warn(f"{self.func.__name__}: a primitive failed and the program stopped there: "
                              f"{executor.error!r}", RuntimeWarning, stacklevel=3)
            if global_config.verbosity >= 2:
                print(executor.text)


def _defaults(local: dict) -> dict:
    sampling = {k: local[k] for k in _SAMPLING_KEYS if local.get(k) is not None}
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]
    if not global_config.skip_special_tokens_in_output:
        sampling["skip_special_tokens"] = False
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


class CompiledFunction(SglFunction):
    """A traced and optimised program: `run` / `run_batch` take the same arguments and give the same ProgramStates
    as the interpreted function's (see the module docstring for what differs)."""

    def __init__(self, graph: TracedProgram, num_api_spec_tokens: int | None = None,
                 bind_arguments: dict | None = None):
        super().__init__(GraphProgram(graph), num_api_spec_tokens, bind_arguments)
        self.graph = graph

    def bind(self, **kwargs) -> CompiledFunction:
        return CompiledFunction(self.graph, self.num_api_spec_tokens, {**self.bind_arguments, **kwargs})

    def _batch_prefix(self, template, batch_kwargs: list[dict]) -> str:
        return self.graph.constant_prefix(template)  # from the compiled graph: nothing is traced per batch

    def __repr__(self) -> str:
        return f"CompiledFunction({self.graph.name}, {len(self.graph)} nodes)"


def set_default_backend(backend) -> None:
    global_config.default_backend = backend


def resolve_backend(backend=None):
    """The frontend backend to run on: the one given, else the default. An `Engine` or a `Runtime` stands for
    its `endpoint` (as in SGLang)."""
    chosen = backend or global_config.default_backend
    if chosen is None:
        raise RuntimeError("no backend: call set_default_backend(...) or pass backend= to run()")
    return getattr(chosen, "endpoint", chosen)


def function(func=None, *, num_api_spec_tokens: int | None = None):
    """`@function` / `@function(num_api_spec_tokens=...)`: the first argument of `func` is the state `s`. With
    `num_api_spec_tokens`, programs on an API-model backend speculate (radixflow/lang/speculative.py)."""
    if num_api_spec_tokens is not None and (not isinstance(num_api_spec_tokens, int) or num_api_spec_tokens < 1):
        raise ValueError(f"function: num_api_spec_tokens must be a positive integer, got {num_api_spec_tokens!r}")
    if func is None:
        return lambda f: SglFunction(f, num_api_spec_tokens)
    return SglFunction(func, num_api_spec_tokens)
