"""The frontend's backend interface, and the shared logic of backends that talk to a radixflow runtime.

Every method has a harmless default or a clear error, so one suite of programs runs against every backend.
A runtime backend needs only `_generate(prompts, params, logprob)` (prompts: texts, or token-id lists) returning
SGLang-shaped results (and optionally `generate_stream`); `select` scoring is built on it here.
"""

from __future__ import annotations

from collections.abc import Iterator

from radixflow.lang.chat_template import RoleTemplate
from radixflow.lang.choices import ChoicesDecision, ChoicesSamplingMethod, token_length_normalized

# Prompt logprobs start this many tokens before the end of the prefix, so a token that merges the end of the
# prefix with the start of a choice (the paper's token-boundary problem) is seen and scored with the choice.
_HEAL_WINDOW = 3


class BaseBackend:
    chat_template = RoleTemplate.plain()  # settable, as in SGLang (`backend.chat_template = get_chat_template(...)`)
    # A chat model is asked with the conversation (a list of {"role", "content"} messages) instead of the text; see
    # the interpreter's `_chat_prompt`. The API backends set it; runtime backends take text.
    is_chat_model = False
    # `@function(num_api_spec_tokens=N)` speculates on this backend (radixflow/lang/speculative.py): worth it where
    # each call costs a round trip and a prompt's tokens (API models), not where a radix cache keeps the prefix.
    api_speculative_execution = False

    def get_chat_template(self):
        return self.chat_template

    def cache_prefix(self, text: str) -> None:
        """Compute and cache a shared prefix before forked children use it (no-op where there is no cache)."""

    def generate(self, text: str, params: dict, logprob: dict) -> tuple[str | list[str], dict | list[dict]]:
        """(text, meta info); with `params["n"] > 1`, the n texts and their meta infos."""
        raise NotImplementedError(f"{type(self).__name__} cannot generate")

    def generate_stream(self, text: str, params: dict, logprob: dict) -> Iterator[tuple[str, dict | None]]:
        """(text increment, meta or None until the end). Default: one increment with the whole output."""
        out, meta = self.generate(text, params, logprob)
        yield out, meta

    def select(self, text: str, choices: list[str], temperature: float,
               method: ChoicesSamplingMethod | None) -> ChoicesDecision:
        raise NotImplementedError(f"{type(self).__name__} cannot score choices")

    def supports_images(self) -> bool:
        return False

    def get_model_name(self) -> str | None:
        return None

    def flush_cache(self) -> bool:
        return True

    def get_server_info(self) -> dict:
        return {}

    def shutdown(self) -> None:
        pass

    # Sessions (a radixflow runtime's cache retains a session's KV until it is closed): a backend without them
    # takes no session_id and has nothing to close.
    supports_sessions = False

    def close_session(self, session_id: str) -> None:
        pass


class RuntimeBackend(BaseBackend):
    """A backend over radixflow's native generate semantics (in-process Engine or HTTP /generate)."""

    def _generate(self, prompts: list[str], params: list[dict], logprob: dict,
                  session_id: str | None = None) -> list[dict]:
        raise NotImplementedError

    def cache_prefix(self, text: str) -> None:
        if text:
            self._generate([text], [{"max_new_tokens": 0}], {})

    def generate(self, text, params, logprob, session_id: str | None = None):
        # A session id only reaches backends that declare `supports_sessions` (their `_generate` takes it).
        results = self._generate([text], [params], logprob, **({"session_id": session_id} if session_id else {}))
        if params.get("n", 1) > 1:
            return [r["text"] for r in results], [r["meta_info"] for r in results]
        return results[0]["text"], results[0]["meta_info"]

    def select(self, text, choices, temperature, method=None):
        """Score every choice in one batched request (prompt logprobs, no generation) and let `method` decide.

        The logprobs start a few tokens before the end of the prefix: a token that merges the end of the prefix
        with the start of a choice is then scored as part of the choice (token healing)."""
        method = method or token_length_normalized
        prefix_len = self._generate([text], [{"max_new_tokens": 0}], {})[0]["meta_info"]["prompt_tokens"]
        start = max(prefix_len - _HEAL_WINDOW, 0)
        prompts = [text] + [text + c for c in choices]
        results = self._generate(prompts, [{"max_new_tokens": 0}] * len(prompts),
                                 {"return_logprob": True, "logprob_start_len": start, "return_text_in_logprobs": True})
        prefix_tail = [t for _, t, _ in results[0]["meta_info"]["input_token_logprobs"]]
        inputs, outputs = [], []
        for result in results[1:]:
            entries = result["meta_info"]["input_token_logprobs"]
            same = 0
            while same < len(prefix_tail) and same < len(entries) and entries[same][1] == prefix_tail[same]:
                same += 1
            inputs.append([tuple(e) for e in entries[same:] if e[0] is not None])
            outputs.append([tuple(e) for e in result["meta_info"].get("output_token_logprobs", [])])
        normalized = [sum(lp for lp, *_ in e) / len(e) if e else 0.0 for e in inputs]
        unconditional = self._unconditional(inputs) if method.requires_unconditional_logprobs else None
        return method(choices=list(choices), normalized_prompt_logprobs=normalized, input_token_logprobs=inputs,
                      output_token_logprobs=outputs, unconditional_token_logprobs=unconditional)

    def _unconditional(self, inputs: list[list[tuple]]) -> list[list[tuple]]:
        """Logprobs of exactly the tokens each choice was scored on, with no context (as SGLang does): a choice
        re-tokenized on its own ("Berlin" vs the healed " Berlin") would compare different tokens. The first
        token has no context at all: its logprob is None."""
        present = [[t for _, t, *_ in entries] for entries in inputs if entries]  # an empty choice scores nothing
        results = iter(self._generate(present, [{"max_new_tokens": 0}] * len(present),
                                      {"return_logprob": True, "logprob_start_len": 0,
                                       "return_text_in_logprobs": True}) if present else ())
        return [[tuple(e) for e in next(results)["meta_info"]["input_token_logprobs"]] if entries else []
                for entries in inputs]
