"""Prefill/decode disaggregation inside one process: a prefill Engine and a decode Engine on the same weights, the
KV moving between them over gloo exactly as between servers, compared with a colocated Engine. Faster than the
server tests (tests/router/test_pd_disaggregation.py) and closer to the scheduler: what the decode side reports,
what a transfer that never comes frees, how batches and n > 1 map onto rooms."""

from __future__ import annotations

import concurrent.futures
import random
import time

import pytest

from radixflow import Engine
from radixflow.errors import KV_TRANSFER_FAILED
from radixflow.server.launch import free_port

GREEDY = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 12}


def _pair(model_path: str, **kwargs) -> tuple[Engine, Engine, int]:
    port = free_port()
    common = {"max_total_tokens": 4096, "disaggregation_transfer_timeout_s": 5, **kwargs}
    prefill = Engine(model_path, disaggregation_mode="prefill", disaggregation_bootstrap_port=port, **common)
    decode = Engine(model_path, disaggregation_mode="decode", **common)
    return prefill, decode, port


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    path = str(tiny_model_dir)
    colocated = Engine(path, max_total_tokens=4096)
    prefill, decode, port = _pair(path, chunked_prefill_size=32)  # long prompts are prefilled in chunks
    yield colocated, prefill, decode, port
    for engine in (colocated, prefill, decode):
        engine.shutdown()


def disaggregated(prefill: Engine, decode: Engine, port: int, prompt, sampling_params, **kwargs):
    """Send one request to both sides at once, as the router does; the decode side's answer is the client's."""
    boot = {"bootstrap_host": "127.0.0.1", "bootstrap_port": port, "bootstrap_room": random.getrandbits(63)}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(prefill.generate, prompt, sampling_params, **boot, **kwargs)
        answer = pool.submit(decode.generate, prompt, sampling_params, **boot, **kwargs)
        return first.result(timeout=60), answer.result(timeout=60)


