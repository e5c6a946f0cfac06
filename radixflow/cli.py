"""Command line: `radixflow generate ...` (and `python -m radixflow ...`).

Engine flags are generated from the config dataclasses (`radixflow generate --help` lists them all).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from radixflow.engine import Engine
from radixflow.errors import InvalidRequestError
from radixflow.router.app import Router, serve_router
from radixflow.router.config import RouterConfig
from radixflow.router.launch import serve_data_parallel
from radixflow.router.pd import PDRouter
from radixflow.runtime.config import EngineConfig, ServerConfig, add_cli_args, from_cli_args
from radixflow.server.app import serve


def _generate(args: argparse.Namespace) -> int:
    config = from_cli_args(EngineConfig, args)
    start = time.monotonic()
    engine = Engine.from_config(config)
    print(f"[radixflow] loaded {engine.core.loaded.source.path.name} in {time.monotonic() - start:.1f}s",
          file=sys.stderr)
    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "stop": args.stop or []}
    prompts = [engine.apply_chat_template([{"role": "user", "content": p}]) if args.chat else p for p in args.prompt]
    try:
        if args.stream and len(prompts) == 1:
            for chunk in engine.generate(prompts[0], params, stream=True):
                print(chunk["text"], end="", flush=True)
            print()
        else:
            start = time.monotonic()
            outs = engine.generate(prompts, params)
            elapsed = time.monotonic() - start
            for prompt, out in zip(args.prompt, outs):
                print(f"=== {prompt!r}\n{out['text']}\n")
            tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
            print(f"[radixflow] {tokens} tokens in {elapsed:.2f}s ({tokens / elapsed:.1f} tok/s)", file=sys.stderr)
    except InvalidRequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.shutdown()
    return 0


def _serve(args: argparse.Namespace) -> int:
    engine, server = from_cli_args(EngineConfig, args), from_cli_args(ServerConfig, args)
    if server.dp_size != 1:
        serve_data_parallel(engine, server, from_cli_args(RouterConfig, args, prefix="router_"))
    else:
        serve(engine, server)
    return 0


def _router(args: argparse.Namespace) -> int:
    config = from_cli_args(RouterConfig, args)
    try:
        if args.pd_disaggregation:
            router = PDRouter([_prefill_arg(p) for p in args.prefill or []], args.decode or [], config)
        elif not args.worker_urls:
            print("error: --worker-urls: give at least one worker URL (more can join through /add_worker)",
                  file=sys.stderr)
            return 2
        else:
            router = Router(args.worker_urls, config)
        serve_router(router, args.host, args.port, args.log_level, args.api_key)
    except ValueError as exc:  # a bad option value (policy, tree source, a worker URL): named, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _prefill_arg(values: list[str]) -> tuple[str, int | None]:
    """`--prefill URL [BOOTSTRAP_PORT]`."""
    if len(values) > 2 or (len(values) == 2 and not values[1].isdigit()):
        raise ValueError(f"--prefill: give URL [BOOTSTRAP_PORT], got {' '.join(values)}")
    return values[0], int(values[1]) if len(values) == 2 else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("prompt", nargs="+", help="prompt text (several prompts run as one batch)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.add_argument("--stream", action="store_true", help="print tokens as they come (single prompt)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--log-level", default="warning")
    add_cli_args(gen, EngineConfig)
    gen.set_defaults(func=_generate)
    srv = sub.add_parser("serve", help="run the HTTP server (native /generate and OpenAI /v1/*)")
    add_cli_args(srv, ServerConfig)
    add_cli_args(srv, EngineConfig)
    add_cli_args(srv, RouterConfig, prefix="router_")
    srv.set_defaults(func=_serve)
    rtr = sub.add_parser("router", help="route requests across several radixflow servers (data parallelism)")
    rtr.add_argument("--worker-urls", nargs="*", default=[], help="the servers' base URLs (http://host:port)")
    rtr.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    rtr.add_argument("--port", type=int, default=30000, help="port to listen on (default: 30000)")
    rtr.add_argument("--api-key", default=None, help="require this key of clients (Bearer or x-api-key); the "
                     "client's key headers are passed on to the workers")
    rtr.add_argument("--log-level", default="info")
    rtr.add_argument("--pd-disaggregation", action="store_true",
                     help="route each request to a prefill server and a decode server (servers started with "
                          "--disaggregation-mode prefill / decode)")
    rtr.add_argument("--prefill", nargs="+", action="append", metavar=("URL", "BOOTSTRAP_PORT"),
                     help="a prefill server and its --disaggregation-bootstrap-port (default 8998); repeatable")
    rtr.add_argument("--decode", action="append", metavar="URL", help="a decode server; repeatable")
    add_cli_args(rtr, RouterConfig)
    rtr.set_defaults(func=_router)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(args.func(args))
