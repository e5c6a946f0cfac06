"""Tracing: run a program function on symbolic arguments and record what it appends, without running anything.

`trace_program` calls the function with a `TracerState` as `s`; every argument not given is an `Argument`
placeholder and `s["x"]` returns a `VarRef`. Both compose with text (`"Q: " + question`, `f"Q: {question}"`,
`s += s["x"]`) and refuse every use that needs their value (`==`, `if`, `in`, `len`, `range(n)`, `.strip()`):
such a program cannot be traced, and the error names the argument or variable (SGLang stops tracing there too).
"""

from __future__ import annotations

import inspect
import operator
import re
from collections.abc import Iterator

from radixflow.lang.graph import (
    ArgumentUse,
    Fork,
    Join,
    SetVar,
    Step,
    TracedProgram,
    TracingError,
    VariableUse,
    substitute_fields,
)
from radixflow.lang.ir import Concat, Node, Text, as_node
from radixflow.lang.program_state import ProgramState, ProgramStateGroup

# A symbol formatted into a string becomes this marker (its key and format spec); the recorder turns markers in
# appended text back into nodes. \x00 and \x01 do not occur in real prompts.
_MARK = re.compile("\x00rf\x01(\\d+)\x01([^\x00\x01]*)\x00")


class _Symbol(Node):
    """A value only a run knows. It can be appended, concatenated with text and formatted into a string; every
    other use raises TracingError (and marks the trace failed, should the program catch the error)."""

    def __init__(self, recorder: _Recorder, name: str):
        self._recorder = recorder
        self.name = name
        self._key = recorder.register(self)

    def __add__(self, other) -> Concat:
        if isinstance(other, (str, Node)):
            return Concat([self, as_node(other)])
        raise self.misuse(f"+ {type(other).__name__}")

    def __radd__(self, other) -> Concat:
        if isinstance(other, (str, Node)):
            return Concat([as_node(other), self])
        raise self.misuse(f"{type(other).__name__} +")

    def __format__(self, spec: str) -> str:
        nested = _MARK.search(spec)
        if nested:  # f"{x:>{width}}": the inner symbol's value is needed to format
            raise self._recorder.symbols[int(nested.group(1))].misuse("in a format spec")
        return f"\x00rf\x01{self._key}\x01{spec}\x00"

    def __str__(self) -> str:
        return self.__format__("")

    def __getattr__(self, attr: str):
        if attr.startswith("_"):  # protocol lookups (copy, pickle, pytest) must see a plain missing attribute
            raise AttributeError(attr)
        raise self.misuse(f".{attr}")

    __hash__ = object.__hash__  # __eq__ refuses below; identity hashing keeps symbols usable as dict keys

    def misuse(self, operation: str) -> TracingError:
        return self._recorder.fail(TracingError(self.explain(operation)))

    def explain(self, operation: str) -> str:
        raise NotImplementedError

    def use(self, spec: str | None):
        raise NotImplementedError


_REFUSED = {"__eq__": "==", "__ne__": "!=", "__lt__": "<", "__le__": "<=", "__gt__": ">", "__ge__": ">=",
            "__bool__": "a truth test (if, while, and, or, not)", "__len__": "len()", "__iter__": "iteration",
            "__contains__": "in", "__getitem__": "indexing", "__int__": "int()", "__float__": "float()",
            "__index__": "an integer (range(), fork(n), indexing)", "__mul__": "*", "__rmul__": "*",
            "__sub__": "-", "__rsub__": "-", "__truediv__": "/", "__mod__": "%", "__neg__": "unary -",
            "__round__": "round()", "__abs__": "abs()"}


def _refuse(description: str):
    def refused(self, *args):
        raise self.misuse(description)
    return refused


for _method, _description in _REFUSED.items():
    setattr(_Symbol, _method, _refuse(_description))


class Argument(_Symbol):
    """A program argument the trace was not given."""

    def explain(self, operation):
        return (f"argument {self.name!r} is used as a value ({operation}) while tracing: symbolically it can only "
                f"be appended or built into text. Trace with a concrete value: fn.trace({self.name}=...) or "
                f"fn.compile({self.name}=...)")

    def use(self, spec):
        return ArgumentUse(self.name, spec)

    def __repr__(self) -> str:
        return f"Argument({self.name!r})"


