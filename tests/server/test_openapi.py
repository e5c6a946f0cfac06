"""`/openapi.json` documents every endpoint's request body (FastAPI builds it from the pydantic models)."""

from __future__ import annotations


def test_every_post_endpoint_has_a_request_schema(client):
    spec = client.get("/openapi.json").json()
    posts = {path: ops["post"] for path, ops in spec["paths"].items() if "post" in ops}
    assert {"/generate", "/abort_request", "/flush_cache", "/v1/completions", "/v1/chat/completions", "/v1/messages",
            "/v1/messages/count_tokens"} <= set(posts)
    for path, op in posts.items():
        schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
        assert schema, f"{path} has no request schema"
    fields = spec["components"]["schemas"]
    assert {"text", "input_ids", "sampling_params", "rid", "stream"} <= set(fields["GenerateRequest"]["properties"])
    assert {"model", "messages", "response_format"} <= set(fields["ChatBody"]["properties"])
    assert {"model", "messages", "system", "max_tokens", "stop_sequences", "tools", "tool_choice",
            "output_config"} <= set(fields["MessagesBody"]["properties"])
