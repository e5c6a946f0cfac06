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
KEYED_POOL = 64


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
        self._family: list[psutil.Process] = []
        self._term_sent = 0.0

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
        retries = 2
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if retries and "address already in use" in self.log_tail().lower():
                    retries -= 1  # another process took the free port during our start-up: try another
                    self.log.rename(self.log.with_suffix(f".{retries}.log"))
                    self.launch()
                    continue
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

    def terminate(self) -> None:
        """Send SIGTERM to the HTTP process only, as a process supervisor would; `wait_stopped` checks the rest."""
        if self.proc is None or self.proc.poll() is not None:
            self._family = []
            return
        self._family = [psutil.Process(self.proc.pid), *self.descendants()]
        self._term_sent = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout_s: float = STOP_TIMEOUT_S) -> float:
        """Assert the server and every process it started exit within `timeout_s` of SIGTERM; returns the seconds.

        Whatever is still alive at the deadline is SIGKILLed (a failing test leaves no orphans behind) and the
        assertion names it.
        """
        if not self._family:  # it was already gone when terminated: check that it left nothing behind
            stragglers = [p for p in self._session_members() if p.is_running()]
            self._kill(stragglers)
            assert not stragglers, f"server exited but left {stragglers} running"
            return 0.0
        names = {p.pid: _describe(p) for p in self._family}
        _, alive = psutil.wait_procs(self._family, timeout=max(timeout_s - (time.monotonic() - self._term_sent), 0))
        elapsed = time.monotonic() - self._term_sent
        self._family = []
        self._kill(alive)
        self.proc.wait(timeout=5)
        assert not alive, (f"still running {timeout_s:.0f}s after SIGTERM: {[names[p.pid] for p in alive]}\n"
                           f"{self.log_tail()}")
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


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:120]}"
    except psutil.Error:  # a zombie has no command line left
        return str(proc.pid)


class Fleet:
    """Every server the selected tests need, launched together at the start so their model loads overlap
    (on two cores that saves most of a server start per extra server), and stopped together at the end."""

    def __init__(self, specs: dict[str, ServerProcess]):
        self.servers = specs
        self._ready: set[str] = set()
        for server in specs.values():
            server.launch()

    def get(self, name: str) -> ServerProcess:
        server = self.servers[name]
        if name not in self._ready:
            server.wait_ready()
            self._ready.add(name)
        return server

    def stop_all(self) -> None:
        for server in self.servers.values():
            server.terminate()
        failures = []
        for name, server in self.servers.items():
            try:
                server.wait_stopped()
            except AssertionError as exc:
                failures.append(f"{name}: {exc}")
            # A handled bad request logs nothing: a traceback here is a bug even if every response looked right.
            log = server.log.read_text(errors="replace") if server.log.exists() else ""
            if name not in EXPECTED_ERRORS and ("Traceback" in log or "ERROR" in log):
                failures.append(f"{name} logged errors:\n{log[-4000:]}")
        assert not failures, "\n".join(failures)


_SERVER_FIXTURES = ("tiny_server", "keyed_server", "doomed_server", "stopped_server", "smol_server")
EXPECTED_ERRORS = {"doomed_server"}  # its scheduler is killed on purpose
_needed_servers = pytest.StashKey[set]()


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: launch only what the selected tests use
def pytest_collection_modifyitems(config, items):
    config.stash[_needed_servers] = {name for item in items for name in getattr(item, "fixturenames", ())
                                     if name in _SERVER_FIXTURES}


@pytest.fixture(scope="session")
def fleet(request, tmp_path_factory):
    needed = request.config.stash.get(_needed_servers, set(_SERVER_FIXTURES))
    specs = {}
    if "smol_server" in needed:  # launched first: it needs no tiny model, so it loads while that is built
        specs["smol_server"] = ServerProcess(["--max-total-tokens", "8192", "--log-level", "warning"],
                                             tmp_path_factory.mktemp("smol_server"))
    if needed - {"smol_server"}:
        model_dir = request.getfixturevalue("tiny_model_dir")
        for name in sorted(needed - {"smol_server"}):
            args = ["--model-path", str(model_dir), *TINY_ARGS]
            if name == "keyed_server":  # also a KV pool (64 tokens) far under the context (2048)
                args[args.index("--max-total-tokens") + 1] = str(KEYED_POOL)
            specs[name] = ServerProcess(args, tmp_path_factory.mktemp(name), API_KEY if name == "keyed_server"
                                        else None)
    fleet = Fleet(specs)
    try:
        yield fleet
    finally:
        fleet.stop_all()


@pytest.fixture(scope="session")
def tiny_server(fleet):
    """The tiny random Llama; most tests share it (each must leave it idle and healthy)."""
    return fleet.get("tiny_server")


@pytest.fixture(scope="session")
def keyed_server(fleet):
    """The tiny model behind --api-key, with a 64-token KV pool."""
    return fleet.get("keyed_server")


@pytest.fixture(scope="session")
def doomed_server(fleet):
    """A server whose scheduler process a test kills."""
    return fleet.get("doomed_server")


@pytest.fixture(scope="session")
def stopped_server(fleet):
    """A server a test stops."""
    return fleet.get("stopped_server")


@pytest.fixture(scope="session")
def smol_server(fleet):
    """The embedded SmolLM2-135M-Instruct: for the few tests that need meaningful text."""
    return fleet.get("smol_server")


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
