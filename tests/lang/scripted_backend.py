"""Model-free frontend backends for interpreter tests: canned answers, every call recorded.

`ScriptedBackend` answers `generate` with `respond(prompt)` and `select` with `choose(prompt, choices)`. The
subclasses hold calls back in ways that expose the interpreter's concurrency: `GatedBackend` until an event is
set, `BarrierBackend` until N calls are inside it at once, `ChunkedBackend` streams its answer in pieces.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from radixflow.backends.base import BaseBackend
from radixflow.lang.chat_template import RoleTemplate
from radixflow.lang.choices import ChoicesDecision

WAIT_S = 5.0  # no test waits longer than this for another thread: a broken interpreter fails instead of hanging


def echo(prompt: str) -> str:
    """The default answer: names the last 6 characters of the prompt, so each call's answer is recognisable."""
    return f"<{prompt[-6:]}>"


class ScriptedBackend(BaseBackend):
    def __init__(self, respond: Callable[[str], str] = echo, choose: Callable[[str, list[str]], str] | None = None,
                 template: RoleTemplate | None = None):
        self.respond = respond
        self.choose = choose or (lambda prompt, choices: choices[0])
        self.chat_template = template or RoleTemplate.plain()
        self.calls: list[tuple[str, str, object]] = []  # (kind, prompt, params / choice arguments)
        self._lock = threading.Lock()

    def record(self, kind: str, prompt: str, extra=None) -> None:
        with self._lock:
            self.calls.append((kind, prompt, extra))

    def prompts(self, kind: str = "generate") -> list[str]:
        return [prompt for k, prompt, _ in self.calls if k == kind]

    def params(self) -> list[dict]:
        return [extra for k, _, extra in self.calls if k == "generate"]

    def cache_prefix(self, text: str) -> None:
        self.record("cache_prefix", text)

    def generate(self, text, params, logprob):
        self.record("generate", text, params)
        return self.respond(text), {"prompt": text}

    def select(self, text, choices, temperature, method):
        self.record("select", text, {"choices": choices, "temperature": temperature, "method": method})
        return ChoicesDecision(self.choose(text, choices), {"choices": choices})


class GatedBackend(ScriptedBackend):
    """Each generate signals `entered`, then waits for `release` before answering."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.entered = threading.Event()
        self.release = threading.Event()

    def generate(self, text, params, logprob):
        self.entered.set()
        if not self.release.wait(WAIT_S):
            raise TimeoutError("GatedBackend was never released")
        return super().generate(text, params, logprob)


class BarrierBackend(ScriptedBackend):
    """A generate whose prompt `applies` answers only once `n` such calls have been inside it together; if they
    never are (the interpreter ran them one after another), it fails after a timeout."""

    def __init__(self, n: int, applies: Callable[[str], bool] = lambda prompt: True, **kwargs):
        super().__init__(**kwargs)
        self.n, self.applies = n, applies
        self.inside = 0
        self.most_inside = 0
        self._cond = threading.Condition()

    def generate(self, text, params, logprob):
        if not self.applies(text):
            return super().generate(text, params, logprob)
        with self._cond:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self._cond.notify_all()
            together = self._cond.wait_for(lambda: self.most_inside >= self.n, WAIT_S)
            self.inside -= 1
        if not together:
            raise TimeoutError(f"only {self.most_inside} of {self.n} calls were ever in flight together")
        return super().generate(text, params, logprob)


class ChunkedBackend(ScriptedBackend):
    """Streams `chunks` as the answer to every generate; after the first chunk it waits for `gate` (if given)."""

    def __init__(self, chunks: list[str], gate: threading.Event | None = None, **kwargs):
        super().__init__(respond=lambda prompt: "".join(chunks), **kwargs)
        self.chunks, self.gate = chunks, gate

    def generate_stream(self, text, params, logprob):
        self.record("generate_stream", text, params)
        for i, chunk in enumerate(self.chunks):
            if i == 1 and self.gate is not None and not self.gate.wait(WAIT_S):
                raise TimeoutError("ChunkedBackend's gate was never opened")
            yield chunk, ({"chunks": len(self.chunks)} if i == len(self.chunks) - 1 else None)
