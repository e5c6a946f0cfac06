"""Real `radixflow serve` subprocesses on free local ports, shared by the HTTP server tests.

Each server is two processes (HTTP + scheduler) plus multiprocessing's resource tracker. Stopping one sends
SIGTERM to the HTTP process only, as a process supervisor would, and asserts that every process it started is
gone: a server that leaves an orphaned scheduler holding the model and KV memory fails the suite.
"""

from __future__ import annotations

from typing import NamedTuple

import httpx
import pytest

from tests.helpers.server import API_KEY, KEYED_POOL, START_TIMEOUT_S, TINY_ARGS, WatchedServer


class Fleet:
    """Every server the selected tests need, launched together at the start so their model loads overlap
    (on two cores that saves most of a server start per extra server), and stopped together at the end."""

    def __init__(self, specs: dict[str, WatchedServer]):
        self.servers = specs
        self._ready: set[str] = set()
        for server in specs.values():
            server.launch()

    def get(self, name: str) -> WatchedServer:
        server = self.servers[name]
        if name not in self._ready:
            server.wait_ready(START_TIMEOUT_S)
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


class TinyServer(NamedTuple):
    flags: list[str]  # after TINY_ARGS (a later flag wins)
    doc: str
    api_key: str | None = None


# The tiny-model servers the tests use. Each is a session fixture of its name, launched only if a selected test
# uses it.
TINY_SERVERS = {
    "tiny_server": TinyServer([], "The tiny random Llama; most tests share it (each must leave it idle and healthy)."),
    "keyed_server": TinyServer(["--max-total-tokens", str(KEYED_POOL)], "Behind --api-key, with a 64-token KV pool "
                               "(far under the 2048-token context).", API_KEY),
    "doomed_server": TinyServer([], "A server whose scheduler process a test kills."),
    "stopped_server": TinyServer([], "A server a test stops."),
    "thinking_server": TinyServer(["--reasoning-parser", "qwen3"], "A reasoning model's output parsed."),
    "pythonic_server": TinyServer(["--tool-call-parser", "pythonic"], "Another tool-call format."),
    "bounded_server": TinyServer(["--max-running-requests", "1", "--max-queued-requests", "2",
                                  "--max-queued-tokens", "300", "--request-timeout-s", "1",
                                  "--graceful-shutdown-timeout", "1"],
                                 "One request runs at a time and two may queue; requests end after 1 s unless they "
                                 "ask for longer; a 1 s drain. Its last test stops it."),
    "fuzz_server": TinyServer(["--request-timeout-s", "2"],
                              "For the API fuzzer: a generated max_tokens cannot make the run long."),
    "soak_server": TinyServer(["--max-running-requests", "256"], "For the soak test: many streams at once."),
}
_SERVER_FIXTURES = (*TINY_SERVERS, "smol_server")
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
        # fp32 weights: its tests compare answers across cache states (streamed after whole, a stop string cut
        # after the full answer). The default int4 decode kernel can flip a bf16 near-tie between a first token
        # from a cached prompt (one row: int4) and one from a full prefill (fp32): on AMD EPYC hosts, SmolLM2's
        # first token for the capital-of-France question is such a tie ("The" -0.08 nat from "L").
        specs["smol_server"] = WatchedServer(["--max-total-tokens", "8192", "--log-level", "warning",
                                              "--weight-format", "fp32"], tmp_path_factory.mktemp("smol_server"))
    if needed - {"smol_server"}:
        model_dir = request.getfixturevalue("tiny_model_dir")
        for name in sorted(needed - {"smol_server"}):
            spec = TINY_SERVERS[name]
            specs[name] = WatchedServer(["--model-path", str(model_dir), *TINY_ARGS, *spec.flags],
                                        tmp_path_factory.mktemp(name), spec.api_key)
    fleet = Fleet(specs)
    try:
        yield fleet
    finally:
        fleet.stop_all()


def _server_fixture(name: str, doc: str):
    @pytest.fixture(scope="session", name=name)
    def server(fleet):
        return fleet.get(name)

    server.__doc__ = doc
    return server


for _name, _spec in TINY_SERVERS.items():
    globals()[_name] = _server_fixture(_name, _spec.doc)
smol_server = _server_fixture("smol_server", "The embedded SmolLM2-135M-Instruct: for the few tests that need "
                                             "meaningful text.")


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
