"""The interpreter: one stream executor per program state (the program's `s` is in program_state.py).

A program's primitives are queued to its executor's worker thread and run in order; the user's Python runs ahead
until it reads a variable (`s["answer"]` blocks on that variable's event). `fork` syncs, sends the shared prefix
to the backend once (so the runtime caches it), and starts child executors that run in parallel. With
`use_thread=False` (SGLang's option) primitives run at once on the program's own thread instead.

A primitive that fails (a backend error) stops its executor: later primitives are skipped, readers of variables it
never produced get a ProgramError, and `state.error()` says why, as in SGLang.

A backend with `is_chat_model` (the API backends) is asked with the conversation instead of the text (`_chat_prompt`).
With `num_api_spec_tokens` on a backend that allows it, gens speculate (speculative.py): each executor keeps its own
speculative state.
"""

from __future__ import annotations

import base64
import copy
import logging
import mimetypes
import queue
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from radixflow.lang.global_config import global_config
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
from radixflow.lang.speculative import ChatTurn, Speculation, Term
from radixflow.parsers.reasoning import split_reasoning

logger = logging.getLogger(__name__)

# What a speculative call asks for besides the text: the token texts, so a gen's token limit can be applied to it.
_SPEC_LOGPROB = {"return_logprob": True, "top_logprobs_num": 0, "return_text_in_logprobs": True}
# Sampling fields a speculated gen may have: anything else (constraints, logprobs, n) runs without speculation.
_SPECULABLE = {"max_new_tokens", "min_new_tokens", "stop", "temperature", "top_p", "top_k", "min_p",
               "frequency_penalty", "presence_penalty", "ignore_eos", "skip_special_tokens", "n"}
_CHAT_SPEC_TRIES = 3  # calls for an assistant turn whose sampled answer does not follow the program's pattern


class ProgramError(RuntimeError):
    """A primitive failed, or the program read a variable nothing produced; raised where the program reads it."""


class _ResolveTurn(Node):
    """Internal: fill the assistant turn collected under speculation now (the program reads one of its variables)."""


