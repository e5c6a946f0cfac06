"""Real `radixflow serve` subprocesses on free local ports, shared by the HTTP server tests.

Each server is two processes (HTTP + scheduler) plus multiprocessing's resource tracker. Stopping one sends
SIGTERM to the HTTP process only, as a process supervisor would, and asserts that every process it started is
gone: a server that leaves an orphaned scheduler holding the model and KV memory fails the suite.
"""

from __future__ import annotations

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


_SERVER_FIXTURES = ("tiny_server", "keyed_server", "doomed_server", "stopped_server", "smol_server",
                    "thinking_server", "pythonic_server", "bounded_server", "fuzz_server", "soak_server")
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
            args = ["--model-path", str(model_dir), *TINY_ARGS]
            if name == "keyed_server":  # also a KV pool (64 tokens) far under the context (2048)
                args[args.index("--max-total-tokens") + 1] = str(KEYED_POOL)
            if name == "thinking_server":  # a reasoning model's output
                args += ["--reasoning-parser", "qwen3"]
            if name == "pythonic_server":  # another tool-call format
                args += ["--tool-call-parser", "pythonic"]
            if name == "bounded_server":  # one request runs at a time, two may queue; a short drain
                args += ["--max-running-requests", "1", "--max-queued-requests", "2", "--max-queued-tokens", "300",
                         "--request-timeout-s", "1", "--graceful-shutdown-timeout", "1"]
            if name == "fuzz_server":  # a generated max_tokens cannot make the fuzzing run long
                args += ["--request-timeout-s", "2"]
            if name == "soak_server":  # many streams at once
                args += ["--max-running-requests", "256"]
            specs[name] = WatchedServer(args, tmp_path_factory.mktemp(name), API_KEY if name == "keyed_server"
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
def thinking_server(fleet):
    """The tiny model with `--reasoning-parser qwen3`."""
    return fleet.get("thinking_server")


@pytest.fixture(scope="session")
def pythonic_server(fleet):
    """The tiny model with `--tool-call-parser pythonic`."""
    return fleet.get("pythonic_server")


@pytest.fixture(scope="session")
def bounded_server(fleet):
    """The tiny model with admission bounds, a 1 s default request timeout and a 1 s drain; its last test stops
    it."""
    return fleet.get("bounded_server")


@pytest.fixture(scope="session")
def fuzz_server(fleet):
    """The tiny model for the API fuzzer (whatever it sends must leave the server healthy)."""
    return fleet.get("fuzz_server")


@pytest.fixture(scope="session")
def soak_server(fleet):
    """The tiny model for the soak test."""
    return fleet.get("soak_server")


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
