"""The router against real workers: `radixflow serve` processes on the tiny model, a `radixflow router` process in
front of them, real HTTP between them (the OpenAI SDK as the client where a client library is the point)."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import psutil
import pytest

from radixflow.server.launch import ServerProcess
from tests.helpers.server import TINY_ARGS, WatchedServer, sse_events

WORKER_ARGS = (*TINY_ARGS, "--num-threads", "1", "--enable-cache-events")
FAST_HEALTH = ("--health-check-interval-secs", "0.3", "--health-failure-threshold", "1",
               "--health-success-threshold", "1", "--worker-startup-timeout-secs", "2")


def system_prompt(tenant: int) -> str:
    return f"Tenant {tenant} instructions: " + " ".join(f"rule {tenant}-{i} applies." for i in range(40))


@pytest.fixture(scope="module")
def workers(tiny_model_dir, tmp_path_factory):
    ws = [WatchedServer(["--model-path", str(tiny_model_dir), *WORKER_ARGS], tmp_path_factory.mktemp(f"worker{i}"))
          for i in range(2)]
    for w in ws:
        w.launch()
    try:
        yield [w.wait_ready() for w in ws]
    finally:
        for w in ws:
            w.terminate()
        for w in ws:
            w.wait_stopped()


def start_router(urls: list[str], *flags: str) -> ServerProcess:
    return ServerProcess(["--worker-urls", *urls, *FAST_HEALTH, *flags], command="router").start().wait_ready(60)


@pytest.fixture(scope="module")
def router(workers):
    r = start_router([w.url for w in workers])
    yield r
    r.stop()


def generate(url: str, text: str, max_new_tokens: int = 4, **extra) -> dict:
    r = httpx.post(f"{url}/generate", json={"text": text, "sampling_params": {"max_new_tokens": max_new_tokens,
                                                                               "temperature": 0}, **extra},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def worker_prompt_tokens(router_url: str) -> dict[str, int]:
    info = httpx.get(f"{router_url}/get_server_info", timeout=30).json()
    return {w["url"]: w["server_info"]["stats"]["prompt_tokens"] for w in info["workers"]}


def test_cache_aware_keeps_each_tenant_on_the_worker_that_holds_its_prefix(router, workers):
    before = worker_prompt_tokens(router.url)
    for round_ in range(3):
        for tenant in range(4):
            out = generate(router.url, system_prompt(tenant) + f" Question {round_}?")
            meta = out["meta_info"]
            if round_:  # every later request of a tenant finds its system prompt cached where it went
                assert meta["cached_tokens"] >= meta["prompt_tokens"] - 8, (tenant, round_, meta)
    after = worker_prompt_tokens(router.url)
    assert all(after[w.url] > before[w.url] for w in workers)  # new tenants were spread over both workers


def test_streaming_through_the_router_equals_streaming_from_a_worker(router, workers):
    body = {"text": "The quick brown fox", "stream": True,
            "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}

    def texts(url: str) -> list[str]:
        with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]"
        return [e["text"] for e in events[:-1]]

    direct = texts(workers[0].url)
    assert len(direct) > 1 and texts(router.url) == direct

    from openai import OpenAI

    model = httpx.get(f"{router.url}/v1/models").json()["data"][0]["id"]

    def chat(url: str) -> str:
        stream = OpenAI(base_url=f"{url}/v1", api_key="none").chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say something."}], max_tokens=10, temperature=0,
            stream=True)
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    assert chat(router.url) == chat(workers[1].url)


def test_events_tree_follows_what_a_worker_cached(workers):
    """A prefix a worker cached from traffic the router never saw (sent to it directly) draws the router's
    requests to that worker: the tree comes from the worker's own cache events."""
    router = start_router([w.url for w in workers], "--tree-source", "events", "--cache-events-interval-secs",
                          "0.1")
    try:
        def tree_of_second() -> int:
            info = httpx.get(f"{router.url}/get_server_info").json()
            return next(w["tree_chars"] for w in info["workers"] if w["url"] == workers[1].url)

        prefix = system_prompt(99)
        before = tree_of_second()
        time.sleep(0.5)
        while (now := tree_of_second()) != before:  # the router has replayed what earlier tests left
            before = now
            time.sleep(0.5)
        generate(workers[1].url, prefix + " Warm-up.")  # the second worker: a tie would go to the first
        deadline = time.monotonic() + 10
        while tree_of_second() < before + len(prefix):
            assert time.monotonic() < deadline, "the router never learned the worker's new prefix"
            time.sleep(0.1)
        meta = generate(router.url, prefix + " Now the real question?")["meta_info"]
        assert meta["cached_tokens"] >= meta["prompt_tokens"] - 8, meta
    finally:
        router.stop()


