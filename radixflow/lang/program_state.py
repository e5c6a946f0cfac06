"""The `s` of a program (`ProgramState`) and the children of `s.fork(n)` (`ProgramStateGroup`), over the stream
executors of interpreter.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from radixflow.lang.interpreter import ProgramError, StreamExecutor, media_error
from radixflow.lang.ir import Concat, Image, Node, RoleBegin, RoleEnd, VarScopeBegin, VarScopeEnd, Video, as_node


class ProgramState:
    """`s += ...`, `s["var"]`, roles, fork, streaming."""

    def __init__(self, executor: StreamExecutor):
        self._executor = executor
        self.ret_value = None  # what the program function returned
        self.program_error: BaseException | None = None  # what the program function raised (stream=True)

    def __del__(self):
        # A forked child nobody joins would otherwise keep its worker thread forever.
        self._executor.close()

    def __iadd__(self, other) -> ProgramState:
        if other is None:
            raise ValueError("tried to append None to the program state")
        node = as_node(other)
        media = _media_of(node)
        if media and not self._executor.backend.supports_images():
            raise ProgramError(media_error(self._executor.backend, media[0]))  # at the call, not deep in a run
        self._executor.submit(node)
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
        """Why the program stopped early: a failed primitive, or (stream=True) what the program raised."""
        self.sync()
        return self._executor.error or self.program_error

    def get_var(self, name: str):
        return self[name]

    def set_var(self, name: str, value) -> None:
        self.sync()
        self._executor._set(name, value, self._executor.meta_info.get(name))

    def get_meta_info(self, name: str):
        self[name]
        return self._executor.meta_info.get(name, {})

    def fork(self, size: int = 1, position_ids_offset: list[int] | None = None) -> ProgramStateGroup:
        """`size` children that continue from this state and run in parallel. `position_ids_offset` is accepted
        for SGLang's programs; radixflow's children always continue the parent's positions."""
        del position_ids_offset
        self.sync()
        if self._executor.error is not None:
            raise ProgramError(f"cannot fork a failed program: {self._executor.error!r}") from self._executor.error
        if size > 1:
            self._executor.backend.cache_prefix(self._executor.text)
        children = [ProgramState(self._executor.fork_copy()) for _ in range(size)]
        return ProgramStateGroup(children, self, len(self._executor.text))

    @contextmanager
    def copy(self, position_ids_offset: list[int] | None = None):
        """`with s.copy() as c:` a child state; its new variables come back to `s` at the end (as SGLang's)."""
        group = self.fork(1, position_ids_offset)
        try:
            yield group[0]
        finally:
            group.join()

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

    # -- streaming -------------------------------------------------------------------------------------------
    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """Text as it is produced (run(..., stream=True)): the whole text, or only `var_name`'s, ending when that
        variable is complete. Can be called again, for another variable or the same one. Without streaming,
        yields the whole text (or the variable) once."""
        if not self._executor.stream:
            yield self.text() if var_name is None else self[var_name]
            return
        seen = 0
        while True:
            pieces, seen, done = self._next_pieces(var_name, seen)
            yield from pieces
            if done:
                break
        self._raise_program_error(var_name)

    async def text_async_iter(self, var_name: str | None = None, return_meta_data: bool = False):
        """`text_iter` for asyncio; with `return_meta_data`, (text, the variable's meta info so far) pairs."""
        if not self._executor.stream:
            value = self.text() if var_name is None else self[var_name]
            yield (value, self.get_meta_info(var_name)) if return_meta_data and var_name else value
            return
        loop = asyncio.get_running_loop()
        seen = 0
        while True:
            pieces, seen, done = await loop.run_in_executor(None, self._next_pieces, var_name, seen)
            for piece in pieces:
                if return_meta_data and var_name is not None:
                    yield piece, self._executor.meta_info.get(var_name, {})
                else:
                    yield piece
            if done:
                break
        self._raise_program_error(var_name)

    def _next_pieces(self, var_name: str | None, seen: int) -> tuple[list[str], int, bool]:
        """Block until text was appended after the first `seen` pieces, or nothing more will come for this
        iteration (the program ended, or `var_name` is complete); return the new pieces that belong to it, how
        many pieces have now been seen, and whether that was the last."""
        executor = self._executor

        def over() -> bool:
            if executor.finished or executor.error is not None:
                return True
            return var_name is not None and executor.is_complete(var_name)

        with executor.progress:
            executor.progress.wait_for(lambda: len(executor.pieces) > seen or over())
            new, done = executor.pieces[seen:], over()
        pieces = [text for text, var in new if text and (var_name is None or var == var_name)]
        return pieces, seen + len(new), done

    def _raise_program_error(self, var_name: str | None) -> None:
        """A streamed program's exception surfaces to the reader of its whole text, once that text is read."""
        if var_name is None and self.program_error is not None:
            raise self.program_error

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

    def __setitem__(self, i: int, value) -> None:
        """`forks[i] += ...` appends to the child in place and then assigns it back: only that is allowed."""
        if value is not self.states[i]:
            raise TypeError("a fork's children cannot be replaced; append to them with forks[i] += ...")

    def __iter__(self):
        return iter(self.states)

    def __iadd__(self, other) -> ProgramStateGroup:
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


def _media_of(node: Node) -> list[Image | Video]:
    if isinstance(node, Concat):
        return [m for part in node.parts for m in _media_of(part)]
    return [node] if isinstance(node, (Image, Video)) else []
