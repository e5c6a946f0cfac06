"""Role markers for `system` / `user` / `assistant` blocks.

By default they are derived from the model's own chat template: the template is rendered with a marker as the
message content, and what surrounds the marker is the role's prefix and suffix, so any Jinja chat template the
model ships works without a hand-written table. Programs that pick a template by name get SGLang's
`ChatTemplate`s from a registry (`get_chat_template("chatml")`, `register_chat_template(...)`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from jinja2.sandbox import ImmutableSandboxedEnvironment

_MARK = "\x00radixflow-content\x00"

Renderer = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> prompt text


@dataclass(frozen=True)
class RoleTemplate:
    prefixes: dict[str, str]
    suffixes: dict[str, str]
    default_system_prompt = None  # a derived template already renders the model's own default
    stop_str: tuple[str, ...] = ()

    def prefix(self, role: str) -> str:
        return self.prefixes.get(role, "")

    def suffix(self, role: str) -> str:
        return self.suffixes.get(role, "")

    @classmethod
    def plain(cls) -> "RoleTemplate":
        """For backends without a template: "Role: content\\n"."""
        roles = ("system", "user", "assistant")
        return cls({r: f"{r.capitalize()}: " for r in roles}, {r: "\n" for r in roles})

    @classmethod
    def from_renderer(cls, render: Renderer) -> "RoleTemplate":
        """Each role's markers are what its message adds after a plausible history. Histories start with a system
        message where the template allows one (some inject a default system prompt otherwise); a role no history
        renders (a template that refuses system messages, say) keeps the plain markers."""
        plain = cls.plain()
        prefixes, suffixes = dict(plain.prefixes), dict(plain.suffixes)
        for role, histories in _HISTORIES.items():
            for history in histories:
                markers = _markers(render, history, role)
                if markers is not None:
                    prefixes[role], suffixes[role] = markers
                    break
        return cls(prefixes, suffixes)


_SYSTEM, _USER, _ASSISTANT = ({"role": role, "content": role[0].upper()} for role in ("system", "user", "assistant"))
# A user turn after an exchange, not first: the first message may carry the BOS token, which the tokenizer adds.
_HISTORIES = {"system": [[]], "user": [[_SYSTEM], [_USER, _ASSISTANT], []], "assistant": [[_SYSTEM, _USER], [_USER]]}


def _markers(render: Renderer, history: list[dict], role: str) -> tuple[str, str] | None:
    try:
        base = render(history, False) if history else ""  # transformers refuses to render no messages
        full = render(history + [{"role": role, "content": _MARK}], False)
    except Exception:  # noqa: BLE001 - templates reject histories with raise_exception; try the next one
        return None
    if not full.startswith(base) or _MARK not in full:
        return None
    before, _, after = full[len(base):].partition(_MARK)
    return before, after


def jinja_renderer(template: str, bos_token: str = "", eos_token: str = "") -> Renderer:
    """Render a Hugging Face chat template the way transformers does (sandboxed Jinja, raise_exception)."""
    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)
    return lambda messages, gen_prompt: compiled.render(messages=messages, add_generation_prompt=gen_prompt,
                                                        bos_token=bos_token, eos_token=eos_token)


@dataclass
class ChatTemplate:
    """SGLang's named chat template: each role's (prefix, suffix); a system prompt sent when a program starts
    with another role; extra stop strings for every `gen`."""

    name: str
    default_system_prompt: str | None
    role_prefix_and_suffix: dict[str, tuple[str, str]]
    stop_str: tuple[str, ...] | list[str] = ()
    image_token: str = "<image>"
    audio_token: str = "<audio>"
    style: str = "plain"

    def prefix(self, role: str) -> str:
        return self.role_prefix_and_suffix.get(role, ("", ""))[0]

    def suffix(self, role: str) -> str:
        return self.role_prefix_and_suffix.get(role, ("", ""))[1]

    def get_prefix_and_suffix(self, role: str, hist_messages: list[dict] | None = None) -> tuple[str, str]:
        return self.prefix(role), self.suffix(role)


_REGISTRY: dict[str, ChatTemplate] = {}


def register_chat_template(template: ChatTemplate) -> None:
    _REGISTRY[template.name] = template


def get_chat_template(name: str) -> ChatTemplate:
    if name not in _REGISTRY:
        raise ValueError(f"chat template {name!r} is not registered; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _chatml(name: str, system_prompt: str | None = None) -> ChatTemplate:
    roles = {r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ("system", "user", "assistant")}
    return ChatTemplate(name, system_prompt, roles, stop_str=("<|im_end|>",))


def _llama3_roles() -> dict[str, tuple[str, str]]:
    return {r: (f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>") for r in ("system", "user", "assistant")}


for _template in (
    ChatTemplate("default", None, {"system": ("SYSTEM:", "\n"), "user": ("USER:", "\n"),
                                   "assistant": ("ASSISTANT:", "\n")}),
    # Chat APIs take roles as messages: the text has no markers (SGLang's "chatgpt").
    ChatTemplate("chatgpt", None, {r: ("", "") for r in ("system", "user", "assistant")}),
    ChatTemplate("claude", None, {"system": ("", ""), "user": ("\n\nHuman: ", ""),
                                  "assistant": ("\n\nAssistant:", "")}),
    _chatml("chatml"),
    _chatml("qwen", "You are a helpful assistant."),
    ChatTemplate("vicuna_v1.1", "A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions.",
                 {"system": ("", " "), "user": ("USER:", " "), "assistant": ("ASSISTANT:", "</s>")}),
    ChatTemplate("llama-2-chat", None, {"system": ("<<SYS>>\n", "\n<</SYS>>\n\n"), "user": ("[INST] ", " [/INST]"),
                                        "assistant": ("", " </s><s>")},
                 stop_str=("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")),
    ChatTemplate("llama-3-instruct", None, _llama3_roles(), stop_str=("<|eot_id|>",)),
    ChatTemplate("mistral", None, {"system": ("[SYSTEM_PROMPT] ", " [/SYSTEM_PROMPT]"),
                                   "user": ("[INST] ", " [/INST]"), "assistant": ("", " </s><s>")},
                 stop_str=("</s>",)),
):
    register_chat_template(_template)
