"""`--tree-source events`: the router's per-worker trees built from what each worker reports it cached.

Each radixflow server logs its radix cache's inserted and evicted prefixes (runtime/cache/events.py) and serves
them, decoded to text, at `GET /cache_events?since=N`. The router polls every worker and replays the events on
that worker's tree, so the tree follows the worker's real cache (evictions included) instead of guessing from the
texts sent. The texts then are prompts as the worker tokenized them, so the router renders a chat request with the
model's chat template (from the worker's /get_model_info) before matching it.
"""

from __future__ import annotations

import json
import logging

import httpx
from jinja2.sandbox import ImmutableSandboxedEnvironment

from radixflow.router.policy import Worker
from radixflow.router.tree import PrefixTree

logger = logging.getLogger(__name__)


class CacheEventFeed:
    def __init__(self, client: httpx.AsyncClient):
        self.client = client
        self._next: dict[Worker, int] = {}  # the first event a worker has not sent us yet
        self._template = None
        self._model_info: dict = {}

    async def poll(self, worker: Worker) -> None:
        try:
            r = await self.client.get(worker.url + "/cache_events", params={"since": self._next.get(worker, 0)},
                                      timeout=5)
            data = r.json()
            if not self._model_info:
                self._set_model_info((await self.client.get(worker.url + "/get_model_info", timeout=5)).json())
        except (httpx.HTTPError, ValueError) as exc:
            logger.debug("cache events of %s: %s", worker.url, exc)
            return  # the health checker decides about the worker
        if data["lost"]:  # we fell behind the worker's log (or it restarted): start over from what it sends now
            worker.tree = PrefixTree()
        for event in data["events"]:
            match event["op"]:
                case "insert":
                    worker.tree.insert(event["text"])
                case "evict":
                    worker.tree.remove(event["text"])
                case "clear":
                    worker.tree = PrefixTree()
        self._next[worker] = data["next"]

    def forget(self, worker: Worker) -> None:
        self._next.pop(worker, None)

    def _set_model_info(self, info: dict) -> None:
        self._model_info = info
        if info.get("chat_template"):
            self._template = ImmutableSandboxedEnvironment().from_string(info["chat_template"])

    def prompt_text(self, path: str, body: dict) -> str:
        """The prompt text the worker will tokenize: the text itself, or a chat request through the template."""
        if path == "/generate":
            text = body.get("text")
            return text[0] if isinstance(text, list) and text else text if isinstance(text, str) else ""
        if path == "/v1/completions":
            prompt = body.get("prompt")
            return prompt[0] if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) else \
                prompt if isinstance(prompt, str) else ""
        if self._template is None or not isinstance(body.get("messages"), list):
            return ""
        messages = [{"role": m.get("role"), "content": _text(m.get("content"))}
                    for m in body["messages"] if isinstance(m, dict)]
        if body.get("system"):
            messages.insert(0, {"role": "system", "content": _text(body["system"])})
        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         bos_token=self._model_info.get("bos_token") or "",
                                         eos_token=self._model_info.get("eos_token") or "")
        except Exception:  # noqa: BLE001 - a template this render cannot run: route without a match
            return ""


def _text(content) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else json.dumps(content)
