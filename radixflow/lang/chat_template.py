"""Role markers for `system` / `user` / `assistant` blocks, derived from the model's own chat template.

The template is rendered with a marker as the message content; what surrounds the marker is the role's prefix
and suffix. So any Jinja chat template the model ships works without a hand-written table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
        prefixes, suffixes = {}, {}
        prefixes["system"], suffixes["system"] = _split(render([{"role": "system", "content": _MARK}], False))
        base_messages = [{"role": "system", "content": "S"}]
        base = render(base_messages, False)
        for role in ("user", "assistant"):
            full = render(base_messages + [{"role": role, "content": _MARK}], False)
            if not full.startswith(base):
                full, base_len = render([{"role": role, "content": _MARK}], False), 0
            else:
                base_len = len(base)
            prefixes[role], suffixes[role] = _split(full[base_len:])
        return cls(prefixes, suffixes)


def _split(rendered: str) -> tuple[str, str]:
    before, _, after = rendered.partition(_MARK)
    return before, after


def jinja_renderer(template: str, bos_token: str = "", eos_token: str = "") -> Renderer:
    """Render a Hugging Face chat template the way transformers does (sandboxed Jinja, raise_exception)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)
    return lambda messages, gen_prompt: compiled.render(messages=messages, add_generation_prompt=gen_prompt,
                                                        bos_token=bos_token, eos_token=eos_token)
