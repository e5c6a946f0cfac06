"""`Runtime`: launch a radixflow server in a subprocess and use it as a backend through `RuntimeEndpoint`, with
SGLang's `sgl.Runtime(model_path=..., **server_args)` signature."""

from __future__ import annotations

import atexit
import dataclasses
import json
import typing

import httpx

from radixflow.backends.runtime_endpoint import RuntimeEndpoint
from radixflow.runtime.config import EngineConfig, ServerConfig
from radixflow.runtime.model_source import resolve_model
from radixflow.runtime.tokenizer import load_tokenizer
from radixflow.server.launch import ServerProcess


def _leaf_fields(config_cls) -> set[str]:
    hints = typing.get_type_hints(config_cls)
    names = set()
    for f in dataclasses.fields(config_cls):
        names |= _leaf_fields(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else {f.name}
    return names


# radixflow's flags, which take SGLang's names where SGLang has the feature.
OWN_FLAGS = _leaf_fields(EngineConfig) | _leaf_fields(ServerConfig)
# SGLang server arguments radixflow takes under another name, or only at the value that means "not used".
SGLANG_RENAMED = {"random_seed": "seed"}
SGLANG_ONLY_DEFAULT = {"trust_remote_code": False, "skip_tokenizer_init": False}


def server_flags(server_args: dict) -> list[str]:
    """`radixflow serve` flags for SGLang-style server arguments. A name radixflow does not know, or a value it
    cannot honour, is refused here, naming the argument (never at the server's argument parsing)."""
    flags = []
    for key, value in server_args.items():
        if key in SGLANG_ONLY_DEFAULT:
            if value != SGLANG_ONLY_DEFAULT[key]:
                raise ValueError(f"Runtime: {key}={value!r} is not supported by radixflow (only "
                                 f"{SGLANG_ONLY_DEFAULT[key]!r})")
            continue
        if key == "chunked_prefill_size" and value is not None and value <= 0:  # SGLang's -1: chunking off
            flags.append("--no-enable-chunked-prefill")
            continue
        key = SGLANG_RENAMED.get(key, key)
        if key not in OWN_FLAGS:
            raise TypeError(f"Runtime: unknown server argument {key!r}; radixflow takes {', '.join(sorted(OWN_FLAGS))}")
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif value is not None:
            flags += [flag, str(value)]
    return flags


class Runtime:
    """`Runtime(model_path=..., **server_args)`: a server for this program, used as a backend
    (`set_default_backend(runtime)`); `max_total_tokens=16384` is `--max-total-tokens 16384`. It stops with
    `shutdown()`, or when the interpreter exits."""

    def __init__(self, model_path: str | None = None, port: int | None = None, api_key: str | None = None,
                 startup_timeout_s: float = 600.0, log_level: str = "warning", **server_args):
        args = ["--log-level", log_level, *server_flags(server_args)]
        if model_path:
            args += ["--model-path", str(model_path)]
        self.model_path = model_path
        self.server = ServerProcess(args, api_key=api_key).start(port)
        atexit.register(self.shutdown)
        try:
            self.server.wait_ready(startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self.url = self.server.url
        self.endpoint = RuntimeEndpoint(self.url, api_key)
        self._tokenizer = None

    def generate(self, prompt: str, sampling_params: dict | None = None, return_logprob: bool = False,
                 logprob_start_len: int | None = None, top_logprobs_num: int | None = None) -> str:
        """One `/generate` call; returns the response's JSON text, as SGLang's `Runtime.generate` does."""
        body = {"text": prompt, "sampling_params": sampling_params or {}, "return_logprob": return_logprob,
                "logprob_start_len": -1 if logprob_start_len is None else logprob_start_len,
                "top_logprobs_num": top_logprobs_num or 0}
        response = httpx.post(f"{self.url}/generate", json=body, headers=self.server.headers, timeout=600)
        if response.status_code != 200:
            raise RuntimeError(f"server answered {response.status_code}: {response.text}")
        return json.dumps(response.json())

    def get_tokenizer(self):
        """The served model's tokenizer (loaded in this process from the same files)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(resolve_model(self.model_path))
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self.get_tokenizer().encode(text)

    def cache_prefix(self, prefix: str) -> None:
        self.endpoint.cache_prefix(prefix)

    def shutdown(self) -> None:
        if getattr(self, "endpoint", None) is not None:
            self.endpoint.shutdown()
        self.server.stop(timeout_s=20)
        atexit.unregister(self.shutdown)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
