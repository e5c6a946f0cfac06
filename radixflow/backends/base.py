"""The frontend's backend interface, and the shared logic of backends that talk to a radixflow runtime.

Every method has a harmless default or a clear error, so one suite of programs runs against every backend.
A runtime backend needs only `_generate(prompts, params, logprob)` (prompts: texts, or token-id lists) returning
SGLang-shaped results (and optionally `generate_stream`); `select` scoring is built on it here.
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
        scores, scored_ids = [], []
        for result in results[1:]:
            entries = result["meta_info"]["input_token_logprobs"]
            same = 0
            while same < len(prefix_tail) and same < len(entries) and entries[same][1] == prefix_tail[same]:
                same += 1
            scores.append([lp for lp, _, _ in entries[same:] if lp is not None] or [0.0])
            scored_ids.append([t for lp, t, _ in entries[same:] if lp is not None])
        unconditional = None
        if method.requires_unconditional_logprobs:
            unconditional = self._unconditional(scored_ids)
        return method(ChoiceScores(list(choices), scores, unconditional))

    def _unconditional(self, scored_ids: list[list[int]]) -> list[list[float]]:
        """Logprobs of exactly the tokens each choice was scored on, with no context (as SGLang does): a choice
        re-tokenized on its own ("Berlin" vs the healed " Berlin") would compare different tokens. The first
        token has no context at all and counts 0."""
        present = [ids for ids in scored_ids if ids]  # an empty choice scored no token
        results = iter(self._generate(present, [{"max_new_tokens": 0}] * len(present),
                                      {"return_logprob": True, "logprob_start_len": 0}) if present else ())

        def logprobs(result: dict) -> list[float]:
            return [lp or 0.0 for lp, _, _ in result["meta_info"]["input_token_logprobs"]]
        return [logprobs(next(results)) if ids else [0.0] for ids in scored_ids]
