"""The API fuzzed from its own `/openapi.json` with schemathesis: every operation gets bodies valid under its schema
and bodies that are not (schemathesis' negative mode), on a server of its own (the tiny model, each request cut at
2 s so generated `max_tokens` cannot make the run long). No answer may be a 5xx, and afterwards the server is
healthy, idle and its KV integrity holds; the session's teardown also fails on any traceback in its log."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.helpers.server import assert_no_kv_leak

EXAMPLES = 25  # per operation and mode: bounded, the suite's time matters


@pytest.fixture(scope="module")
def operations(fuzz_server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    return {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}


def test_the_schema_covers_every_endpoint(operations):
    assert {"POST /generate", "POST /v1/completions", "POST /v1/chat/completions", "POST /v1/messages",
            "POST /v1/messages/count_tokens", "POST /abort_request", "POST /flush_cache", "GET /health"} <= \
        set(operations)


def fuzzer(url: str, log, model: str, name: str, operation, mode: GenerationMode, statuses: Counter):
    """A hypothesis test of `operation`: each generated request is sent, its status counted, a 5xx fails."""

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case):
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model  # a random name stops at the model check (404): reach the rest
        response = case.call(base_url=url, timeout=30)
        statuses[(name, response.status_code)] += 1
        assert response.status_code < 500, (name, case.body, response.text[:500])
        # A request the server handled may still have failed inside (the engine ends it and logs the error):
        # checked here, so hypothesis reports the body that did it.
        assert "Traceback" not in log.read_text(errors="replace"), (name, case.body)

    return fuzz


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_generated_request_gets_a_5xx(fuzz_server, operations, mode):
    statuses: Counter = Counter()
    model = httpx.get(f"{fuzz_server.url}/v1/models").json()["data"][0]["id"]
    for name, operation in sorted(operations.items()):
        try:
            fuzzer(fuzz_server.url, fuzz_server.log, model, name, operation, mode, statuses)()
        except Unsatisfiable:  # an operation without inputs (GET /health) has no invalid request to make
            assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET"
    print(f"\n{mode.value}: {sum(statuses.values())} requests; statuses: "
          f"{dict(sorted(Counter(s for (_, s), n in statuses.items() for _ in range(n)).items()))}")
    log = fuzz_server.log.read_text(errors="replace")
    assert "ERROR" not in log, log[-3000:]  # a handled request logs nothing
    with httpx.Client(base_url=fuzz_server.url, timeout=30) as client:
        assert client.get("/health").status_code == 200
        assert_no_kv_leak(client)
        good = client.post("/generate", json={"text": "still serving", "sampling_params": {"max_new_tokens": 4}})
        assert good.status_code == 200 and good.json()["meta_info"]["completion_tokens"] >= 1
