"""Process lifecycle, each on a server of its own: the scheduler process dying under load (and restarted), and
SIGTERM (a drain)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import psutil

from tests.helpers.server import assert_no_kv_leak, sse_events, wait_idle

LONG = {"text": "a long story", "stream": True, "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}}


def _first_event(lines) -> dict:
    event = json.loads(next(lines).removeprefix("data: "))
    assert event["meta_info"]["finish_reason"] is None
    return event


def test_scheduler_death_fails_requests_at_once_then_the_scheduler_is_restarted(doomed_server):
    server = doomed_server
    with httpx.Client(base_url=server.url, timeout=10) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        probe = {"text": "The same answer", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
        before = client.post("/generate", json=probe).json()["text"]
        blocked: dict = {}

        def non_streaming():
            blocked["response"] = httpx.post(f"{server.url}/v1/completions", timeout=10, json={
                "model": model, "prompt": "never finishes", "max_tokens": 1500, "ignore_eos": True})

        with client.stream("POST", "/generate", json=LONG) as response:
            lines = response.iter_lines()  # kept: dropping it would close the connection and abort the request
            _first_event(lines)
            waiter = threading.Thread(target=non_streaming)
            waiter.start()
            deadline = time.monotonic() + 10
            while client.get("/get_server_info").json()["stats"]["num_running"] < 2:
                assert time.monotonic() < deadline, "the non-streamed request never started"
                time.sleep(0.02)

            first_scheduler = server.scheduler()
            os.kill(first_scheduler.pid, signal.SIGKILL)
            killed = time.monotonic()
            # The stream in flight ends, its last event saying why (its 200 was sent long ago).
            events = sse_events(lines)
        assert events[-1] == "[DONE]"
        final = events[-2]["meta_info"]
        assert final["finish_reason"]["type"] == "abort"
        assert "scheduler process died" in final["finish_reason"]["message"]
        # The non-streamed request in flight gets an error, not a truncated success.
        waiter.join(timeout=10)
        assert not waiter.is_alive()
        assert blocked["response"].status_code == 503
        assert "scheduler process died" in blocked["response"].json()["error"]["message"]
        assert time.monotonic() - killed < 2

        # While it restarts: health and new requests say so with 503 (before any 200 of a stream is sent).
        health = client.get("/health")
        assert health.status_code == 503 and "restarting" in health.json()["message"]
        with client.stream("POST", "/generate", json={"text": "x", "stream": True}) as response:
            assert response.status_code == 503
            assert "scheduler" in json.loads(response.read())["error"]["message"]

        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, client.get("/health").json()
            time.sleep(0.2)
        recovered = time.monotonic() - killed
        assert server.scheduler().pid != first_scheduler.pid
        assert client.post("/generate", json=probe).json()["text"] == before  # the same model, serving again
        assert client.get("/health_generate").status_code == 200
        assert_no_kv_leak(client)
        print(f"scheduler death to recovery: {recovered:.1f} s")
    # The session's teardown then checks that SIGTERM still stops this server and its new scheduler.


def test_sigterm_drains_running_streams_refuses_new_requests_and_stops_everything(stopped_server):
    server = stopped_server
    ipc_files = list((server.workdir / "tmp").glob("radixflow-*"))
    assert ipc_files, "expected the server's IPC sockets in its TMPDIR"
    family = [psutil.Process(server.proc.pid), *server.descendants()]
    assert server.scheduler() in family
    request = {"text": "a story", "stream": True, "sampling_params": {"max_new_tokens": 300, "ignore_eos": True}}
    with httpx.Client(base_url=server.url, timeout=10) as client:
        wait_idle(client)
        with client.stream("POST", "/generate", json=request) as response:
            lines = response.iter_lines()
            _first_event(lines)
            server.terminate()
            # Draining: a new request is refused at once (503 with Retry-After) ...
            refused = httpx.post(f"{server.url}/generate", json={"text": "x"}, timeout=5)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "shutting down" in refused.json()["error"]["message"]
            # ... while the stream in flight runs to its end.
            events = sse_events(lines)
        assert events[-1] == "[DONE]"
        final = events[-2]["meta_info"]
        assert final["finish_reason"]["type"] == "length" and final["completion_tokens"] == 300
    elapsed = server.wait_stopped()  # asserts every process is gone within 15 s
    assert elapsed < 15
    assert server.proc.returncode == 0, server.log_tail()
    assert not any(p.is_running() for p in family)
    assert not any(path.exists() for path in ipc_files), "IPC socket files left behind"