class VarRef(_Symbol):
    """`s["x"]` while tracing: the variable as the program will have it when this is appended."""

    def __init__(self, recorder: _Recorder, name: str, source: int):
        super().__init__(recorder, name)
        self.source = source

    def explain(self, operation):
        return (f"the program uses variable {self.name!r} in Python ({operation}): its value exists only when the "
                f"program runs, so what follows cannot be traced (control flow that depends on a generated value)")

    def use(self, spec):
        return VariableUse(self.name, self.source, spec)

    def __repr__(self) -> str:
        return f"VarRef({self.name!r}, stream={self.source})"


class _Recorder:
    """Collects the steps of one trace, shared by the state and its forked children."""

    def __init__(self):
        self.steps: list[Step] = []
        self.symbols: list[_Symbol] = []
        self.streams = 1
        self.statements = 0
        self.failure: TracingError | None = None  # the first refusal, even if the program caught it
        self.valid_steps = 0  # steps recorded before that refusal

    def register(self, symbol: _Symbol) -> int:
        self.symbols.append(symbol)
        return len(self.symbols) - 1

    def fail(self, error: TracingError) -> TracingError:
        if self.failure is None:
            self.failure, self.valid_steps = error, len(self.steps)
        return error

    def new_stream(self) -> int:
        self.streams += 1
        return self.streams - 1

    def record(self, stream: int, payloads) -> None:
        self.steps += [Step(stream, payload, self.statements) for payload in payloads]
        self.statements += 1

    def append(self, stream: int, node: Node) -> None:
        self.record(stream, list(self._flatten(node)))

    def _flatten(self, node: Node) -> Iterator:
        match node:
            case Concat(parts=parts):
                for part in parts:
                    yield from self._flatten(part)
            case Text(value=value):
                yield from self._split(value)
            case _Symbol():
                yield node.use(None)
            case _:
                for attr in ("name", "role"):  # they key the graph's bookkeeping: they must be known now
                    if isinstance(getattr(node, attr, None), _Symbol):
                        raise getattr(node, attr).misuse(f"as the {attr} of {type(node).__name__}")
                yield substitute_fields(node, self._parameter)

    def _split(self, text: str) -> Iterator:
        at = 0
        for mark in _MARK.finditer(text):
            yield from self._text(text[at:mark.start()])
            yield self._symbol(int(mark.group(1))).use(mark.group(2))
            at = mark.end()
        yield from self._text(text[at:])

    def _text(self, text: str) -> Iterator[Text]:
        if "\x00" in text or "\x01" in text:  # a marker was cut or altered: str(question)[:5], .upper(), ...
            raise self.fail(TracingError("an argument or variable was converted to str and then changed (sliced, "
                                         "case-changed, ...) while tracing: its value is needed, so the program "
                                         "cannot be traced"))
        if text:
            yield Text(text)

    def _symbol(self, key: int) -> _Symbol:
        if key >= len(self.symbols):
            raise self.fail(TracingError("text holds a placeholder from another trace"))
        return self.symbols[key]

    def _parameter(self, value):
        """A gen / select / image parameter: an argument becomes a use of it, filled in at run time."""
        if isinstance(value, Argument):
            return value.use(None)
        if isinstance(value, VarRef):
            raise value.misuse("as a gen / select parameter")
        if isinstance(value, str) and ("\x00" in value or "\x01" in value):
            raise self.fail(TracingError("a gen / select parameter is a string formatted from an argument or "
                                         "variable: trace with that argument concrete"))
        return value


