"""`Runtime`: launch a radixflow server in a subprocess and use it as a backend through `RuntimeEndpoint`."""

from __future__ import annotations

from radixflow.backends.runtime_endpoint import RuntimeEndpoint
from radixflow.server.launch import ServerProcess


class Runtime:
    """`Runtime(model_path=..., **server_flags)`: use as a backend (`set_default_backend(runtime)`); flags are
    `radixflow serve`'s (`max_total_tokens=16384` is `--max-total-tokens 16384`, True is a bare flag)."""

    def __init__(self, model_path: str | None = None, port: int | None = None, api_key: str | None = None,
                 startup_timeout_s: float = 600.0, log_level: str = "warning", **flags):
        args = ["--log-level", log_level, *(["--model-path", str(model_path)] if model_path else [])]
        for key, value in flags.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value not in (False, None):
                args += [flag, str(value)]
        self.server = ServerProcess(args, api_key=api_key).start(port)
        self.server.wait_ready(startup_timeout_s)
        self.url = self.server.url
        self.endpoint = RuntimeEndpoint(self.url, api_key)

    def shutdown(self) -> None:
        self.endpoint.shutdown()
        self.server.stop(timeout_s=20)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
