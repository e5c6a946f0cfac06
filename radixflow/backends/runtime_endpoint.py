"""Frontend backend over a radixflow (or SGLang) server's native HTTP API."""

from __future__ import annotations

import json

import httpx

from radixflow.backends.base import RuntimeBackend
from radixflow.lang.chat_template import RoleTemplate, get_chat_template, jinja_renderer


class RuntimeEndpoint(RuntimeBackend):
    """SGLang's `RuntimeEndpoint(base_url, api_key=None, verify=None, chat_template_name=None)`: `verify` is
    httpx's TLS verification (True, False, or a CA bundle path); `chat_template_name` picks a registered template
    instead of the one derived from the served model's (`chat_template` can also be set afterwards)."""

    def __init__(self, base_url: str, api_key: str | None = None, verify=None, chat_template_name: str | None = None,
                 timeout: float = 600.0):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                   verify=True if verify is None else verify)
        self.model_info = self._get("/get_model_info")
        # Sessions are radixflow's (an SGLang server would refuse the field): known by the figures it reports.
        try:
            stats = self._get("/get_server_info").get("stats")
        except httpx.HTTPError:  # a server or router without it
            stats = None
        self.supports_sessions = isinstance(stats, dict) and "sessions_open" in stats
        template = self.model_info.get("chat_template")
        if chat_template_name is not None:
            self.chat_template = get_chat_template(chat_template_name)
        elif template:
            self.chat_template = RoleTemplate.from_renderer(jinja_renderer(
                template, self.model_info.get("bos_token") or "", self.model_info.get("eos_token") or ""))
        else:
            self.chat_template = RoleTemplate.plain()

    def get_model_name(self) -> str:
        return self.model_info["model_path"]

    def _get(self, path: str) -> dict:
        response = self.client.get(path)
        response.raise_for_status()
        return response.json()


    def _generate(self, prompts, params, logprob, session_id=None):
        source = "input_ids" if isinstance(prompts[0], list) else "text"
        body = {source: prompts, "sampling_params": params, **logprob}
        if session_id is not None:
            body["session_id"] = session_id
        response = self.client.post("/generate", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"server answered {response.status_code}: {response.text}")
        return response.json()

    def generate_stream(self, text, params, logprob, session_id=None):
        seen = ""
        body = {"text": text, "sampling_params": params, "stream": True, **logprob}
        if session_id is not None:
            body["session_id"] = session_id
        with self.client.stream("POST", "/generate", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"server answered {response.status_code}: {response.read().decode()}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                delta, seen = chunk["text"][len(seen):], chunk["text"]  # the native stream is cumulative
                finished = chunk["meta_info"].get("finish_reason") is not None
                yield delta, chunk["meta_info"] if finished else None

    def close_session(self, session_id: str) -> None:
        # 404 (never opened: the program made no gen call; or expired) is as good as closed. An SGLang server has no
        # such endpoint: nothing to release there either.
        self.client.post("/close_session", json={"session_id": session_id})

    def flush_cache(self) -> bool:
        return self.client.post("/flush_cache").status_code == 200

    def get_server_info(self) -> dict:
        return self._get("/get_server_info")

    def shutdown(self) -> None:
        self.client.close()
