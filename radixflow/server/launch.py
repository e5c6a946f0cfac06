"""`ServerProcess`: one `radixflow serve` in a subprocess (SGLang's `popen_launch_server`). `Runtime`, the serving
benchmark and the test suite all start servers with it.

Only the standard library and httpx: launching a server must not import the server (or torch) into the caller.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`radixflow serve [args]` (or `radixflow router [args]`) on a free local port, with its output in `log`.

    `start()` returns at once; `wait_ready()` blocks until /health answers 200 (and, if another process took the
    port meanwhile, starts again on a new one). The server runs in its own session, so `stop()` can reach every
    process it started.
    """

    def __init__(self, args: list[str] | tuple[str, ...] = (), api_key: str | None = None,
                 log: Path | None = None, env: dict[str, str] | None = None, cwd: Path | None = None,
                 command: str = "serve"):
        self.command = command  # or "router": `radixflow router [args]`
        self.args = [*args, *(["--api-key", api_key] if api_key else [])]
        self.api_key = api_key
        self.log = log or Path(tempfile.mkstemp(prefix="radixflow-serve-", suffix=".log")[1])
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, port: int | None = None) -> ServerProcess:
        self.port = port or free_port()
        cmd = [sys.executable, "-m", "radixflow", self.command, "--host", "127.0.0.1", "--port", str(self.port),
               *self.args]
        with open(self.log, "ab") as log:
            # Own session: a Ctrl-C in the caller's terminal does not reach it; `stop` ends it in order.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                         start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = 600.0, port_retries: int = 2) -> ServerProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if port_retries and "address already in use" in self.log_tail().lower():
                    port_retries -= 1  # another process took the port we picked during our start-up: try another
                    self.start()
                    continue
                raise RuntimeError(f"server exited during start-up (code {self.proc.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the server (it stops its scheduler itself), then SIGKILL to its whole session if it is
        still there after `timeout_s`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
