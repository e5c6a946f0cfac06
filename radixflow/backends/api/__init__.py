"""API-model backends: OpenAI (and OpenAI-compatible servers), Anthropic, Gemini (`VertexAI`), LiteLLM. Each module
imports its provider's SDK, so `radixflow` imports them only when a program asks for one (radixflow/__init__.py)."""
