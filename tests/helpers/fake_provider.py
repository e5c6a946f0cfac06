"""A loopback stand-in for a remote model provider's HTTP API (Gemini, or an OpenAI-format endpoint behind LiteLLM),
for the providers that cannot run here: it records every request and answers from a script.

`FakeProvider(answer)`: `answer(path, body)` returns `(status, json_body)` or `(200, [events])` for an SSE stream.
`fail_next(status, body, times)` makes the next requests fail first (for retries).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: dict


class FakeProvider:
    def __init__(self, answer: Callable[[str, dict], tuple[int, dict | list]]):
        self.answer = answer
        self.requests: list[Recorded] = []
        self._failures: list[tuple[int, dict]] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail_next(self, status: int, body: dict, times: int = 1) -> None:
        with self._lock:
            self._failures += [(status, body)] * times

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _respond(self, path: str, body: dict) -> tuple[int, dict | list]:
        with self._lock:
            if self._failures:
                return self._failures.pop(0)
        return self.answer(path, body)

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                headers = {k.lower(): v for k, v in self.headers.items()}
                with fake._lock:
                    fake.requests.append(Recorded("POST", self.path, headers, body))
                status, payload = fake._respond(self.path, body)
                if isinstance(payload, list):  # an SSE stream
                    data = "".join(f"data: {json.dumps(event)}\n\n" for event in payload).encode()
                    content_type = "text/event-stream"
                else:
                    data, content_type = json.dumps(payload).encode(), "application/json"
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # quiet
                pass

        return Handler
