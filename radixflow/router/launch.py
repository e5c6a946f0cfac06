"""`radixflow serve --dp-size N`: N servers on free local ports and a router in front of them, in this process.

Each worker is a plain `radixflow serve` (its own scheduler, KV pool and radix cache) started with this command's
own options, so it is the same server a user could start by hand and add to a router on another machine. The
cores are split between the workers unless `--num-threads` says otherwise. The workers stop with the router.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from radixflow.router.app import Router, serve_router
from radixflow.router.config import RouterConfig
from radixflow.runtime.config import EngineConfig, ServerConfig, to_cli_args
from radixflow.server.launch import ServerProcess

# Options of the front server that are the router's, not the workers'. The workers listen on loopback only, so the
# router alone checks the API key.
_ROUTER_OWNED = ("host", "port", "dp_size", "api_key")


def serve_data_parallel(engine: EngineConfig, server: ServerConfig, router: RouterConfig) -> None:
    if server.dp_size < 1:
        raise ValueError(f"dp_size: must be >= 1, got {server.dp_size}")
    if engine.model.num_threads is None:
        threads = max(1, (os.cpu_count() or 1) // server.dp_size)
        engine = dataclasses.replace(engine, model=dataclasses.replace(engine.model, num_threads=threads))
    if router.tree_source == "events":
        engine = dataclasses.replace(engine, cache=dataclasses.replace(engine.cache, enable_cache_events=True))
    worker_server = dataclasses.replace(server, **{k: getattr(ServerConfig, k) for k in _ROUTER_OWNED})
    args = to_cli_args(engine) + to_cli_args(worker_server)
    logs = Path(tempfile.mkdtemp(prefix="radixflow-dp-"))
    workers = [ServerProcess(args, api_key=None, log=logs / f"worker-{i}.log") for i in range(server.dp_size)]

    def stop_workers() -> None:
        for w in workers:  # all drain at once
            if w.proc is not None and w.proc.poll() is None:
                w.proc.terminate()
        for w in workers:
            w.stop()

    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready()
    except BaseException:
        stop_workers()
        raise
    print(f"[radixflow] {server.dp_size} workers up ({', '.join(w.url for w in workers)}); logs in {logs}",
          flush=True)
    try:
        serve_router(Router([w.url for w in workers], router), server.host, server.port, server.log_level,
                     server.api_key, on_shutdown=stop_workers)
    finally:  # the router could not start (its port taken, say): the lifespan that stops the workers never ran
        stop_workers()