class TracerState:
    """The `s` a traced program gets: it records instead of running. It has ProgramState's API; what needs a run's
    result (text(), messages(), get_meta_info(), `"x" in s`) raises TracingError."""

    def __init__(self, recorder: _Recorder, stream: int = 0):
        self._recorder = recorder
        self._stream = stream
        self.ret_value = None

    def __iadd__(self, other) -> TracerState:
        self._recorder.append(self._stream, as_node(other))
        return self

    def __getitem__(self, name: str) -> VarRef:
        return VarRef(self._recorder, name, self._stream)

    def get_var(self, name: str) -> VarRef:
        return self[name]

    def __setitem__(self, name: str, value) -> None:
        self.set_var(name, value)

    def set_var(self, name: str, value) -> None:
        if isinstance(value, _Symbol):
            raise value.misuse(f"as the value of s[{name!r}] = ...")
        self._recorder.record(self._stream, [SetVar(name, value)])

    def _refuse(self, what: str) -> TracingError:
        return self._recorder.fail(TracingError(f"the program reads {what} while tracing: it exists only when "
                                                f"the program runs"))

    def __contains__(self, name: str) -> bool:
        raise self._refuse(f"`{name!r} in s`")

    def text(self) -> str:
        raise self._refuse("s.text()")

    def messages(self) -> list[dict]:
        raise self._refuse("s.messages()")

    def get_meta_info(self, name: str) -> dict:
        raise self._refuse(f"s.get_meta_info({name!r})")

    def text_iter(self, var_name: str | None = None):
        raise self._refuse("s.text_iter()")

    def text_async_iter(self, var_name: str | None = None, return_meta_data: bool = False):
        raise self._refuse("s.text_async_iter()")

    def sync(self) -> None:
        pass

    def error(self) -> None:
        return None

    def fork(self, size: int = 1, position_ids_offset: list[int] | None = None) -> TracerGroup:
        del position_ids_offset  # accepted as ProgramState.fork accepts it
        size = operator.index(size)  # a symbolic size refuses here, naming the argument
        children = tuple(self._recorder.new_stream() for _ in range(size))
        self._recorder.record(self._stream, [Fork(size, children)])
        return TracerGroup([TracerState(self._recorder, child) for child in children], self)

    # ProgramState's block helpers only do `self += ...`, `fork` and `join`: the same code records here.
    copy = ProgramState.copy
    var_scope = ProgramState.var_scope
    _role = ProgramState._role
    _role_block = ProgramState._role_block
    system = ProgramState.system
    user = ProgramState.user
    assistant = ProgramState.assistant


class TracerGroup:
    """The children of a traced `fork(n)`."""

    def __init__(self, states: list[TracerState], parent: TracerState):
        self.states = states
        self.parent = parent

    # ProgramStateGroup's appending and indexing only use `self.states`.
    __len__ = ProgramStateGroup.__len__
    __getitem__ = ProgramStateGroup.__getitem__
    __setitem__ = ProgramStateGroup.__setitem__
    __iter__ = ProgramStateGroup.__iter__
    __iadd__ = ProgramStateGroup.__iadd__

    def join(self, mode: str = "gather_variable") -> None:
        if mode not in ("gather_variable", "concate_and_append"):
            raise ValueError(f"join mode must be 'gather_variable' or 'concate_and_append', got {mode!r}")
        children = tuple(state._stream for state in self.states)
        self.parent._recorder.record(self.parent._stream, [Join(children, mode)])


def trace_program(func, arguments: dict, partial: bool = False) -> TracedProgram:
    """Trace `func(s, **arguments)` with every other parameter an `Argument` placeholder.

    An error while tracing (a TracingError, or anything the program raises) propagates; with `partial` the graph
    instead holds the nodes recorded before it, and `stopped` says what stopped it. A TracingError the program
    caught still ends the trace where it was raised.
    """
    signature = inspect.signature(func)
    state, *parameters = signature.parameters.values()
    recorder = _Recorder()
    symbolic = [p for p in parameters
                if p.name not in arguments and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    stopped: BaseException | None = None
    try:
        func(TracerState(recorder), **arguments, **{p.name: Argument(recorder, p.name) for p in symbolic})
    except Exception as exc:  # noqa: BLE001 - reported below, or kept as where a partial trace stopped
        stopped = exc
    stopped = recorder.failure or stopped
    if stopped is not None and not partial:
        raise stopped
    steps = recorder.steps[:recorder.valid_steps] if recorder.failure else recorder.steps
    name = getattr(func, "__name__", type(func).__name__)
    return TracedProgram.build(name, signature.replace(parameters=[state, *symbolic]), dict(arguments), steps,
                               stopped)
