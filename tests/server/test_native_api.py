"""The native SGLang-style API (`/generate`) with httpx, on the tiny random model."""

from __future__ import annotations

import json
import time

import pytest

from tests.helpers.server import sse_events

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def generate(client, **body):
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_single_prompt(client, tokenizer):
    out = generate(client, text="Once upon a time", sampling_params={**GREEDY, "max_new_tokens": 10})
    meta = out["meta_info"]
    assert meta["completion_tokens"] == len(out["output_ids"]) == 10
    assert meta["prompt_tokens"] == len(tokenizer.encode("Once upon a time"))
    assert meta["finish_reason"]["type"] == "length"
    assert out["text"] == tokenizer.decode(out["output_ids"], skip_special_tokens=True)
    # The same prompt as token ids gives the same greedy output.
    by_ids = generate(client, input_ids=tokenizer.encode("Once upon a time"),
                      sampling_params={**GREEDY, "max_new_tokens": 10})
    assert by_ids["output_ids"] == out["output_ids"]


def test_batch_matches_single_runs(client):
    prompts = ["Alpha beta", "Gamma delta epsilon", "Zeta"]
    batch = generate(client, text=prompts, sampling_params={**GREEDY, "max_new_tokens": 8})
    assert isinstance(batch, list) and len(batch) == 3
    for prompt, out in zip(prompts, batch):
        single = generate(client, text=prompt, sampling_params={**GREEDY, "max_new_tokens": 8})
        assert out["output_ids"] == single["output_ids"] and out["text"] == single["text"]


def test_batch_with_per_prompt_params(client):
    batch = generate(client, text=["one", "two"],
                     sampling_params=[{**GREEDY, "max_new_tokens": 3}, {**GREEDY, "max_new_tokens": 6}])
    assert [o["meta_info"]["completion_tokens"] for o in batch] == [3, 6]


