"""Prefill/decode disaggregation end to end: `radixflow serve --disaggregation-mode prefill|decode` processes on the
tiny model, `radixflow router --pd-disaggregation` in front, the KV moving between the servers over gloo; compared
with a colocated server on the same weights. Faults are real: a prefill scheduler that exits mid-transfer, a
decode server whose pool cannot hold everything at once, a prefill server that is not there."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import pytest

from radixflow.server.launch import ServerProcess, free_port
from tests.helpers.server import TINY_ARGS, WatchedServer, assert_no_kv_leak, sse_events

FAST_HEALTH = ("--health-check-interval-secs", "0.5", "--health-failure-threshold", "1",
               "--health-success-threshold", "1")
GREEDY = {"temperature": 0, "ignore_eos": True}
PROMPTS = ["The capital of France is", "word " * 150 + "and then", "Once upon a time, a robot",
           "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, " * 12]


def _server(tmp_path_factory, name: str, model: str, *flags: str, env: dict | None = None) -> WatchedServer:
    server = WatchedServer(["--model-path", model, *TINY_ARGS, *flags], tmp_path_factory.mktemp(name))
    if env:
        server.env.update(env)
    return server


def _prefill_flags(port: int) -> tuple[str, ...]:
    # A small step budget: the 150-token prompts are prefilled in chunks on the prefill side.
    return ("--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(port),
            "--chunked-prefill-size", "48")


@pytest.fixture(scope="module")
def fleet(tiny_model_dir, tmp_path_factory):
    """Every server this module's tests use, launched together so their starts overlap: a colocated server, a
    prefill and a decode server with the router over them, a second prefill server, one whose scheduler exits in the
    middle of its first transfer, and a decode server whose pool holds about two requests at once. Tests that need
    another pairing start their own router over these."""
    model = str(tiny_model_dir)
    ports = {"prefill": free_port(), "prefill2": free_port(), "crashing": free_port()}
    servers = {
        "colocated": _server(tmp_path_factory, "colocated", model),
        "prefill": _server(tmp_path_factory, "prefill", model, *_prefill_flags(ports["prefill"])),
        "prefill2": _server(tmp_path_factory, "prefill2", model, *_prefill_flags(ports["prefill2"])),
        "crashing": _server(tmp_path_factory, "crashing", model, *_prefill_flags(ports["crashing"]),
                            env={"RADIXFLOW_FAULT_INJECT": "exit_in_kv_send"}),
        "decode": _server(tmp_path_factory, "decode", model, "--disaggregation-mode", "decode",
                          "--disaggregation-transfer-timeout-s", "10"),
        "small_decode": _server(tmp_path_factory, "small-decode", model, "--disaggregation-mode", "decode",
                                "--max-total-tokens", "420"),
    }
    for s in servers.values():
        s.launch()
    router = None
    try:
        for s in servers.values():
            s.wait_ready()
        router = ServerProcess(["--pd-disaggregation", "--prefill", servers["prefill"].url, str(ports["prefill"]),
                                "--decode", servers["decode"].url, *FAST_HEALTH], command="router"
                               ).start().wait_ready(60)
        yield servers, router, ports
    finally:
        if router is not None:
            router.stop()
        for s in servers.values():
            s.terminate()
        for s in servers.values():
            s.wait_stopped()


def _generate(url: str, text: str, **params) -> dict:
    body = {"text": text, "sampling_params": {"max_new_tokens": 24, **GREEDY, **params}}
    r = httpx.post(f"{url}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_outputs_equal_colocated_serving(fleet):
    servers, router, _ = fleet
    for prompt in PROMPTS:
        want = _generate(servers["colocated"].url, prompt)
        got = _generate(router.url, prompt)
        assert got["output_ids"] == want["output_ids"], prompt
        assert got["text"] == want["text"]
        assert got["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"]
    # Sampled on the prefill side, then continued on the decode side: a constrained request keeps its grammar.
    regex = {"regex": r"(yes|no), because [a-z ]+\.", "ignore_eos": False}
    want, got = (_generate(s, PROMPTS[0], **regex) for s in (servers["colocated"].url, router.url))
    assert got["text"] == want["text"] and got["output_ids"] == want["output_ids"]
    for name in ("prefill", "decode"):
        assert_no_kv_leak(httpx.Client(base_url=servers[name].url))


def test_streams_and_the_openai_sdk_see_what_colocated_serving_gives(fleet):
    servers, router, _ = fleet
    body = {"text": PROMPTS[2], "stream": True, "sampling_params": {"max_new_tokens": 12, **GREEDY}}
    texts = []
    for url in (servers["colocated"].url, router.url):
        with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as r:
            assert r.status_code == 200
            events = [e for e in sse_events(r.iter_lines()) if e != "[DONE]"]
        texts.append(events[-1]["text"])
        assert len(events) >= 2  # streamed token by token, not in one piece
    assert texts[0] == texts[1]
    model = httpx.get(f"{router.url}/v1/models").json()["data"][0]["id"]
    answers = []
    for url in (servers["colocated"].url, router.url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi there"}],
                                                max_tokens=10, temperature=0, stream=True)
        answers.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    assert answers[0] == answers[1] and answers[1]


def test_the_next_turn_finds_its_history_cached_on_both_sides(fleet):
    servers, router, _ = fleet
    decode = httpx.Client(base_url=servers["decode"].url)
    sent = lambda: decode.get("/get_server_info").json()["stats"]["kv_transfer_bytes"]  # noqa: E731
    history = "User: tell me about rivers and seas and what lives in them.\nAssistant:"
    before = sent()
    first = _generate(router.url, history)
    per_token = (sent() - before) / first["meta_info"]["prompt_tokens"]  # nothing of it was on the decode side
    turn = history + first["text"] + "\nUser: and lakes?\nAssistant:"
    before = sent()
    second = _generate(router.url, turn)
    assert second["output_ids"] == _generate(servers["colocated"].url, turn)["output_ids"]
    assert second["meta_info"]["cached_tokens"] > 0  # the prefill server had the first turn's prompt
    # The decode server held the first turn's prompt and its 24-token answer: neither came over again.
    new_tokens = (sent() - before) / per_token
    assert new_tokens <= second["meta_info"]["prompt_tokens"] - first["meta_info"]["prompt_tokens"] - 16
    metrics = {line.split()[0]: float(line.split()[1]) for line in decode.get("/metrics").text.splitlines()
               if line.startswith("radixflow_kv_transfer")}
    assert metrics["radixflow_kv_transfer_bytes"] == sent() and metrics["radixflow_kv_transfers"] >= 2


def test_bad_input_is_a_clear_error_and_both_servers_keep_serving(fleet):
    servers, router, _ = fleet
    r = httpx.post(f"{router.url}/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 10**6}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_new_tokens"
    r = httpx.post(f"{router.url}/generate", content=b"[1, 2]")
    assert r.status_code == 400
    r = httpx.post(f"{servers['decode'].url}/generate", json={"text": "hi"})  # not through the router
    assert r.status_code == 400 and r.json()["error"]["param"] == "bootstrap_room"
    r = httpx.post(f"{servers['decode'].url}/generate",
                   json={"text": "hi", "bootstrap_host": "127.0.0.1", "bootstrap_port": 0, "bootstrap_room": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "bootstrap_port"
    assert _generate(router.url, PROMPTS[0])["output_ids"]


def test_a_missing_prefill_server_fails_the_decode_side_cleanly(fleet):
    servers, _, _ = fleet
    body = {"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 4},
            "bootstrap_host": "127.0.0.1", "bootstrap_port": free_port(), "bootstrap_room": 7}
    r = httpx.post(f"{servers['decode'].url}/generate", json=body, timeout=60)
    assert r.status_code == 503 and "KV transfer failed" in r.json()["error"]["message"]
    assert_no_kv_leak(httpx.Client(base_url=servers["decode"].url))


def test_decode_pool_pressure_queues_requests_and_loses_none(fleet):
    """A decode pool that holds about two of the requests at once: the rest wait for room (a transfer never lands
    without it), all finish with the colocated outputs, and neither side leaks."""
    servers, _, ports = fleet
    prefill, decode = servers["prefill"], servers["small_decode"]
    with ServerProcess(["--pd-disaggregation", "--prefill", prefill.url, str(ports["prefill"]), "--decode",
                        decode.url], command="router") as router:
        prompts = [f"Story {i}: " + "the river runs on " * 12 for i in range(6)]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda p: _generate(router.url, p, max_new_tokens=32), prompts))
        want = [_generate(servers["colocated"].url, p, max_new_tokens=32) for p in prompts]
        assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
        too_long = httpx.post(f"{router.url}/generate", json={"text": "x " * 400, "sampling_params": {
            "max_new_tokens": 100}}, timeout=60)
        assert too_long.status_code == 400 and "KV pool" in too_long.json()["error"]["message"]
        for s in (prefill, decode):
            assert_no_kv_leak(httpx.Client(base_url=s.url))
        assert _generate(router.url, prompts[0])["output_ids"]


def test_a_prefill_scheduler_that_dies_mid_transfer_costs_a_retry_not_the_request(fleet):
    servers, _, ports = fleet
    crashing, healthy, decode, colocated = (servers[n] for n in ("crashing", "prefill2", "decode", "colocated"))
    # Both prefill servers idle and their trees empty (no other test uses them): the tie goes to the first, the
    # crashing one.
    with ServerProcess(["--pd-disaggregation", "--prefill", crashing.url, str(ports["crashing"]), "--prefill",
                        healthy.url, str(ports["prefill2"]), "--decode", decode.url, *FAST_HEALTH],
                       command="router") as router:
        want = _generate(colocated.url, PROMPTS[1])
        got = _generate(router.url, PROMPTS[1])
        assert got["output_ids"] == want["output_ids"]
        metrics = httpx.get(f"{router.url}/metrics").text
        retried = [line for line in metrics.splitlines() if line.startswith("radixflow_router_retries_total")]
        assert any(crashing.url in line and not line.endswith(" 0.0") for line in retried), retried
        assert_no_kv_leak(httpx.Client(base_url=decode.url))
        assert _generate(router.url, PROMPTS[0])["output_ids"] == _generate(colocated.url, PROMPTS[0])["output_ids"]
        health = httpx.get(f"{router.url}/list_workers").json()
        assert {w["role"] for w in health["workers"]} == {"prefill", "decode"}


def test_router_health_needs_a_prefill_and_a_decode_server(fleet):
    servers, _, _ = fleet
    dead = f"http://127.0.0.1:{free_port()}"
    # `with` starts it (and stops it): a `.start()` here as well would launch a second router and orphan the first.
    with ServerProcess(["--pd-disaggregation", "--prefill", dead, "--decode", servers["decode"].url, *FAST_HEALTH],
                       command="router") as router:
        for _ in range(40):  # the first health round takes the dead prefill server out
            r = httpx.get(f"{router.url}/health")
            if r.status_code == 503:
                break
            time.sleep(0.25)
        assert r.status_code == 503 and "pair" in r.json()["message"]
        r = httpx.post(f"{router.url}/generate", json={"text": "hi"}, timeout=30)
        assert r.status_code == 503 and json.loads(r.text)["error"]["code"] == "unavailable"
