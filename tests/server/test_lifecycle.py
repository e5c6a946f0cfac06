"""Process lifecycle, each on a server of its own: the scheduler process dying under load, and SIGTERM."""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time

import httpx
import psutil

from tests.helpers.server import sse_events, wait_idle

LONG = {"text": "a long story", "stream": True, "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}}


def _first_event(lines) -> dict:
    event = json.loads(next(lines).removeprefix("data: "))
    assert event["meta_info"]["finish_reason"] is None
    return event


def test_scheduler_death_fails_requests_instead_of_hanging(doomed_server):
    server = doomed_server
    with httpx.Client(base_url=server.url, timeout=10) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
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

            os.kill(server.scheduler().pid, signal.SIGKILL)
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
        assert time.monotonic() - killed < 5

        health = client.get("/health")
        assert health.status_code == 503 and "scheduler" in health.json()["message"]
        # New requests are refused at once, streamed ones included (before any 200 is sent).
        assert client.post("/generate", json={"text": "x"}).status_code == 503
        with client.stream("POST", "/generate", json={"text": "x", "stream": True}) as response:
            assert response.status_code == 503
            assert "scheduler" in json.loads(response.read())["error"]["message"]
        chat = client.post("/v1/chat/completions", json={"model": model, "stream": True,
                                                         "messages": [{"role": "user", "content": "x"}]})
        assert chat.status_code == 503 and chat.json()["error"]["type"] == "server_error"
        assert client.get("/health_generate").status_code == 503
        assert server.proc.poll() is None  # the HTTP process stays up to report the failure
    # The session's teardown then checks that SIGTERM still stops what is left of this server.


def test_sigterm_stops_every_process_with_a_request_in_flight(stopped_server):
    server = stopped_server
    ipc_files = list((server.workdir / "tmp").glob("radixflow-*"))
    assert ipc_files, "expected the server's IPC sockets in its TMPDIR"
    family = [psutil.Process(server.proc.pid), *server.descendants()]
    assert server.scheduler() in family
    with httpx.Client(base_url=server.url, timeout=10) as client:
        wait_idle(client)
        with client.stream("POST", "/generate", json=LONG) as response:
            lines = response.iter_lines()
            before = _first_event(lines)
            server.terminate()
            # Shutdown is graceful: the request in flight goes on being served for a while...
            later = json.loads(list(itertools.islice((line for line in lines if line), 5))[-1].removeprefix("data: "))
            assert later["meta_info"]["completion_tokens"] > before["meta_info"]["completion_tokens"]
        # ...and once its client has left, nothing holds the server up.
    elapsed = server.wait_stopped()  # asserts every process is gone within 15 s
    assert elapsed < 15
    assert server.proc.returncode == 0, server.log_tail()
    assert not any(p.is_running() for p in family)
    assert not any(path.exists() for path in ipc_files), "IPC socket files left behind"
