"""The interpreter: one stream executor per program state.

A program's primitives are queued to its executor's worker thread and run in order; the user's Python runs ahead
until it reads a variable (`s["answer"]` blocks on that variable's event). `fork` syncs, sends the shared prefix
to the backend once (so the runtime caches it), and starts child executors that run in parallel.
"""

from __future__ import annotations

import asyncio
import copy
import queue
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from radixflow.lang.ir import (
    Concat,
    Gen,
    Image,
    Node,
    RoleBegin,
    RoleEnd,
    Select,
    Text,
    VarScopeBegin,
    VarScopeEnd,
    as_node,
)


class ProgramError(RuntimeError):
    """A primitive failed; raised where the program reads the state."""


@dataclass
class StreamEvent:
    text: str
    var: str | None  # the variable this text belongs to (None for constant text)


class StreamExecutor:
    def __init__(self, backend, defaults: dict, stream: bool = False):
        self.backend = backend
        self.defaults = defaults
        self.stream = stream
        self.template = backend.get_chat_template()
        self.text = ""
        self.messages: list[dict] = []
        self.variables: dict[str, Any] = {}
        self.meta_info: dict[str, dict] = {}
        self.error: BaseException | None = None
        self._ended = False
        self.owner: threading.Thread | None = None  # the thread running the program function
        self._events: dict[str, threading.Event] = {}
        self._role: tuple[str, int] | None = None
        self._scopes: dict[str, int] = {}
        self._queue: queue.Queue = queue.Queue()
        self.stream_events: queue.Queue = queue.Queue()
        self._handlers: dict[type, Callable[[Any], None]] = {
            Text: self._text, Concat: self._concat, Gen: self._gen, Select: self._select, RoleBegin: self._role_begin,
            RoleEnd: self._role_end, VarScopeBegin: self._scope_begin, VarScopeEnd: self._scope_end,
            Image: self._image,
        }
        self._worker = threading.Thread(target=self._loop, daemon=True)
        self._worker.start()

    # -- API used by ProgramState ----------------------------------------------------------------------------
    def submit(self, node: Node) -> None:
        for name in _variables_of(node):
            self._event(name).clear()
        self._queue.put(node)

    def sync(self) -> None:
        self._queue.join()

    def end(self) -> None:
        self.sync()
        self.close()

    def close(self) -> None:
        """Stop the worker once the queued primitives have run; readers of missing variables wake up."""
        if self._ended:
            return
        self._ended = True
        self._queue.put(None)
        self.stream_events.put(None)
        for event in list(self._events.values()):
            event.set()

    def get(self, name: str):
        known = name in self._events
        event = self._event(name)
        if not known and not self._ended and threading.current_thread() is self.owner:
            # Nothing the program appended produces it, and only the program could: waiting would never end.
            raise ProgramError(f"variable {name!r} is read before anything appended to the program produces it")
        if not self._ended:  # after the end nothing more will be produced: a missing variable raises below
            event.wait()
        if name not in self.variables:
            reason = f"the program failed: {self.error!r}" if self.error else "the program ended without it"
            raise ProgramError(f"variable {name!r} was never produced: {reason}") from self.error
        return self.variables[name]

    def fork_copy(self) -> "StreamExecutor":
        child = StreamExecutor(self.backend, self.defaults, self.stream)
        child.text, child.messages = self.text, copy.deepcopy(self.messages)
        child.variables, child.meta_info = dict(self.variables), dict(self.meta_info)
        child._role = self._role
        child.owner = self.owner
        for name in self.variables:
            child._event(name).set()
        return child

    # -- worker ----------------------------------------------------------------------------------------------
    def _event(self, name: str) -> threading.Event:
        return self._events.setdefault(name, threading.Event())

    def _loop(self) -> None:
        while True:
            node = self._queue.get()
            if node is None:
                self._queue.task_done()
                return
            try:
                if self.error is None:
                    self._handlers[type(node)](node)
            except BaseException as exc:  # noqa: BLE001 - kept and re-raised where the program reads it
                self.error = exc
            finally:
                if self.error is not None:
                    for event in list(self._events.values()):  # the program's thread may add events meanwhile
                        event.set()  # readers wake up and see the error instead of waiting forever
                self._queue.task_done()

    def _append(self, text: str, var: str | None = None) -> None:
        self.text += text
        if self.stream:
            self.stream_events.put(StreamEvent(text, var))

    def _text(self, node: Text) -> None:
        self._append(node.value)

    def _concat(self, node: Concat) -> None:
        for part in node.parts:
            self._handlers[type(part)](part)

    def _params(self, node: Gen) -> tuple[dict, dict]:
        params = {**self.defaults["sampling"], **{k: v for k, v in node.params.items() if v is not None}}
        logprob = {k: v for k, v in (("return_logprob", node.return_logprob or None),
                                     ("logprob_start_len", node.logprob_start_len),
                                     ("top_logprobs_num", node.top_logprobs_num)) if v is not None}
        return params, {**self.defaults["logprob"], **logprob}

    def _gen(self, node: Gen) -> None:
        params, logprob = self._params(node)
        if self.stream:
            out, meta = "", None
            for delta, final in self.backend.generate_stream(self.text, params, logprob):
                out += delta
                self._append(delta, node.name)
                meta = final or meta
        else:
            out, meta = self.backend.generate(self.text, params, logprob)
            self._append(out, node.name)
        self._set(node.name, out, meta)

    def _select(self, node: Select) -> None:
        result = self.backend.select(self.text, node.choices, node.temperature, node.choices_method)
        self._append(result.decision, node.name)
        self._set(node.name, result.decision, result.meta_info)

    def _set(self, name: str | None, value, meta: dict | None) -> None:
        if name is None:
            return
        self.variables[name] = value
        self.meta_info[name] = meta or {}
        self._event(name).set()

    def _role_begin(self, node: RoleBegin) -> None:
        self._append(self.template.prefix(node.role))
        self._role = (node.role, len(self.text))

    def _role_end(self, node: RoleEnd) -> None:
        role, start = self._role or (node.role, len(self.text))
        self.messages.append({"role": role, "content": self.text[start:]})
        self._append(self.template.suffix(node.role))
        self._role = None

    def _scope_begin(self, node: VarScopeBegin) -> None:
        self._scopes[node.name] = len(self.text)

    def _scope_end(self, node: VarScopeEnd) -> None:
        self._set(node.name, self.text[self._scopes.pop(node.name):], None)

    def _image(self, node: Image) -> None:
        if not self.backend.supports_images():
            raise ProgramError(f"{type(self.backend).__name__} does not support images (image({node.path!r}))")


