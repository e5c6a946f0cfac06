"""The frontend's backend interface, and the shared logic of backends that talk to a radixflow runtime.

Every method has a harmless default or a clear error, so one suite of programs runs against every backend.
A runtime backend needs only `_generate(prompts, params, logprob)` returning SGLang-shaped results (and
optionally `_generate_stream`); `select` scoring is built on it here.
"""

from __future__ import annotations

from collections.abc import Iterator

from radixflow.lang.chat_template import RoleTemplate
from radixflow.lang.choices import ChoiceResult, ChoiceScores, token_length_normalized

# Prompt logprobs start this many tokens before the end of the prefix, so a token that merges the end of the
# prefix with the start of a choice (the paper's token-boundary problem) is seen and scored with the choice.
_HEAL_WINDOW = 3


class BaseBackend:
    def get_chat_template(self) -> RoleTemplate:
        return RoleTemplate.plain()

    def cache_prefix(self, text: str) -> None:
        """Compute and cache a shared prefix before forked children use it (no-op where there is no cache)."""

    def generate(self, text: str, params: dict, logprob: dict) -> tuple[str, dict]:
        raise NotImplementedError(f"{type(self).__name__} cannot generate")

    def generate_stream(self, text: str, params: dict, logprob: dict) -> Iterator[tuple[str, dict | None]]:
        """(text increment, meta or None until the end). Default: one increment with the whole output."""
        out, meta = self.generate(text, params, logprob)
        yield out, meta

    def select(self, text: str, choices: list[str], temperature: float, method) -> ChoiceResult:
        raise NotImplementedError(f"{type(self).__name__} cannot score choices")

    def supports_images(self) -> bool:
        return False

    def flush_cache(self) -> bool:
        return True

    def get_server_info(self) -> dict:
        return {}

    def shutdown(self) -> None:
        pass


class RuntimeBackend(BaseBackend):
    """A backend over radixflow's native generate semantics (in-process Engine or HTTP /generate)."""

    def _generate(self, prompts: list[str], params: list[dict], logprob: dict) -> list[dict]:
        raise NotImplementedError

    def cache_prefix(self, text: str) -> None:
        if text:
            self._generate([text], [{"max_new_tokens": 0}], {})

    def generate(self, text, params, logprob):
        result = self._generate([text], [params], logprob)[0]
        return result["text"], result["meta_info"]

    def select(self, text, choices, temperature, method=None):
        method = method or token_length_normalized
        prefix_len = self._generate([text], [{"max_new_tokens": 0}], {})[0]["meta_info"]["prompt_tokens"]
        start = max(prefix_len - _HEAL_WINDOW, 0)
        prompts = [text] + [text + c for c in choices]
        results = self._generate(prompts, [{"max_new_tokens": 0}] * len(prompts),
                                 {"return_logprob": True, "logprob_start_len": start})
        prefix_tail = [t for _, t, _ in results[0]["meta_info"]["input_token_logprobs"]]
        scores = []
        for result in results[1:]:
            entries = result["meta_info"]["input_token_logprobs"]
            same = 0
            while same < len(prefix_tail) and same < len(entries) and entries[same][1] == prefix_tail[same]:
                same += 1
            scores.append([lp for lp, _, _ in entries[same:] if lp is not None] or [0.0])
        unconditional = None
        if method.requires_unconditional_logprobs:
            plain = self._generate(list(choices), [{"max_new_tokens": 0}] * len(choices),
                                   {"return_logprob": True, "logprob_start_len": 0})
            unconditional = [[lp for lp, _, _ in r["meta_info"]["input_token_logprobs"] if lp is not None] or [0.0]
                             for r in plain]
            # Align lengths: the unconditional run has no context for the first token of the choice.
            unconditional = [u[-len(c):] if len(u) >= len(c) else [0.0] * (len(c) - len(u)) + u
                             for u, c in zip(unconditional, scores)]
        return method(ChoiceScores(list(choices), scores, unconditional))
