"""The router: one HTTP endpoint in front of several radixflow servers (`radixflow router --worker-urls ...`, or
`radixflow serve --dp-size N`, which starts the workers too).

It speaks plain HTTP to its workers, so they can run anywhere. A request is read once (for the text the policy
routes by, and its `stream` flag), sent to the worker the policy picks, and its answer relayed as it comes,
streams included.

Failures. A worker that refuses the connection is out of rotation at once (its tree dropped); the health checker
takes out one that fails `--health-failure-threshold` checks in a row and brings a worker back after
`--health-success-threshold` passed ones. A request is retried on another worker (at most `--retry-max-retries`
times) while nothing of its answer has reached the client: the connection was refused, the worker answered 503
(queue full, draining, scheduler down), or it failed before answering. Generation has no side effects, so a
non-streaming request that died with its worker runs again elsewhere and the client sees one answer. A stream
whose worker fails after its first event has started: it ends with an error event that names the worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from radixflow.router.config import RouterConfig
from radixflow.router.events import CacheEventFeed
from radixflow.router.policy import CacheAware, Worker, make_policy
from radixflow.router.tree import PrefixTree
from radixflow.server.app import KEEP_ALIVE_S
from radixflow.server.errors import APIError, error_response
from radixflow.server.guard import Guard

logger = logging.getLogger(__name__)

# Client headers passed on to the worker (its API key, Anthropic's version headers) and worker headers passed back.
_REQUEST_HEADERS = ("authorization", "x-api-key", "anthropic-version", "anthropic-beta", "content-type")
_RESPONSE_HEADERS = ("content-type", "retry-after", "cache-control")

# Endpoints routed by policy; their bodies carry the text a cache-aware policy matches.
ROUTED = ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens")


class RouterMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("radixflow_router_requests", "requests sent to a worker", ["worker"], registry=r)
        self.decisions = Counter("radixflow_router_decisions", "routing decisions by reason", ["reason"],
                                 registry=r)
        self.retries = Counter("radixflow_router_retries", "requests retried on another worker, by cause",
                               ["worker", "cause"], registry=r)
        self.failures = Counter("radixflow_router_worker_failures", "failed requests and health checks",
                                ["worker", "kind"], registry=r)
        self.in_flight = Gauge("radixflow_router_in_flight", "requests in flight", ["worker"], registry=r)
        self.healthy = Gauge("radixflow_router_worker_healthy", "1 while in rotation", ["worker"], registry=r)
        self.tree_chars = Gauge("radixflow_router_tree_chars", "characters in the worker's tree", ["worker"],
                                registry=r)

    def render(self, workers: list[Worker]) -> bytes:
        for w in workers:
            self.in_flight.labels(w.url).set(w.load)
            self.healthy.labels(w.url).set(int(w.healthy))
            self.tree_chars.labels(w.url).set(w.tree.size)
        return generate_latest(self.registry)


class Router:
    def __init__(self, worker_urls: list[str], config: RouterConfig):
        if config.tree_source not in ("requests", "events"):
            raise ValueError(f"tree_source: {config.tree_source!r} is not one of requests, events")
        self.config = config
        self.workers = [Worker(_normalize(url)) for url in worker_urls]
        self.policy = make_policy(config.policy, config.cache_threshold, config.balance_abs_threshold,
                                  config.balance_rel_threshold, learn_from_requests=config.tree_source == "requests")
        self.metrics = RouterMetrics()
        self.client: httpx.AsyncClient | None = None
        self.events: CacheEventFeed | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        # No pool limit: the workers' own admission control decides how much they take.
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(self.config.request_timeout_secs, connect=5.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        self._tasks.append(asyncio.create_task(self._health_loop()))
        if isinstance(self.policy, CacheAware):
            self._tasks.append(asyncio.create_task(self._eviction_loop()))
            if self.config.tree_source == "events":
                self.events = CacheEventFeed(self.client)
                self._tasks.append(asyncio.create_task(self._events_loop()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.aclose()

    def healthy(self) -> list[Worker]:
        return [w for w in self.workers if w.healthy]

    def ready(self) -> bool:
        """Whether the router can serve a request now (its /health)."""
        return bool(self.healthy())

    # --- proxying -----------------------------------------------------------------------------------------

    async def route(self, request: Request, path: str) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = None  # not JSON: any worker answers the 400
        if not isinstance(body, dict):
            text = ""
        elif self.events is not None:
            text = self.events.prompt_text(path, body)
        else:
            text = routing_text(path, body)
        stream = isinstance(body, dict) and body.get("stream") is True
        headers = {k: v for k, v in request.headers.items() if k.lower() in _REQUEST_HEADERS}
        tried: set[Worker] = set()
        refusal: Response | None = None
        for _ in range(self.config.retry_max_retries + 1):
            candidates = [w for w in self.healthy() if w not in tried]
            if not candidates:
                break
            decision = self.policy.select(candidates, text)
            worker = decision.worker
            tried.add(worker)
            self.metrics.decisions.labels(decision.reason).inc()
            answer = await self._send(worker, path, raw, headers, dict(request.query_params), stream)
            if isinstance(answer, Response):
                return answer
            refusal = answer.refusal or refusal
            self.metrics.retries.labels(worker.url, answer.cause).inc()
        if refusal is not None:
            return refusal
        raise APIError(503, "no worker is available to take the request"
                       + (f" (tried {', '.join(w.url for w in tried)})" if tried else ""),
                       type_="server_error", code="unavailable", headers={"Retry-After": "1"})

    async def _send(self, worker: Worker, path: str, raw: bytes, headers: dict, params: dict,
                    stream: bool) -> Response | _NotStarted:
        """The worker's answer as the client's response, or why it did not start there (so another may take it)."""
        self.metrics.requests.labels(worker.url).inc()
        worker.load += 1
        upstream = None
        streaming = False  # set once the stream is handed to the client's response, which then owns the load
        try:
            upstream = await self.client.send(
                self.client.build_request("POST", worker.url + path, content=raw, headers=headers, params=params),
                stream=True)
            if upstream.status_code == 503:  # the worker cannot take it now; another may
                content = await upstream.aread()
                return _NotStarted("refused", _relayed(upstream, content))
            if not (stream and upstream.status_code == 200):
                return _relayed(upstream, await upstream.aread())
            chunks = upstream.aiter_raw()
            first = await anext(chunks, b"")
            streaming = True
            held = _HeldStream(worker, upstream, first)
            response = StreamingResponse(self._relay(held, chunks, path), status_code=200,
                                         headers=_response_headers(upstream))
            response.held = held  # the PD router looks at the first event, and may drop the stream unsent
            return response
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            self._take_out(worker, f"no connection: {type(exc).__name__}: {exc}")
            return _NotStarted("connect")
        except httpx.TimeoutException as exc:
            raise APIError(504, f"worker {worker.url} did not answer within the request timeout "
                                f"({self.config.request_timeout_secs:g} s): {type(exc).__name__}",
                           type_="server_error") from exc
        except httpx.HTTPError as exc:  # the connection broke before any of the answer reached the client
            self._failed(worker, "request", exc)
            return _NotStarted("worker_failed")
        finally:
            if not streaming:
                worker.load -= 1
                if upstream is not None:
                    await upstream.aclose()

    async def _relay(self, held: _HeldStream, chunks, path: str):
        worker = held.worker
        try:
            yield held.first
            async for chunk in chunks:
                yield chunk
        except httpx.HTTPError as exc:
            self._failed(worker, "stream", exc)
            yield _error_event(path, f"worker {worker.url} failed while streaming the answer: "
                                     f"{type(exc).__name__}: {exc}")
        finally:
            await held.close()

    # --- worker health ------------------------------------------------------------------------------------

    def _take_out(self, worker: Worker, reason: str) -> None:
        if worker.healthy:
            logger.warning("worker %s out of rotation: %s", worker.url, reason)
        worker.healthy = False
        worker.failures = max(worker.failures, self.config.health_failure_threshold)
        worker.successes = 0
        worker.tree = PrefixTree()  # what it cached may be gone (a restart); relearn from scratch
        if self.events is not None:
            self.events.forget(worker)

    def _failed(self, worker: Worker, kind: str, exc: Exception) -> None:
        """A request failed on `worker` after it was sent: check its health now rather than at the next round."""
        self.metrics.failures.labels(worker.url, kind).inc()
        logger.warning("worker %s failed a %s: %s: %s", worker.url, kind, type(exc).__name__, exc)
        self._tasks.append(asyncio.create_task(self._check(worker)))

    async def _check(self, worker: Worker) -> None:
        try:
            r = await self.client.get(worker.url + "/health", timeout=self.config.health_check_timeout_secs)
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok:
            worker.failures = 0
            if not worker.healthy:
                worker.successes += 1
                if worker.successes >= self.config.health_success_threshold:
                    worker.healthy, worker.successes = True, 0
                    logger.info("worker %s back in rotation", worker.url)
            return
        self.metrics.failures.labels(worker.url, "health").inc()
        worker.failures += 1
        if worker.failures >= self.config.health_failure_threshold:
            self._take_out(worker, f"{worker.failures} failed health checks")

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_check_interval_secs)
            await asyncio.gather(*(self._check(w) for w in list(self.workers)))
            self._tasks = [t for t in self._tasks if not t.done()]

    async def _eviction_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.eviction_interval_secs)
            for w in self.workers:
                w.tree.evict(self.config.max_tree_size)

    async def _events_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.events.poll(w) for w in self.healthy()))
            await asyncio.sleep(self.config.cache_events_interval_secs)

    # --- fleet management ---------------------------------------------------------------------------------

    async def add_worker(self, url: str) -> Worker:
        url = _worker_url(url)
        if any(w.url == url for w in self.workers):
            raise APIError(400, f"url: worker {url} is already in the router", "url")
        deadline = time.monotonic() + self.config.worker_startup_timeout_secs
        while True:
            try:
                if (await self.client.get(url + "/health", timeout=self.config.health_check_timeout_secs)
                        ).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise APIError(400, f"url: worker {url} was not healthy within --worker-startup-timeout-secs "
                                    f"({self.config.worker_startup_timeout_secs:g} s)", "url")
            await asyncio.sleep(0.5)
        worker = Worker(url)
        self.workers.append(worker)
        logger.info("worker %s added", url)
        return worker

    def remove_worker(self, url: str) -> str:
        url = _worker_url(url)
        found = [w for w in self.workers if w.url == url]
        if not found:
            raise APIError(404, f"url: no worker {url} in the router", "url", type_="not_found_error")
        self.workers.remove(found[0])
        if self.events is not None:
            self.events.forget(found[0])
        logger.info("worker %s removed", url)
        return url

    async def server_info(self) -> dict:
        """Every worker's /get_server_info, and the fleet's sums."""
        async def one(w: Worker) -> dict:
            entry = {"url": w.url, "role": w.role, "healthy": w.healthy, "in_flight": w.load,
                     "tree_chars": w.tree.size}
            if w.healthy:
                try:
                    r = await self.client.get(w.url + "/get_server_info", timeout=10)
                    entry["server_info"] = r.json()
                except (httpx.HTTPError, ValueError) as exc:
                    entry["error"] = f"{type(exc).__name__}: {exc}"
            return entry

        workers = await asyncio.gather(*(one(w) for w in self.workers))
        totals: dict[str, float] = {}
        for entry in workers:
            for key, value in entry.get("server_info", {}).get("stats", {}).items():
                if isinstance(value, int | float) and not isinstance(value, bool) and not key.endswith("_rate"):
                    totals[key] = totals.get(key, 0) + value
        if totals.get("prompt_tokens"):
            totals["cache_hit_rate"] = totals.get("cache_hit_tokens", 0) / totals["prompt_tokens"]
        return {"router": {"policy": self.policy.name, "tree_source": self.config.tree_source,
                           "num_workers": len(self.workers), "num_healthy": len(self.healthy())},
                "stats": totals, "workers": workers}


class _HeldStream:
    """A worker's stream whose first chunk is read: the router relays it, or closes it unsent (`close`, once)."""

    def __init__(self, worker: Worker, upstream: httpx.Response, first: bytes):
        self.worker, self.upstream, self.first = worker, upstream, first
        self._open = True

    async def close(self) -> None:
        if self._open:
            self._open = False
            self.worker.load -= 1
            await self.upstream.aclose()