def _variables_of(node: Node) -> list[str]:
    if isinstance(node, Concat):
        return [name for part in node.parts for name in _variables_of(part)]
    if isinstance(node, (Gen, Select)) and node.name:
        return [node.name]
    if isinstance(node, VarScopeEnd):
        return [node.name]
    return []


class ProgramState:
    """The `s` of a program: `s += ...`, `s["var"]`, roles, fork, streaming."""

    def __init__(self, executor: StreamExecutor):
        self._executor = executor
        self.ret_value = None  # what the program function returned

    def __del__(self):
        # A forked child nobody joins would otherwise keep its worker thread forever.
        self._executor.close()

    def __iadd__(self, other) -> "ProgramState":
        self._executor.submit(as_node(other))
        return self

    def __getitem__(self, name: str):
        return self._executor.get(name)

    def __setitem__(self, name: str, value) -> None:
        self.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        self.sync()
        return name in self._executor.variables

    def text(self) -> str:
        self.sync()
        return self._executor.text

    def messages(self) -> list[dict]:
        self.sync()
        return list(self._executor.messages)

    def sync(self) -> None:
        self._executor.sync()

    def error(self) -> BaseException | None:
        self.sync()
        return self._executor.error

    def get_var(self, name: str):
        return self[name]

    def set_var(self, name: str, value) -> None:
        self.sync()
        self._executor._set(name, value, self._executor.meta_info.get(name))

    def get_meta_info(self, name: str) -> dict:
        self[name]
        return self._executor.meta_info.get(name, {})

    def fork(self, size: int = 1) -> "ProgramStateGroup":
        self.sync()
        if self._executor.error is not None:
            raise ProgramError(f"cannot fork a failed program: {self._executor.error!r}") from self._executor.error
        if size > 1:
            self._executor.backend.cache_prefix(self._executor.text)
        children = [ProgramState(self._executor.fork_copy()) for _ in range(size)]
        return ProgramStateGroup(children, self, len(self._executor.text))

    def copy(self) -> "ProgramState":
        return self.fork(1)[0]

    @contextmanager
    def var_scope(self, name: str):
        self += VarScopeBegin(name)
        yield
        self += VarScopeEnd(name)

    @contextmanager
    def _role(self, role: str):
        self += RoleBegin(role)
        yield
        self += RoleEnd(role)

    def system(self, text=None):
        return self._role_block("system", text)

    def user(self, text=None):
        return self._role_block("user", text)

    def assistant(self, text=None):
        return self._role_block("assistant", text)

    def _role_block(self, role: str, text):
        if text is None:
            return self._role(role)
        self += RoleBegin(role) + as_node(text) + RoleEnd(role)
        return None

    def text_iter(self, var_name: str | None = None):
        """Yield text as it is produced (run(..., stream=True)); only that variable's text if `var_name`.
        Without streaming, yields the whole text (or the variable) once."""
        if not self._executor.stream:
            yield self.text() if var_name is None else self[var_name]
            return
        while True:
            event = self._executor.stream_events.get()
            if event is None:
                return
            if var_name is None or event.var == var_name:
                yield event.text

    async def text_async_iter(self, var_name: str | None = None):
        if not self._executor.stream:
            yield self.text() if var_name is None else self[var_name]
            return
        loop = asyncio.get_running_loop()
        while True:
            event = await loop.run_in_executor(None, self._executor.stream_events.get)
            if event is None:
                return
            if var_name is None or event.var == var_name:
                yield event.text

    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"


class ProgramStateGroup:
    """The children of `fork(n)`."""

    def __init__(self, states: list[ProgramState], parent: ProgramState, start: int):
        self.states = states
        self.parent = parent
        self.start = start  # the parent's text length at the fork: where each child's own text begins

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __iter__(self):
        return iter(self.states)

    def __iadd__(self, other) -> "ProgramStateGroup":
        for i, state in enumerate(self.states):
            if callable(other):
                state += other(i)
            elif isinstance(other, (list, tuple)):  # one expression per child
                state += other[i]
            else:
                state += other
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """Wait for every child. gather_variable: the parent gets each new variable as a list over children;
        concate_and_append: the parent's text grows by each child's new text, in order."""
        for state in self.states:
            state.sync()
        parent = self.parent._executor
        if mode == "gather_variable":
            names = {n for s in self.states for n in s._executor.variables if n not in parent.variables}
            for name in sorted(names):
                parent._set(name, [s._executor.variables.get(name) for s in self.states], None)
        elif mode == "concate_and_append":
            self.parent += "".join(s._executor.text[self.start:] for s in self.states)
        else:
            raise ValueError(f"join mode must be 'gather_variable' or 'concate_and_append', got {mode!r}")