class StreamExecutor:
    def __init__(self, backend, defaults: dict, stream: bool = False, use_thread: bool = True,
                 num_api_spec_tokens: int | None = None):
        self.backend = backend
        self.defaults = defaults
        self.stream = stream
        self.use_thread = use_thread
        self.template = backend.get_chat_template()
        self.chat = backend.is_chat_model
        self.spec_tokens = num_api_spec_tokens if backend.api_speculative_execution and not stream else None
        self.speculation: Speculation | None = None  # completion models: the surplus of the last speculative call
        self._turn: ChatTurn | None = None  # chat models: the assistant turn being collected
        self.text = ""
        self.images: list[tuple[int, dict]] = []  # (offset in text, content part) of each image appended
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
        # A radixflow runtime retains this state's KV for its session while the program runs; closed at the end.
        self.session_id = (f"program-{uuid.uuid4().hex}" if getattr(backend, "supports_sessions", False)
                           and global_config.enable_program_sessions else None)
        self._session_used = False
        self._handlers: dict[type, Callable[[Any], None]] = {
            Text: self._text, Concat: self._concat, Gen: self._gen, Select: self._select, RoleBegin: self._role_begin,
            RoleEnd: self._role_end, VarScopeBegin: self._scope_begin, VarScopeEnd: self._scope_end,
            Image: self._image, Video: self._video, SeparateReasoning: self._separate_reasoning,
            _ResolveTurn: lambda _: self._resolve_turn(),
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
            self._run(_ResolveTurn())
            self._finish()
        for event in list(self._events.values()):
            event.set()

    def get(self, name: str):
        known = name in self._events
        event = self._event(name)
        if not known and not self._ended and threading.current_thread() is self.owner:
            # Nothing the program appended produces it, and only the program could: waiting would never end.
            raise ProgramError(f"variable {name!r} is read before anything appended to the program produces it")
        if self.chat and self.spec_tokens and threading.current_thread() is self.owner and not event.is_set():
            self.submit(_ResolveTurn())  # it may be waiting in an assistant turn under speculation: fill it now
        if not self._ended:  # after the end nothing more will be produced: a missing variable raises below
            event.wait()
        if name not in self.variables:
            reason = f"the program failed: {self.error!r}" if self.error else "the program ended without it"
            raise ProgramError(f"variable {name!r} was never produced: {reason}") from self.error
        return self.variables[name]

    def is_complete(self, name: str) -> bool:
        return name in self._events and self._events[name].is_set()

    def fork_copy(self) -> StreamExecutor:
        """A child that continues this state (called with the worker idle). An assistant turn still collected
        under speculation is filled first: each child continues the filled text."""
        self._run(_ResolveTurn())
        child = StreamExecutor(self.backend, self.defaults, self.stream, self.use_thread, self.spec_tokens)
        child.text, child.messages = self.text, copy.deepcopy(self.messages)
        child.images, child.speculation = list(self.images), self.speculation
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
                self._run(_ResolveTurn())  # a turn the program never ended
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
            if self._turn is not None and not isinstance(node, (Text, Concat, Gen, Select, RoleEnd, _ResolveTurn)):
                self._resolve_turn()  # anything else needs the turn's text in place
            self._handlers[type(node)](node)
        except BaseException as exc:  # noqa: BLE001 - kept and re-raised where the program reads it
            self.error = exc
            for event in list(self._events.values()):  # the program's thread may add events meanwhile
                event.set()  # readers wake up and see the error instead of waiting forever
            self._notify()

    def _finish(self) -> None:
        if self._session_used:
            self._session_used = False
            try:
                self.backend.close_session(self.session_id)
            except Exception:  # noqa: BLE001 - the program's result stands; the session expires by its TTL
                logger.warning("closing session %s failed", self.session_id, exc_info=True)
        self.finished = True
        self._notify()

    def _session(self) -> dict:
        """The session keyword of a gen call (none for a backend without sessions)."""
        if self.session_id is None:
            return {}
        self._session_used = True
        return {"session_id": self.session_id}

    def _notify(self) -> None:
        with self.progress:
            self.progress.notify_all()

    def _append(self, text: str, var: str | None = None) -> None:
        with self.progress:
            self.text += text
            if self.stream:
                self.pieces.append((text, var))
            self.progress.notify_all()
        if self.speculation is not None:
            self.speculation = self.speculation.consume(text)

    def _text(self, node: Text) -> None:
        if self._turn is not None:
            self._turn.terms.append(Term(node, text=node.value, is_constant=True))
        else:
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
        speculable = params.keys() <= _SPECULABLE and params.get("n", 1) == 1 and not logprob
        if self._turn is not None:
            if speculable:
                self._turn.terms.append(Term(node, name=node.name, stops=list(params.get("stop") or [])))
                for key, value in params.items():  # the turn's one call samples as its first gen asks
                    self._turn.params.setdefault(key, value)
                return
            self._resolve_turn()  # a constrained gen (or n > 1, logprobs) runs on its own, after the turn so far
        if self.spec_tokens and not self.chat and speculable:
            out, meta = self._speculative_gen(params)
            self._append(out, node.name)
            self._set(node.name, out, meta)
        elif params.get("n", 1) > 1:
            # As SGLang: the variable is the list of the n samples, the text continues with the first.
            if self.stream:
                raise ProgramError(f"gen({node.name!r}, n={params['n']}) cannot stream: run it without stream=True")
            outs, metas = self.backend.generate(self._prompt(), params, logprob, **self._session())
            self._append(outs[0], node.name)
            self._set(node.name, list(outs), metas)
        elif self.stream:
            out = ""
            for delta, final in self.backend.generate_stream(self._prompt(), params, logprob, **self._session()):
                out += delta
                if final is not None and node.name is not None:
                    self.meta_info[node.name] = final
                self._append(delta, node.name)
            self._set(node.name, out, self.meta_info.get(node.name))
        else:
            out, meta = self.backend.generate(self._prompt(), params, logprob, **self._session())
            self._append(out, node.name)
            self._set(node.name, out, meta)

    def _speculative_gen(self, params: dict) -> tuple[str, dict]:
        """A completion model's gen under speculation: taken from the surplus of an earlier call where that
        determines it, else from one new call for max(num_api_spec_tokens, max_new_tokens) tokens, no stop."""
        stops, max_tokens = list(params.get("stop") or []), params.get("max_new_tokens", 128)
        if self.speculation is not None and (out := self.speculation.take(stops, max_tokens)) is not None:
            return out, {}
        ask = {**params, "max_new_tokens": max(self.spec_tokens, max_tokens), "stop": []}
        text, meta = self.backend.generate(self.text, ask, _SPEC_LOGPROB)
        tokens = [t for *_, t in meta.get("output_token_logprobs") or []] or None
        finished = (meta.get("finish_reason") or {}).get("type") == "stop"
        self.speculation = Speculation.from_output(text, tokens, finished)
        return self.speculation.take(stops, max_tokens, final=True), meta

    def _select(self, node: Select) -> None:
        if self._turn is not None:
            self._turn.terms.append(Term(node, name=node.name, choices=list(node.choices)))
            return
        result = self.backend.select(self._prompt(), node.choices, node.temperature, node.choices_method)
        self._append(result.decision, node.name)
        self._set(node.name, result.decision, result.meta_info)

    # -- chat models ---------------------------------------------------------------------------------------------
    def _prompt(self) -> str | list[dict]:
        return self._chat_prompt() if self.chat else self.text

    def _chat_prompt(self) -> list[dict]:
        """The conversation a chat model answers: the finished messages, then the open role's text so far (an open
        assistant turn's text is a prefill, which a backend that cannot continue a message leaves out, as SGLang
        does). A program without roles is one user message, as SGLang's chat backends send it."""
        if not self.messages and self._role is None:
            return [self._message("user", 0)]
        messages = list(self.messages)
        if self._role is not None:
            role, start = self._role
            if len(self.text) > start or any(offset >= start for offset, _ in self.images):
                messages.append(self._message(role, start))
        return messages

    def _message(self, role: str, start: int) -> dict:
        """A message of the text since `start`; with images, OpenAI's content parts (text and image_url)."""
        images = [(offset, part) for offset, part in self.images if offset >= start]
        if not images:
            return {"role": role, "content": self.text[start:]}
        parts, cut = [], start
        for offset, part in images:
            if offset > cut:
                parts.append({"type": "text", "text": self.text[cut:offset]})
            parts.append(part)
            cut = offset
        if len(self.text) > cut:
            parts.append({"type": "text", "text": self.text[cut:]})
        return {"role": role, "content": parts}

    def _resolve_turn(self) -> None:
        """Fill the assistant turn collected under speculation from one call (retried, when sampling, while the
        answer does not follow the program's pattern). The terms the answer matched are appended as if generated;
        from the first that did not, the rest run as they would without speculation."""
        turn, self._turn = self._turn, None
        if turn is None:
            return
        matched = 0 if turn.needs_call else len(turn.terms)
        if turn.worth_speculating:
            params = {**turn.params, "max_new_tokens": self.spec_tokens, "stop": [], "n": 1}
            tries = _CHAT_SPEC_TRIES if params.get("temperature", 1.0) > 0 else 1
            for _ in range(tries):
                answer, _meta = self.backend.generate(self._chat_prompt(), params, {})
                matched = turn.match(answer)
                if matched == len(turn.terms):
                    break
        for term in turn.terms[:matched]:
            self._append(term.text, term.name)
            if term.name is not None:
                self._set(term.name, term.text, {"api_speculative": True})
        for term in turn.terms[matched:]:
            self._handlers[type(term.node)](term.node)

    def _set(self, name: str | None, value, meta) -> None:
        if name is None:
            return
        self.variables[name] = value
        self.meta_info[name] = meta if meta is not None else {}
        self._event(name).set()
        self._notify()

    def _role_begin(self, node: RoleBegin) -> None:
        self._begin_role(node)
        if node.role == "assistant" and self.chat and self.spec_tokens:
            self._turn = ChatTurn()

    def _begin_role(self, node: RoleBegin) -> None:
        system_prompt = self.template.default_system_prompt
        if system_prompt and not self.messages and self._role is None and node.role != "system":
            # A named template's default system prompt, as SGLang sends it before a program's first other role.
            self._begin_role(RoleBegin("system"))
            self._append(system_prompt)
            self._role_end(RoleEnd("system"))
        self._append(self.template.prefix(node.role))
        self._role = (node.role, len(self.text))

    def _role_end(self, node: RoleEnd) -> None:
        self._resolve_turn()
        role, start = self._role or (node.role, len(self.text))
        self.messages.append(self._message(role, start))
        self._append(self.template.suffix(node.role))
        self._role = None

    def _scope_begin(self, node: VarScopeBegin) -> None:
        self._scopes[node.name] = len(self.text)

    def _scope_end(self, node: VarScopeEnd) -> None:
        self._set(node.name, self.text[self._scopes.pop(node.name):], None)

    def _image(self, node: Image) -> None:
        # `s += image(...)` already refused a backend without images; the API backends take OpenAI's image parts.
        self.images.append((len(self.text), {"type": "image_url", "image_url": {"url": image_url(node.path)}}))

    def _video(self, node: Video) -> None:
        raise ProgramError(f"video({node.path!r}): {type(self.backend).__name__} cannot take videos")

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


def image_url(path: str) -> str:
    """An image as a URL a provider takes: an http(s) or data: URL as given, a local file as a data: URL."""
    if path.startswith(("http://", "https://", "data:")):
        return path
    file = Path(path)
    if not file.is_file():
        raise ProgramError(f"image({path!r}): not a file, an http(s) URL or a data: URL")
    mime = mimetypes.guess_type(file.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(file.read_bytes()).decode()}"


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
