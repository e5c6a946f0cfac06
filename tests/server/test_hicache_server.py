"""Two real servers sharing one real Redis as their storage tier, and sessions over HTTP (native API and the
OpenAI SDK's extra_body).

Redis comes from the distribution's package (scripts/setup.sh installs redis-server); the test starts its own on
a free port, with persistence off.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import httpx
import openai
import pytest

from radixflow.server.launch import free_port
from tests.helpers.server import START_TIMEOUT_S, TINY_ARGS, WatchedServer, assert_no_kv_leak, wait_idle

PROMPT = "Shared storage. " + " ".join(f"record {i} holds {i * 11 % 17}." for i in range(50))
PARAMS = {"max_new_tokens": 6, "ignore_eos": True, "temperature": 0.0}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (scripts/setup.sh installs the distribution's package)"
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    import redis

    client = redis.Redis(port=port)
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def two_servers(tiny_model_dir, redis_url, tmp_path_factory):
    flags = ["--model-path", str(tiny_model_dir), *TINY_ARGS, "--enable-hierarchical-cache",
             "--hicache-storage-backend", "redis",
             "--hicache-storage-backend-extra-config", json.dumps({"url": redis_url}), "--page-size", "16"]
    servers = [WatchedServer(flags, tmp_path_factory.mktemp(f"hicache{i}")) for i in range(2)]
    for s in servers:
        s.launch()
    try:
        for s in servers:
            s.wait_ready(START_TIMEOUT_S)
        yield servers
    finally:
        for s in servers:
            s.terminate()
        for s in servers:
            s.wait_stopped()


def test_the_second_server_hits_the_first_servers_prefix(two_servers):
    first, second = (httpx.Client(base_url=s.url, timeout=60) for s in two_servers)
    reference = first.post("/generate", json={"text": PROMPT, "sampling_params": PARAMS}).json()
    deadline = time.monotonic() + 20
    while (info := wait_idle(first))["hicache_storage_queued_writes"] or not info["hicache_storage_pages_written"]:
        assert time.monotonic() < deadline, info
        time.sleep(0.05)
    out = second.post("/generate", json={"text": PROMPT, "sampling_params": PARAMS}).json()
    prompt_len = reference["meta_info"]["prompt_tokens"]
    assert out["output_ids"] == reference["output_ids"]
    assert out["meta_info"]["cached_tokens"] == (prompt_len - 1) // 16 * 16
    stats = wait_idle(second)
    assert stats["cache_hit_storage_tokens"] == out["meta_info"]["cached_tokens"]
    info = second.get("/get_server_info").json()
    assert info["cache"]["hicache_storage_backend"] == "redis"
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in second.get("/metrics").text.splitlines()
               if line.startswith("radixflow_")}
    assert metrics["radixflow_cache_hit_storage_tokens"] == out["meta_info"]["cached_tokens"]
    assert metrics["radixflow_hicache_storage_pages_loaded"] == (prompt_len - 1) // 16
    assert_no_kv_leak(second)


def test_sessions_over_http_and_the_openai_sdk(two_servers):
    server = two_servers[0]
    http = httpx.Client(base_url=server.url, timeout=60)
    sid = http.post("/open_session", json={"ttl_s": 120}).json()["session_id"]
    named = http.post("/open_session", json={"session_id": "agent-7"}).json()["session_id"]
    assert named == "agent-7"
    first = http.post("/generate", json={"text": "Tool result: 42. " * 20, "sampling_params": PARAMS,
                                         "session_id": sid}).json()
    assert first["meta_info"]["completion_tokens"] == 6
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello agent"}],
                                          max_tokens=4, extra_body={"session_id": "agent-7"})
    assert chat.choices[0].message.content is not None
    stats = wait_idle(http)
    assert stats["sessions_open"] >= 2 and stats["session_retained_tokens"] > 0
    for session in (sid, "agent-7"):
        assert http.post("/close_session", json={"session_id": session}).json() == {"success": True}
    gone = http.post("/close_session", json={"session_id": sid})
    assert gone.status_code == 404 and "session_id" in gone.text
    for bad in ("", "x" * 300, 17):
        r = http.post("/generate", json={"text": "hi", "sampling_params": PARAMS, "session_id": bad})
        assert r.status_code == 400 and "session_id" in r.text, r.text
    assert_no_kv_leak(http)


def test_a_program_on_the_http_backend_opens_and_closes_its_session(two_servers):
    import radixflow as sgl

    server = two_servers[1]
    http = httpx.Client(base_url=server.url, timeout=60)
    backend = sgl.RuntimeEndpoint(server.url)
    assert backend.supports_sessions
    seen = {}

    @sgl.function
    def program(s):
        s += "An agent step. " * 10 + sgl.gen("a", max_tokens=3, temperature=0.0)
        assert s["a"] is not None
        seen["during"] = http.get("/get_server_info").json()["stats"]["sessions_open"]

    before = wait_idle(http)["sessions_open"]
    program.run(backend=backend)
    assert seen["during"] == before + 1
    deadline = time.monotonic() + 10
    while wait_idle(http)["sessions_open"] != before:
        assert time.monotonic() < deadline, "the program's session was not closed when it ended"
        time.sleep(0.05)


def test_a_restarted_server_answers_a_known_prefix_from_its_disk_tier(tiny_model_dir, tmp_path):
    flags = ["--model-path", str(tiny_model_dir), *TINY_ARGS, "--enable-hierarchical-cache",
             "--hicache-storage-backend", "file",
             "--hicache-storage-backend-extra-config", json.dumps({"dir": str(tmp_path / "pages")}),
             "--page-size", "16"]
    outputs = []
    for run in range(2):
        server = WatchedServer(flags, tmp_path / f"run{run}").launch()
        try:
            server.wait_ready(START_TIMEOUT_S)
            with httpx.Client(base_url=server.url, timeout=60) as http:
                outputs.append(http.post("/generate", json={"text": PROMPT, "sampling_params": PARAMS}).json())
        finally:
            server.terminate()  # a graceful stop: the queued page writes finish first
            server.wait_stopped()
    first, second = outputs
    prompt_len = first["meta_info"]["prompt_tokens"]
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] == (prompt_len - 1) // 16 * 16
    assert second["output_ids"] == first["output_ids"]
