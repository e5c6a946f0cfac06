"""Real `radixflow serve` subprocesses for the HTTP tests, and what the tests ask of them."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import psutil

from radixflow.server.launch import ServerProcess

STOP_TIMEOUT_S = 15.0
START_TIMEOUT_S = 120.0
TINY_ARGS = ("--max-total-tokens", "8192", "--log-level", "warning")
API_KEY = "sk-radixflow-test"
KEYED_POOL = 64



class WatchedServer(ServerProcess):
    """A `ServerProcess` whose stop is checked: SIGTERM goes to the HTTP process only, as a process supervisor
    would send it, and every process the server started must be gone within STOP_TIMEOUT_S."""

    def __init__(self, args: list[str], workdir: Path, api_key: str | None = None):
        # A private TMPDIR: the IPC socket files land there, so a test can see that shutdown removed them.
        (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        super().__init__(["--num-threads", "1", *args], api_key=api_key, log=workdir / "server.log",
                         env={"TMPDIR": str(workdir / "tmp")})
        self.workdir = workdir
        self._family: list[psutil.Process] = []
        self._term_sent = 0.0

    def launch(self) -> WatchedServer:
        return self.start()

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
        """Send SIGTERM to the HTTP process only; `wait_stopped` checks the rest."""
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


def wait_idle(client: httpx.Client, timeout_s: float = 20.0) -> dict:
    """Poll /get_server_info until nothing runs or waits; returns the stats."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.get("/get_server_info").json()["stats"]
        if stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats.get("num_receiving", 0) == 0:
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
    events = []
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        payload = line.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
