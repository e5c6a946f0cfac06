"""`priority` on the native and OpenAI requests: taken as an integer, refused otherwise, naming the field."""

from __future__ import annotations


def test_priority_is_taken_on_both_apis(client, model_name):
    r = client.post("/generate", json={"text": "hi", "priority": 3, "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json={"model": model_name, "max_tokens": 2, "priority": -1,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text


def test_a_bad_priority_names_the_field(client, model_name):
    for body, path in (({"text": "hi", "priority": "high"}, "/generate"),
                       ({"text": "hi", "priority": 2**40}, "/generate"),
                       ({"model": model_name, "prompt": "hi", "priority": 1.5}, "/v1/completions")):
        r = client.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text
