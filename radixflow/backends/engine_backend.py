"""Frontend backend over an in-process `Engine` (no HTTP)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from radixflow.backends.base import RuntimeBackend
from radixflow.lang.chat_template import RoleTemplate

if TYPE_CHECKING:  # the engine builds its backend (`Engine.endpoint`), so this module must not import it
    from radixflow.engine import Engine


class EngineBackend(RuntimeBackend):
    def __init__(self, engine: Engine):
        self.engine = engine
        tokenizer = self.engine.tokenizer
        self.chat_template = (RoleTemplate.from_renderer(
            lambda m, g: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=g))
            if tokenizer.chat_template else RoleTemplate.plain())

    def get_model_name(self) -> str:
        return str(self.engine.core.loaded.source.path)

    supports_sessions = True

    def _generate(self, prompts, params, logprob, session_id=None):
        source = "input_ids" if isinstance(prompts[0], list) else "prompt"
        return self.engine.generate(**{source: prompts}, sampling_params=params, session_id=session_id, **logprob)

    def generate_stream(self, text, params, logprob, session_id=None):
        meta = None
        for chunk in self.engine.generate(text, params, stream=True, session_id=session_id, **logprob):
            meta = chunk["meta_info"] if chunk["finished"] else None
            yield chunk["text"], meta

    def close_session(self, session_id: str) -> None:
        self.engine.close_session(session_id, wait=False)

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def get_server_info(self) -> dict:
        return {"stats": self.engine.stats()}
