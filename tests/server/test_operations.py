"""Operations endpoints: health, model and server info, metrics, cache flush, integrity check."""

from __future__ import annotations

import json
import re

from tests.helpers.server import wait_idle


def scrape(client) -> dict[str, float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_health_and_health_generate(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/health_generate").json() == {"status": "ok"}


def test_model_info(client, tiny_model_dir, model_name):
    info = client.get("/get_model_info").json()
    assert info["model_path"] == str(tiny_model_dir)
    assert info["served_model_name"] == model_name
    assert info["max_context_length"] == 2048 and info["vocab_size"] == 49152


def test_server_info_has_live_stats(client):
    before = wait_idle(client)
    client.post("/generate", json={"text": "count me", "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}})
    info = client.get("/get_server_info").json()
    stats = info["stats"]
    assert info["max_total_num_tokens"] == stats["kv_total_tokens"] == 8192
    assert info["cache"]["max_total_tokens"] == 8192
    assert stats["generated_tokens"] == before["generated_tokens"] + 4
    assert stats["prompt_tokens"] > before["prompt_tokens"]
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["kv_free_tokens"] + stats["kv_evictable_tokens"] == stats["kv_total_tokens"]


def test_metrics_count_requests_and_tokens(client):
    before = scrape(client)
    for _ in range(2):
        out = client.post("/generate", json={"text": "measure me", "sampling_params": {"max_new_tokens": 5,
                                                                                     "ignore_eos": True}})
        assert out.status_code == 200
    after = scrape(client)
    length = 'radixflow_requests_total{reason="length"}'
    assert after[length] == before.get(length, 0) + 2
    assert after["radixflow_generation_tokens_total"] == before["radixflow_generation_tokens_total"] + 10
    for histogram in ("radixflow_e2e_request_latency_seconds", "radixflow_time_to_first_token_seconds",
                      "radixflow_inter_token_latency_seconds"):
        assert after[f"{histogram}_count"] > before.get(f"{histogram}_count", 0)
        assert after[f'{histogram}_bucket{{le="+Inf"}}'] == after[f"{histogram}_count"]
    e2e = client.get("/metrics").text
    assert re.search(r'^radixflow_e2e_request_latency_seconds_bucket\{le="0\.01"\} \d', e2e, re.M)
    assert after["radixflow_kv_total_tokens"] == 8192
    assert after["radixflow_num_running_reqs"] == 0


def test_flush_cache_when_idle(client):
    prompt = {"text": "flush me " * 10, "sampling_params": {"max_new_tokens": 1}}
    client.post("/generate", json=prompt)
    assert client.post("/generate", json=prompt).json()["meta_info"]["cached_tokens"] > 0
    wait_idle(client)
    assert client.post("/flush_cache").json() == {"success": True}
    stats = client.get("/get_server_info").json()["stats"]
    assert stats["cached_tokens_in_tree"] == 0 and stats["kv_free_tokens"] == stats["kv_total_tokens"]
    assert client.post("/generate", json=prompt).json()["meta_info"]["cached_tokens"] == 0


def test_flush_cache_is_refused_while_a_request_runs(client):
    body = {"text": "keep running", "stream": True, "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True},
            "rid": "flush-blocker"}
    with client.stream("POST", "/generate", json=body) as response:
        lines = response.iter_lines()  # kept: dropping the iterator closes the connection, aborting the request
        assert next(lines).startswith("data: ")
        refused = client.post("/flush_cache")
        client.post("/abort_request", json={"rid": "flush-blocker"})
    assert refused.status_code == 409 and refused.json()["success"] is False
    wait_idle(client)


def test_check_integrity(client):
    wait_idle(client)
    response = client.get("/debug/check_integrity")
    assert response.status_code == 200 and response.json() == {"ok": True}


def test_openapi_schema_lists_the_routes(client):
    paths = json.loads(client.get("/openapi.json").text)["paths"]
    assert {"/generate", "/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics"} <= set(paths)