def test_a_dead_worker_leaves_rotation_and_traffic_goes_on(router, workers, tiny_model_dir, tmp_path):
    doomed = ServerProcess(["--model-path", str(tiny_model_dir), *WORKER_ARGS], log=tmp_path / "doomed.log")
    doomed.start().wait_ready(120)
    alone = start_router([doomed.url])  # routes only to the doomed worker: its streams have nowhere else to go
    try:
        added = httpx.post(f"{router.url}/add_worker", params={"url": doomed.url}, timeout=30)
        assert added.status_code == 200, added.text
        assert doomed.url in httpx.get(f"{router.url}/list_workers").json()["urls"]

        body = {"text": "Stream for a long time", "stream": True,
                "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
        with httpx.stream("POST", f"{alone.url}/generate", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            os.killpg(doomed.proc.pid, signal.SIGKILL)  # the worker dies mid-stream
            rest = list(lines)
        errors = [json.loads(line[6:]) for line in rest if line.startswith("data: {\"error\"")]
        assert errors and doomed.url in errors[0]["error"]["message"], rest[-3:]

        for i in range(6):  # the dead worker refuses connections: each request lands elsewhere
            generate(router.url, f"after the failure {i}")
        workers_state = {w["url"]: w["healthy"] for w in httpx.get(f"{router.url}/list_workers").json()["workers"]}
        assert workers_state == {workers[0].url: True, workers[1].url: True, doomed.url: False}
        assert httpx.get(f"{router.url}/health").status_code == 200

        removed = httpx.post(f"{router.url}/remove_worker", params={"url": doomed.url})
        assert removed.status_code == 200 and doomed.url not in httpx.get(f"{router.url}/list_workers").json()["urls"]
        deadline = time.monotonic() + 10  # the lone router's only worker is gone: it reports unhealthy
        while httpx.get(f"{alone.url}/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = httpx.post(f"{alone.url}/generate", json={"text": "x"}, timeout=30)
        assert r.status_code == 503 and "no worker" in r.json()["error"]["message"]
    finally:
        alone.stop()
        doomed.stop()


def test_fleet_management_errors_name_the_field(router):
    bad = httpx.post(f"{router.url}/add_worker", params={"url": "not a url"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "url"
    unreachable = httpx.post(f"{router.url}/add_worker", params={"url": "http://127.0.0.1:9"}, timeout=30)
    assert unreachable.status_code == 400 and "not healthy" in unreachable.json()["error"]["message"]
    missing = httpx.post(f"{router.url}/remove_worker", params={"url": "http://127.0.0.1:9"})
    assert missing.status_code == 404


def test_server_info_sums_the_workers_and_metrics_count_per_worker(router, workers):
    generate(router.url, "count me")
    info = httpx.get(f"{router.url}/get_server_info").json()
    assert info["router"] == {"policy": "cache_aware", "tree_source": "requests", "num_workers": 2,
                              "num_healthy": 2}
    per_worker = [w["server_info"]["stats"]["prompt_tokens"] for w in info["workers"]]
    assert info["stats"]["prompt_tokens"] == sum(per_worker) > 0
    metrics = httpx.get(f"{router.url}/metrics").text
    for w in workers:
        assert f'radixflow_router_requests_total{{worker="{w.url}"}}' in metrics


def test_serve_dp_size_starts_workers_behind_a_router(tiny_model_dir, tmp_path):
    server = ServerProcess(["--model-path", str(tiny_model_dir), *TINY_ARGS, "--dp-size", "2",
                            "--router-policy", "round_robin"], api_key="dp-key", log=tmp_path / "dp.log")
    server.start().wait_ready(180)
    try:
        family = psutil.Process(server.proc.pid).children(recursive=True)
        assert httpx.post(f"{server.url}/generate", json={"text": "hi"}).status_code == 401  # the router checks keys
        info = httpx.get(f"{server.url}/get_server_info", headers=server.headers).json()
        assert info["router"]["policy"] == "round_robin" and info["router"]["num_healthy"] == 2
        model = httpx.get(f"{server.url}/v1/models", headers=server.headers).json()["data"][0]["id"]
        for i in range(2):
            r = httpx.post(f"{server.url}/v1/completions", headers=server.headers, timeout=60,
                           json={"model": model, "prompt": f"dp {i}", "max_tokens": 3})
            assert r.status_code == 200, r.text
        info = httpx.get(f"{server.url}/get_server_info", headers=server.headers).json()
        assert all(w["server_info"]["stats"]["prompt_tokens"] > 0 for w in info["workers"])  # round robin: both
    finally:
        server.stop()
    _, alive = psutil.wait_procs(family, timeout=15)
    assert not alive, f"workers left running: {alive}"
