"""Role markers for `system` / `user` / `assistant` blocks, derived from the model's own chat template.

The template is rendered with a marker as the message content; what surrounds the marker is the role's prefix
and suffix. So any Jinja chat template the model ships works without a hand-written table.
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
