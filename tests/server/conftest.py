"""Real `radixflow serve` subprocesses on free local ports, shared by the HTTP server tests.

Each server is two processes (HTTP + scheduler) plus multiprocessing's resource tracker. Stopping one sends
SIGTERM to the HTTP process only, as a process supervisor would, and asserts that every process it started is
gone: a server that leaves an orphaned scheduler holding the model and KV memory fails the suite.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

STOP_TIMEOUT_S = 15.0
START_TIMEOUT_S = 120.0
TINY_ARGS = ("--max-total-tokens", "8192", "--log-level", "warning")
API_KEY = "sk-radixflow-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One `radixflow serve` subprocess. `launch` returns at once; `wait_ready` blocks until /health is 200."""

    def __init__(self, args: list[str], workdir: Path, api_key: str | None = None):
        self.args = list(args) + (["--api-key", api_key] if api_key else [])
        self.workdir = workdir
        self.api_key = api_key
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def log(self) -> Path:
        return self.workdir / "server.log"

    def launch(self) -> "ServerProcess":
        self.port = free_port()
        # A private TMPDIR: the IPC socket files land there, so a test can see that shutdown removed them.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(self.workdir / "tmp"), "PYTHONUNBUFFERED": "1"}
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "radixflow", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--num-threads", "1", *self.args]
        with open(self.log, "ab") as log:
            # Own session: a Ctrl-C in the terminal reaches pytest, whose teardown then stops the server in order.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> "ServerProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited during start-up (code {self.proc.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not healthy after {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def scheduler(self) -> psutil.Process:
        """The scheduler child (multiprocessing spawns it with `spawn_main` on its command line)."""
        found = [p for p in self.descendants() if any("spawn_main" in part for part in p.cmdline())]
        assert len(found) == 1, f"expected one scheduler child, found {found}"
        return found[0]

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> float:
        """SIGTERM the HTTP process; assert it and every process it started exit within `timeout_s`.

        Returns the seconds it took. Whatever is still alive at the deadline is SIGKILLed (so a failing test
        leaves no orphans behind) and the assertion names it.
        """
        if self.proc is None:
            return 0.0
        if self.proc.poll() is not None:
            stragglers = [p for p in self._session_members() if p.is_running()]
            self._kill(stragglers)
            assert not stragglers, f"server already exited but left {stragglers} running"
            return 0.0
        started = time.monotonic()
        family = [psutil.Process(self.proc.pid), *self.descendants()]
        self.proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(family, timeout=timeout_s)
        elapsed = time.monotonic() - started
        self._kill(alive)
        self.proc.wait(timeout=5)
        assert not alive, (f"still running {timeout_s:.0f}s after SIGTERM: "
                           f"{[(p.pid, p.name()) for p in alive if p.is_running()]}\n{self.log_tail()}")
        return elapsed

    def _session_members(self) -> list[psutil.Process]:
        """Processes left in the server's session (its orphans are reparented, but keep the session id)."""
        members = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getsid(p.pid) == self.proc.pid:
                    members.append(p)
            except (ProcessLookupError, PermissionError):
                continue
        return members

    @staticmethod
    def _kill(procs: list[psutil.Process]) -> None:
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def start_servers(*servers: ServerProcess) -> tuple[ServerProcess, ...]:
    """Launch several servers at once (their model loads overlap), then wait for all of them."""
    for server in servers:
        server.launch()
    try:
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            ServerProcess._kill([*server.descendants(), psutil.Process(server.proc.pid)])
        raise
    return servers


def tiny_server_process(tmp_path_factory, model_dir: Path, name: str, api_key: str | None = None) -> ServerProcess:
    return ServerProcess(["--model-path", str(model_dir), *TINY_ARGS], tmp_path_factory.mktemp(name), api_key)


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir, tmp_path_factory):
    """The tiny random Llama behind a server; most tests share it (they must leave it idle and healthy)."""
    (server,) = start_servers(tiny_server_process(tmp_path_factory, tiny_model_dir, "tiny-server"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smol_server(tmp_path_factory):
    """The embedded SmolLM2-135M-Instruct: for the few tests that need meaningful text."""
    (server,) = start_servers(ServerProcess(["--max-total-tokens", "8192", "--log-level", "warning"],
                                            tmp_path_factory.mktemp("smol-server")))
    yield server
    server.stop()


@pytest.fixture
def client(tiny_server):
    with httpx.Client(base_url=tiny_server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def model_name(tiny_server) -> str:
    return httpx.get(f"{tiny_server.url}/v1/models", timeout=10).json()["data"][0]["id"]


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def wait_idle(client: httpx.Client, timeout_s: float = 20.0) -> dict:
    """Poll /get_server_info until nothing runs or waits; returns the stats."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.get("/get_server_info").json()["stats"]
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            return stats
        assert time.monotonic() < deadline, f"server still busy after {timeout_s}s: {stats}"
        time.sleep(0.05)


def assert_no_kv_leak(client: httpx.Client) -> None:
    stats = wait_idle(client)
    check = client.get("/debug/check_integrity")
    assert check.status_code == 200, check.text
    assert stats["kv_free_tokens"] + stats["kv_evictable_tokens"] == stats["kv_total_tokens"], stats


def sse_events(lines) -> list:
    """Parse SSE `data:` lines into JSON payloads; the closing "[DONE]" is kept as the string."""
    import json

    events = []
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        payload = line.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
