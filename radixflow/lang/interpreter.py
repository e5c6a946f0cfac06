"""The interpreter: one stream executor per program state (the program's `s` is in program_state.py).

A program's primitives are queued to its executor's worker thread and run in order; the user's Python runs ahead
until it reads a variable (`s["answer"]` blocks on that variable's event). `fork` syncs, sends the shared prefix
to the backend once (so the runtime caches it), and starts child executors that run in parallel. With
`use_thread=False` (SGLang's option) primitives run at once on the program's own thread instead.

A primitive that fails (a backend error) stops its executor: later primitives are skipped, readers of variables it
never produced get a ProgramError, and `state.error()` says why, as in SGLang.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable
from typing import Any

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
    VarScopeBegin,
    VarScopeEnd,
    Video,
)
from radixflow.lang.reasoning import split_reasoning


class ProgramError(RuntimeError):
    """A primitive failed, or the program read a variable nothing produced; raised where the program reads it."""


class StreamExecutor:
    def __init__(self, backend, defaults: dict, stream: bool = False, use_thread: bool = True):
        self.backend = backend
        self.defaults = defaults
        self.stream = stream
        self.use_thread = use_thread
        self.template = backend.get_chat_template()
        self.text = ""
        self.messages: list[dict] = []
        self.variables: dict[str, Any] = {}
        self.meta_info: dict[str, Any] = {}
        self.pieces: list[tuple[str, str | None]] = []  # stream=True: each appended text and its variable
        self.error: BaseException | None = None
        self.finished = False  # the worker has run everything it will run
        self._ended = False
        self.owner: threading.Thread | None = None  # the thread running the program function
        self._events: dict[str, threading.Event] = {}
        self.progress = threading.Condition()  # notified whenever text grows, a variable completes, or it ends
        self._role: tuple[str, int] | None = None
        self._scopes: dict[str, int] = {}
        self._queue: queue.Queue = queue.Queue()
        self._handlers: dict[type, Callable[[Any], None]] = {
            Text: self._text, Concat: self._concat, Gen: self._gen, Select: self._select, RoleBegin: self._role_begin,
            RoleEnd: self._role_end, VarScopeBegin: self._scope_begin, VarScopeEnd: self._scope_end,
            Image: self._media, Video: self._media, SeparateReasoning: self._separate_reasoning,
        }
        if use_thread:
            threading.Thread(target=self._loop, daemon=True).start()

    # -- API used by ProgramState ----------------------------------------------------------------------------
    def submit(self, node: Node) -> None:
        for name in variables_of(node):
            self._event(name).clear()
        if self.use_thread:
            self._queue.put(node)
        else:
            self._run(node)

    def sync(self) -> None:
        if self.use_thread:
            self._queue.join()

    def end(self) -> None:
        self.sync()
        self.close()

    def close(self) -> None:
        """Stop the worker once the queued primitives have run; readers of missing variables wake up."""
        if self._ended:
            return
        self._ended = True
        if self.use_thread:
            self._queue.put(None)
        else:
            self._finish()
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

    def is_complete(self, name: str) -> bool:
        return name in self._events and self._events[name].is_set()

    def fork_copy(self) -> StreamExecutor:
        child = StreamExecutor(self.backend, self.defaults, self.stream, self.use_thread)
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
                self._finish()
                return
            try:
                self._run(node)
            finally:
                self._queue.task_done()

    def _run(self, node: Node) -> None:
        if self.error is not None:
            return
        try:
            self._handlers[type(node)](node)
        except BaseException as exc:  # noqa: BLE001 - kept and re-raised where the program reads it
            self.error = exc
            for event in list(self._events.values()):  # the program's thread may add events meanwhile
                event.set()  # readers wake up and see the error instead of waiting forever
            self._notify()

    def _finish(self) -> None:
        self.finished = True
        self._notify()

    def _notify(self) -> None:
        with self.progress:
            self.progress.notify_all()

    def _append(self, text: str, var: str | None = None) -> None:
        with self.progress:
            self.text += text
            if self.stream:
                self.pieces.append((text, var))
            self.progress.notify_all()

    def _text(self, node: Text) -> None:
        self._append(node.value)

    def _concat(self, node: Concat) -> None:
        for part in node.parts:
            self._handlers[type(part)](part)

    def _params(self, node: Gen) -> tuple[dict, dict]:
        params = {**self.defaults["sampling"], **{k: v for k, v in node.params.items() if v is not None}}
        if self.template.stop_str:  # a named template's end-of-turn markers stop every generation, as in SGLang
            stop = params.get("stop") or []
            params["stop"] = [*([stop] if isinstance(stop, str) else stop), *self.template.stop_str]
        logprob = {k: v for k, v in (("return_logprob", node.return_logprob or None),
                                     ("logprob_start_len", node.logprob_start_len),
                                     ("top_logprobs_num", node.top_logprobs_num),
                                     ("return_text_in_logprobs", node.return_text_in_logprobs or None))
                   if v is not None}
        return params, {**self.defaults["logprob"], **logprob}

    def _gen(self, node: Gen) -> None:
        params, logprob = self._params(node)
        if params.get("n", 1) > 1:
            # As SGLang: the variable is the list of the n samples, the text continues with the first.
            if self.stream:
                raise ProgramError(f"gen({node.name!r}, n={params['n']}) cannot stream: run it without stream=True")
            outs, metas = self.backend.generate(self.text, params, logprob)
            self._append(outs[0], node.name)
            self._set(node.name, list(outs), metas)
        elif self.stream:
            out = ""
            for delta, final in self.backend.generate_stream(self.text, params, logprob):
                out += delta
                if final is not None and node.name is not None:
                    self.meta_info[node.name] = final
                self._append(delta, node.name)
            self._set(node.name, out, self.meta_info.get(node.name))
        else:
            out, meta = self.backend.generate(self.text, params, logprob)
            self._append(out, node.name)
            self._set(node.name, out, meta)

    def _select(self, node: Select) -> None:
        result = self.backend.select(self.text, node.choices, node.temperature, node.choices_method)
        self._append(result.decision, node.name)
        self._set(node.name, result.decision, result.meta_info)

    def _set(self, name: str | None, value, meta) -> None:
        if name is None:
            return
        self.variables[name] = value
        self.meta_info[name] = meta if meta is not None else {}
        self._event(name).set()
        self._notify()

    def _role_begin(self, node: RoleBegin) -> None:
        system_prompt = self.template.default_system_prompt
        if system_prompt and not self.messages and self._role is None and node.role != "system":
            # A named template's default system prompt, as SGLang sends it before a program's first other role.
            self._role_begin(RoleBegin("system"))
            self._append(system_prompt)
            self._role_end(RoleEnd("system"))
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

    def _media(self, node: Image | Video) -> None:
        # `s += image(...)` already refused a text-only backend; none of radixflow's backends takes media yet.
        raise ProgramError(f"{type(node).__name__.lower()}({node.path!r}): the interpreter cannot send media to "
                           f"{type(self.backend).__name__} yet")

    def _separate_reasoning(self, node: SeparateReasoning) -> None:
        """Split the variable's `<think>...</think>` block into `{name}_reasoning_content` (SGLang's name) and
        keep only the answer in the variable and in the text."""
        value = self.variables.get(node.name)
        if not isinstance(value, str):
            raise ProgramError(f"separate_reasoning: {node.name!r} is not a generated text")
        reasoning, answer = split_reasoning(value, node.model_type)
        if self.text.endswith(value):
            with self.progress:
                self.text = self.text[:len(self.text) - len(value)] + answer
        self._set(node.name, answer, self.meta_info.get(node.name))
        self._set(node.reasoning_name, reasoning, None)


def media_error(backend, node: Image | Video) -> str:
    kind = "video" if isinstance(node, Video) else "image"
    model = backend.get_model_name() or "its model"
    return (f"{kind}({node.path!r}): the backend {type(backend).__name__} ({model}) takes text only; use a backend "
            f"whose model accepts {kind}s")


def variables_of(node: Node) -> list[str]:
    if isinstance(node, Concat):
        return [name for part in node.parts for name in variables_of(part)]
    if isinstance(node, (Gen, Select)) and node.name:
        return [node.name]
    if isinstance(node, VarScopeEnd):
        return [node.name]
    if isinstance(node, SeparateReasoning):
        return [node.name, node.reasoning_name]
    return []