def test_stream_is_cumulative_and_ends_with_done(client):
    params = {**GREEDY, "max_new_tokens": 12}
    full = generate(client, text="Stream this", sampling_params=params)
    with client.stream("POST", "/generate", json={"text": "Stream this", "sampling_params": params,
                                                  "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) > 1
    for before, after in zip(chunks, chunks[1:]):
        assert after["text"].startswith(before["text"])  # each event carries the text so far, as SGLang does
        assert after["meta_info"]["completion_tokens"] >= before["meta_info"]["completion_tokens"]
    assert chunks[-1]["text"] == full["text"]
    assert chunks[-1]["output_ids"] == full["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])


def test_logprobs_with_text(client, tokenizer):
    prompt = "Probabilities of every token"
    prompt_ids = tokenizer.encode(prompt)
    out = generate(client, text=prompt, sampling_params={**GREEDY, "max_new_tokens": 5}, return_logprob=True,
                   logprob_start_len=0, top_logprobs_num=2, return_text_in_logprobs=True)
    meta = out["meta_info"]
    inputs, outputs = meta["input_token_logprobs"], meta["output_token_logprobs"]
    assert [t for _, t, _ in inputs] == prompt_ids
    assert inputs[0][0] is None and all(lp <= 0 for lp, _, _ in inputs[1:])  # position 0 has no logprob
    assert [t for _, t, _ in outputs] == out["output_ids"]
    assert all(text == tokenizer.decode([t]) for _, t, text in inputs + outputs)
    assert len(meta["input_top_logprobs"]) == len(prompt_ids) and meta["input_top_logprobs"][0] is None
    assert all(len(row) == 2 for row in meta["input_top_logprobs"][1:] + meta["output_top_logprobs"])
    for (lp, token, _), top in zip(outputs, meta["output_top_logprobs"]):
        assert top[0][1] == token and top[0][0] == pytest.approx(lp, abs=1e-5)  # greedy: the best token
        assert top[0][0] >= top[1][0]

    # Teacher forcing: the output tokens scored as a prompt get the logprobs they were generated with.
    rescored = generate(client, input_ids=prompt_ids + out["output_ids"], sampling_params={"max_new_tokens": 0},
                        return_logprob=True, logprob_start_len=len(prompt_ids))
    scored = rescored["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in scored] == out["output_ids"]
    assert [lp for lp, _, _ in scored] == pytest.approx([lp for lp, _, _ in outputs], abs=1e-3)


def test_logprob_start_len_limits_the_prompt_logprobs(client):
    out = generate(client, input_ids=[10, 20, 30, 40, 50], sampling_params={"max_new_tokens": 1},
                   return_logprob=True, logprob_start_len=3)
    assert [t for _, t, _ in out["meta_info"]["input_token_logprobs"]] == [40, 50]
    without = generate(client, input_ids=[10, 20, 30, 40, 50], sampling_params={"max_new_tokens": 1})
    assert "input_token_logprobs" not in without["meta_info"]
    assert "output_token_logprobs" not in without["meta_info"]


def test_abort_request_by_rid(client):
    rid = "abort-me-please"
    body = {"text": "A very long story", "rid": rid, "stream": True,
            "sampling_params": {"max_new_tokens": 1900, "ignore_eos": True}}
    with client.stream("POST", "/generate", json=body) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first.removeprefix("data: "))["meta_info"]["finish_reason"] is None
        assert client.post("/abort_request", json={"rid": rid}).json() == {"success": True}
        events = sse_events(lines)
    assert events[-1] == "[DONE]"
    final = events[-2]["meta_info"]
    assert final["finish_reason"]["type"] == "abort"
    assert final["completion_tokens"] < 1900
    # The rid is free again once the request is gone.
    again = generate(client, text="short", rid=rid, sampling_params={"max_new_tokens": 1})
    assert again["meta_info"]["id"] == rid


def test_abort_unknown_rid_is_harmless(client):
    assert client.post("/abort_request", json={"rid": "never-existed"}).status_code == 200
    response = client.post("/abort_request", json={"id": 3})
    assert response.status_code == 400 and "rid" in response.json()["error"]["message"]


def test_batch_with_n_samples_is_flat_prompt_major_with_derived_rids(client):
    """SGLang's shape, the same as `Engine.generate`'s (tests/e2e/test_engine_features.py)."""
    out = generate(client, text=["Alpha", "Beta gamma"], rid=["p", "q"],
                   sampling_params={**GREEDY, "max_new_tokens": 4, "n": 2})
    assert [o["meta_info"]["id"] for o in out] == ["p_0", "p_1", "q_0", "q_1"]
    assert out[0]["output_ids"] == out[1]["output_ids"] and out[2]["output_ids"] == out[3]["output_ids"]
    single = generate(client, text="Beta gamma", sampling_params={**GREEDY, "max_new_tokens": 4})
    assert out[2]["output_ids"] == single["output_ids"]
    one_rid = generate(client, text=["Alpha", "Beta gamma"], rid="b", sampling_params={**GREEDY, "max_new_tokens": 1})
    assert [o["meta_info"]["id"] for o in one_rid] == ["b_0", "b_1"]


def test_abort_request_aborts_every_request_made_from_the_rid(client):
    import threading

    body = {"text": ["one story", "another"], "rid": "family",
            "sampling_params": {"max_new_tokens": 1900, "ignore_eos": True, "n": 2}}
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=generate(client, **body)))
    worker.start()
    deadline = time.monotonic() + 20
    while client.get("/get_server_info").json()["stats"]["num_running"] < 4:
        assert time.monotonic() < deadline, "the batch never started"
        time.sleep(0.05)
    assert client.post("/abort_request", json={"rid": "family"}).json() == {"success": True}
    worker.join(timeout=30)
    reasons = [o["meta_info"]["finish_reason"]["type"] for o in result["out"]]
    assert reasons == ["abort"] * 4
