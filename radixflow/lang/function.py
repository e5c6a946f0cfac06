"""Program functions: `@function` makes an `SglFunction`, whose `run` / `run_batch` execute the program on a
backend (interpreter.py), and whose `trace` / `compile` turn it into a graph (tracer.py, compiler.py)."""

from __future__ import annotations

import inspect
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from radixflow.lang.compiler import GraphProgram, hoist_constant_text
from radixflow.lang.global_config import global_config
from radixflow.lang.graph import TracedProgram
from radixflow.lang.interpreter import ProgramState, StreamExecutor
from radixflow.lang.tracer import TracerState, trace_program

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
        return self._run_one(args, {**self.bind_arguments, **kwargs}, defaults, stream, resolve_backend(backend))

    def run_batch(self, batch_kwargs: list[dict], *, max_new_tokens: int = 128, stop=None, stop_token_ids=None,
                  temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, min_p: float = 0.0,
                  frequency_penalty: float = 0.0, presence_penalty: float = 0.0, ignore_eos: bool = False,
                  return_logprob: bool = False, logprob_start_len: int | None = None,
                  top_logprobs_num: int | None = None, backend=None, num_threads="auto",
                  progress_bar: bool = False) -> list[ProgramState]:
        defaults = _defaults(dict(locals()))
        chosen = resolve_backend(backend)
        if not batch_kwargs:
            return []
        if not isinstance(batch_kwargs[0], dict):  # SGLang also takes each program's arguments as a tuple
            names = list(inspect.signature(self.func).parameters)[1:]
            batch_kwargs = [dict(zip(names, values)) for values in batch_kwargs]
        if num_threads == "auto":
            # Threads mostly wait on the runtime, so many are cheap; too few would feed the engine in waves (fewer
            # requests per step, more steps: bench/RESULTS.md).
            num_threads = min(len(batch_kwargs), max(96, 16 * (os.cpu_count() or 1)))
        if len(batch_kwargs) > 1:
            self._prefetch(chosen, batch_kwargs)
        run = lambda kw: self._run_one((), {**self.bind_arguments, **kw}, defaults, False, chosen)  # noqa: E731
        with ThreadPoolExecutor(num_threads) as pool:
            futures = [pool.submit(run, kw) for kw in batch_kwargs]
            if progress_bar:
                for future in tqdm(futures, total=len(futures), desc="run_batch"):
                    future.result()
            return [f.result() for f in futures]

    def trace(self, **kwargs) -> TracedProgram:
        """Run the function on symbolic arguments (those not given here or bound) and return the graph of what it
        appends, without running anything. Raises TracingError where the program needs a value only a run has."""
        return trace_program(self.func, {**self.bind_arguments, **kwargs})

    def compile(self, *, hoist_constants: bool = False, **kwargs) -> CompiledFunction:
        """Trace (arguments given here are fixed) and optimise into a CompiledFunction, whose run / run_batch give
        the same results as this function's; see radixflow/lang/compiler.py for the passes."""
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
    """`@function` / `@function(num_api_spec_tokens=...)`: the first argument of `func` is the state `s`."""
    if func is None:
        return lambda f: SglFunction(f, num_api_spec_tokens)
    return SglFunction(func, num_api_spec_tokens)