class _NotStarted:
    """A request that did not start on a worker: `cause` for the metrics, and the worker's refusal (503) to give
    the client if no other worker takes it."""

    def __init__(self, cause: str, refusal: Response | None = None):
        self.cause, self.refusal = cause, refusal


def routing_text(path: str, body: dict) -> str:
    """The text a request's prompt begins with, as far as the router can tell without the tokenizer: the prompt for
    completions, the messages as JSON for chat (a shared system prompt and history are a shared prefix there too),
    token ids as text."""
    match path:
        case "/generate":
            prompt = body.get("text")
            if prompt is None:
                prompt = body.get("input_ids")
        case "/v1/completions":
            prompt = body.get("prompt")
        case _:
            system = body.get("system")
            prompt = (json.dumps(system) if system else "") + json.dumps(body.get("messages"))
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch: route by its first prompt (it goes to one worker as a whole)
    if isinstance(prompt, list):
        return " ".join(map(str, prompt))
    return prompt if isinstance(prompt, str) else ""


def _normalize(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"url: {url!r} is not an http(s) URL")
    return url


def _worker_url(url: str) -> str:
    """`_normalize` for a URL from a request: a bad one is the client's 400."""
    try:
        return _normalize(url)
    except ValueError as exc:
        raise APIError(400, str(exc), "url") from exc


