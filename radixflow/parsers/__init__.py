"""Parsers of a model's raw output, shared by the server (OpenAI responses) and the frontend: reasoning blocks
(`reasoning`) and tool calls (`tool_calls`), each whole and streamed. Pure text in, text and plain data out."""
