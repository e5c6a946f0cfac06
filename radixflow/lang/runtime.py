"""`Runtime`: launch a radixflow server in a subprocess and talk to it through `RuntimeEndpoint`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from radixflow.backends.runtime_endpoint import RuntimeEndpoint


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Runtime:
    """`Runtime(model_path=..., **server_flags)`; use as a backend (`set_default_backend(runtime)`)."""

    def __init__(self, model_path: str | None = None, port: int | None = None, api_key: str | None = None,
                 startup_timeout_s: float = 600.0, log_level: str = "warning", **flags):
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "radixflow", "serve", "--port", str(self.port), "--log-level", log_level]
        if model_path:
            command += ["--model-path", str(model_path)]
        if api_key:
            command += ["--api-key", api_key]
        for key, value in flags.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                command.append(flag)
            elif value not in (False, None):
                command += [flag, str(value)]
        self.process = subprocess.Popen(command, start_new_session=True)
        self._wait_ready(startup_timeout_s)
        self.endpoint = RuntimeEndpoint(self.url, api_key)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited during start-up (code {self.process.returncode})")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.shutdown()
        raise RuntimeError(f"server not ready after {timeout_s:.0f}s")

    def shutdown(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