def _response_headers(upstream: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k.lower() in _RESPONSE_HEADERS}


def _relayed(upstream: httpx.Response, content: bytes) -> Response:
    return Response(content, status_code=upstream.status_code, headers=_response_headers(upstream))


def _error_event(path: str, message: str) -> bytes:
    if path.startswith("/v1/messages"):
        payload = {"type": "error", "error": {"type": "api_error", "message": message}}
        return f"event: error\ndata: {json.dumps(payload)}\n\n".encode()
    payload = {"error": {"message": message, "type": "server_error", "param": None, "code": "worker_failed"}}
    return f"data: {json.dumps(payload)}\n\n".encode()


def create_router_app(router: Router, api_key: str | None = None,
                      on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """`on_shutdown` runs (in a thread) when the router stops: `serve --dp-size` stops its workers there, since
    uvicorn ends the process by re-raising the signal it caught once the app is down."""
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await router.start()
        yield
        await router.close()
        if on_shutdown is not None:
            await asyncio.to_thread(on_shutdown)

    app = FastAPI(title="radixflow router", lifespan=lifespan)
    app.state.router = router
    app.add_middleware(Guard, api_key=api_key)

    async def handle(request: Request, exc: Exception):
        return error_response(exc, request.url.path)

    app.add_exception_handler(APIError, handle)

    for path in ROUTED:
        async def routed(request: Request, path: str = path):
            return await router.route(request, path)
        app.add_api_route(path, routed, methods=["POST"])

    async def any_worker(request: Request) -> Response:
        """A GET every worker answers the same (model list, model info): the first healthy one answers."""
        for worker in router.healthy():
            try:
                r = await router.client.get(worker.url + request.url.path,
                                            headers={k: v for k, v in request.headers.items()
                                                     if k.lower() in _REQUEST_HEADERS})
                return _relayed(r, r.content)
            except httpx.HTTPError as exc:
                router._failed(worker, "request", exc)
        raise APIError(503, "no worker is available", type_="server_error", code="unavailable")

    for path in ("/v1/models", "/get_model_info"):
        app.add_api_route(path, any_worker, methods=["GET"])

    @app.get("/health")
    async def health():
        healthy = router.healthy()
        if not router.ready():
            message = "no healthy prefill/decode pair" if healthy else "no healthy worker"
            return JSONResponse({"status": "error", "message": message}, status_code=503)
        return {"status": "ok", "healthy_workers": len(healthy), "workers": len(router.workers)}

    @app.get("/get_server_info")
    async def server_info():
        return await router.server_info()

    @app.get("/list_workers")
    async def list_workers():
        return {"urls": [w.url for w in router.workers],
                "workers": [{"url": w.url, "role": w.role, "healthy": w.healthy, "in_flight": w.load}
                            for w in router.workers]}

    @app.post("/add_worker")
    async def add_worker(url: str):
        worker = await router.add_worker(url)
        return {"success": True, "url": worker.url}

    @app.post("/remove_worker")
    async def remove_worker(url: str):
        return {"success": True, "url": router.remove_worker(url)}

    @app.post("/flush_cache")
    async def flush_cache():
        """Every worker's cache, and the router's trees with them."""
        results = {}
        for w in router.healthy():
            try:
                results[w.url] = (await router.client.post(w.url + "/flush_cache", json={})).status_code == 200
            except httpx.HTTPError:
                results[w.url] = False
            w.tree = PrefixTree()
        return JSONResponse({"success": all(results.values()), "workers": results},
                            status_code=200 if all(results.values()) else 409)

    @app.get("/metrics")
    async def metrics():
        return Response(router.metrics.render(router.workers), media_type="text/plain; version=0.0.4")

    return app


def serve_router(router: Router, host: str, port: int, log_level: str = "info", api_key: str | None = None,
                 on_shutdown: Callable[[], None] | None = None) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per proxied request is noise
    roles = ", ".join(f"{sum(w.role == r for w in router.workers)} {r}" for r in dict.fromkeys(
        w.role for w in router.workers))
    print(f"[radixflow] router on http://{host}:{port} ({router.config.policy}) over {roles or 'no'} worker(s)",
          flush=True)
    uvicorn.run(create_router_app(router, api_key, on_shutdown), host=host, port=port, log_level=log_level.lower(),
                timeout_graceful_shutdown=5, timeout_keep_alive=KEEP_ALIVE_S)