def test_decode_side_continues_exactly_where_colocated_serving_would(engines):
    colocated, prefill, decode, port = engines
    prompts = ["The capital of France is", "word " * 90 + "and then"]  # the second is prefilled in 3 chunks
    for prompt in prompts:
        first, answer = disaggregated(prefill, decode, port, prompt, GREEDY, return_logprob=True)
        expected = colocated.generate(prompt, GREEDY, return_logprob=True)
        assert answer["output_ids"] == expected["output_ids"]
        assert first["output_ids"] == expected["output_ids"][:1]  # the prefill side stops after the first token
        got = [lp for lp, _, _ in answer["meta_info"]["output_token_logprobs"]]
        want = [lp for lp, _, _ in expected["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(want, abs=1e-4)  # the first one travelled with the KV
        assert answer["meta_info"]["finish_reason"] == expected["meta_info"]["finish_reason"]
    for engine in (prefill, decode):
        engine.check_integrity()


def _flat(x) -> list:
    """Token ids (int) and logprobs (float) of a nested logprob list, in order; None entries dropped."""
    if isinstance(x, (list, tuple)):
        return [y for item in x for y in _flat(item)]
    return [] if x is None else [x]


def test_prompt_logprobs_and_max_new_tokens_0_and_1_come_from_the_prefill_side(engines):
    colocated, prefill, decode, port = engines
    prompt = "Once upon a time, a robot"
    for max_new in (0, 1):
        params = {**GREEDY, "max_new_tokens": max_new}
        _, answer = disaggregated(prefill, decode, port, prompt, params, return_logprob=True, logprob_start_len=0,
                                  top_logprobs_num=2)
        expected = colocated.generate(prompt, params, return_logprob=True, logprob_start_len=0, top_logprobs_num=2)
        assert answer["output_ids"] == expected["output_ids"]
        for key in ("input_token_logprobs", "input_top_logprobs", "output_token_logprobs", "output_top_logprobs"):
            got, want = _flat(answer["meta_info"][key]), _flat(expected["meta_info"][key])
            assert [x for x in got if isinstance(x, int)] == [x for x in want if isinstance(x, int)], key
            assert [x for x in got if isinstance(x, float)] == pytest.approx(
                [x for x in want if isinstance(x, float)], abs=1e-4), key
    assert decode.stats()["kv_transfers"] >= 2


def test_batches_and_n_samples_map_to_consecutive_rooms(engines):
    colocated, prefill, decode, port = engines
    prompts = ["alpha beta gamma", "one two three four", "red green blue"]
    _, answers = disaggregated(prefill, decode, port, prompts, GREEDY)
    assert [a["output_ids"] for a in answers] == [colocated.generate(p, GREEDY)["output_ids"] for p in prompts]
    sampled = {"temperature": 0.8, "max_new_tokens": 6, "n": 3, "ignore_eos": True}
    _, samples = disaggregated(prefill, decode, port, "The weather today", sampled)
    assert len(samples) == 3 and all(len(s["output_ids"]) == 6 for s in samples)
    for engine in (prefill, decode):
        engine.check_integrity()


def _room() -> dict:
    return {"bootstrap_host": "127.0.0.1", "bootstrap_room": random.getrandbits(63)}


def test_a_decode_request_waits_for_a_slow_prefill_as_long_as_its_own_deadline(engines):
    """The prefill server may queue a prompt for longer than the transfer timeout (5 s here): the decode side
    waits for it without a limit of its own. What ends the wait is the request's deadline (or an abort)."""
    _, prefill, decode, port = engines
    boot = {**_room(), "bootstrap_port": port}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(decode.generate, "a prompt prefilled late", GREEDY, **boot)
        cpu = time.process_time()
        concurrent.futures.wait([answer], timeout=6.5)  # longer than the transfer timeout
        assert not answer.done()
        # Nothing to run but KV on the way: the decode engine sleeps instead of spinning a core (which it did).
        assert time.process_time() - cpu < 1.5
        first = prefill.generate("a prompt prefilled late", GREEDY, **boot)
        assert answer.result(timeout=30)["output_ids"][:1] == first["output_ids"]
    nobody = decode.generate("nobody prefills this prompt", GREEDY, timeout=1.5, **boot | _room())
    assert nobody["meta_info"]["finish_reason"]["type"] == "abort"
    assert "timeout" in nobody["meta_info"]["finish_reason"]["message"]
    stats = decode.stats()
    assert stats["num_receiving"] == 0
    assert stats["kv_free_tokens"] + stats["kv_evictable_tokens"] == stats["kv_total_tokens"]
    decode.check_integrity()


def test_a_prefill_whose_decode_server_never_registers_tells_a_late_one_so(engines):
    """The prefill side holds the KV for the transfer timeout at most; a decode request for that room that comes
    later fails at once with the reason instead of waiting for a transfer that will not come."""
    _, prefill, decode, port = engines
    boot = {**_room(), "bootstrap_port": port}
    failures = prefill.stats()["kv_transfer_failures"]
    assert prefill.generate("only the prefill side has it", GREEDY, **boot)["meta_info"]["finish_reason"]["type"] \
        == "length"
    deadline = time.monotonic() + 15
    while prefill.stats()["kv_transfer_failures"] == failures and time.monotonic() < deadline:
        time.sleep(0.2)  # the 5 s registration timeout runs out
    assert prefill.stats()["kv_transfer_failures"] == failures + 1
    start = time.monotonic()
    late = decode.generate("only the prefill side has it", GREEDY, **boot)
    assert time.monotonic() - start < 3
    assert late["meta_info"]["finish_reason"]["type"] == "abort"
    message = late["meta_info"]["finish_reason"]["message"]
    assert KV_TRANSFER_FAILED in message and "did not register" in message
    decode.check_integrity()
    prefill.check_integrity()


def test_an_abort_while_receiving_frees_the_slots_and_the_prefill_side_goes_on(engines):
    _, prefill, decode, port = engines
    boot = {"bootstrap_host": "127.0.0.1", "bootstrap_port": port, "bootstrap_room": random.getrandbits(63)}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(decode.generate, "an abandoned prompt", GREEDY, rid="abandoned", **boot)
        deadline = 0
        while decode.stats()["num_receiving"] == 0 and deadline < 200:  # admitted, its slots allocated
            deadline += 1
            concurrent.futures.wait([waiting], timeout=0.05)
        assert decode.stats()["num_receiving"] == 1
        decode.abort("abandoned")
        assert waiting.result(timeout=10)["meta_info"]["finish_reason"]["type"] == "abort"
    stats = decode.stats()
    assert stats["num_receiving"] == 0
    assert stats["kv_free_tokens"] + stats["kv_evictable_tokens"] == stats["kv_total_tokens"]
    decode.check_integrity()
    # The decode side marked its registration cancelled: a prefill that comes late sends nothing (the router
    # aborts both halves together; this is the race where one half is late).
    sent = prefill.stats()["kv_transfers"]
    late = prefill.generate("an abandoned prompt", GREEDY, **boot)
    assert late["meta_info"]["finish_reason"]["type"] == "length"
    time.sleep(0.5)  # the send runs on the sender's thread
    assert prefill.stats()["kv_transfers"] == sent
    prefill.check_integrity()
    assert decode.stats()["kv_free_tokens"] == stats["kv_free_tokens"]
    _, ok = disaggregated(prefill, decode, port, "The capital of France is", GREEDY)
    assert ok["meta_info"]["finish_reason"]["type"] == "length"


@pytest.mark.slow
def test_smollm2_greedy_outputs_equal_colocated(smol_engine):
    from radixflow.runtime.model_source import resolve_model

    path = str(resolve_model(None).path)
    # A first SmolLM2 forward takes seconds here (one-time weight packing): a longer transfer timeout. The same
    # step budget as the colocated engine: other chunk boundaries round differently and flip SmolLM2's near-ties
    # in colocated serving too.
    prefill, decode, port = _pair(path, max_total_tokens=8192, disaggregation_transfer_timeout_s=60)
    try:
        chat = smol_engine.apply_chat_template([{"role": "user", "content": "Name three colours of the rainbow."}])
        for prompt in [chat, "The history of the printing press", chat + "Red, orange"]:  # the third hits radix
            params = {"temperature": 0, "max_new_tokens": 24}
            _, answer = disaggregated(prefill, decode, port, prompt, params)
            assert answer["text"] == smol_engine.generate(prompt, params)["text"]
        assert decode.stats()["kv_transfers"] == 3
        for engine in (prefill, decode):
            engine.check_integrity()
    finally:
        prefill.shutdown()
        decode.shutdown()
