"""`pocketlm serve --ray`: the server's OpenAI and Ollama routes on Ray Serve, replicated.

Two deployments (the shape of Ray's own LLM serving):

- `PocketLMIngress` (light, 0 CPUs): Serve's HTTP proxy hands it each request; it reads the body,
  takes its routing key (blocks of the prompt's text, below) and passes the request to a replica
  through a deployment handle, streaming the replica's response back. A replica that dies under a
  request answers that request with an OpenAI-shaped error (502 before the response started; an
  SSE error event inside a stream), never a hang; its other requests are untouched, and Serve
  starts a replica in its place.
- `PocketLMReplica` (one engine per model, with its scheduler; `threads` CPUs): runs the request
  through the same FastAPI application `pocketlm serve` runs (pocketlm.server.app), in process.
  Its metrics go to Ray's metrics (`ray.util.metrics`: requests, tokens, time to first token,
  queue), which Ray exports to Prometheus.

Routing (`PrefixAffinityRouter`, Serve's custom request router): a request whose prompt starts as an
earlier one's goes to the replica that answered that one, whose prefix cache holds the shared
prefix's KV (pocketlm.prefix_cache), unless that replica's queue is more than `imbalance` requests
longer than the shortest; a new prefix goes to the replica rendezvous hashing picks for its first
block (stable across routers, so several ingress replicas agree); and past the imbalance, to the
least loaded. The key (routing_key) is the model and the chat's messages (or the prompt) as text:
the hashes of its prefixes that end on a block boundary (BLOCK_CHARS characters), after each message
(a conversation's next turn starts with the whole of its last one, however short) and at its end,
within its first 16 KiB; first, the hash of its first block, which rendezvous hashing uses.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import os
from typing import Any

from ray import serve
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from pocketlm.server.app import MAX_BODY_BYTES, read_body, refusal
from pocketlm.server.errors import APIError

BLOCK_CHARS = 256        # routing-key granularity, in characters of the prompt's text
MAX_KEY_BLOCKS = 64      # blocks hashed at most (16 KiB of text)
MAX_KEY_MESSAGES = 32    # message boundaries hashed at most (the last ones)
ROUTER_MEMORY = 100_000  # prefix blocks a router remembers (least recently used forgotten)
DEFAULT_IMBALANCE = 4    # queue length over the shortest past which affinity gives way

log = logging.getLogger("pocketlm.ray.serve")


def routing_key(path: str, body: bytes) -> list[str]:
    """The hashes of the prompt's block prefixes (see the module's doc); [] when the body has no
    prompt (a GET, an embedding, a body that is not JSON or not as the API wants: the replica's
    answer says what is wrong)."""
    try:
        return _routing_key(body)
    except Exception:  # noqa: BLE001 - a hostile body routes anywhere; the app refuses it there
        return []


def _routing_key(body: bytes) -> list[str]:
    request = json.loads(body) if body else None
    if not isinstance(request, dict):
        return []
    parts: list[str] = []
    messages = request.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                content = m.get("content")
                parts.append(f"<{m.get('role')}>" + (content if isinstance(content, str) else json.dumps(content)))
    elif isinstance(request.get("prompt"), str):
        parts.append(request["prompt"])
    if not parts:
        return []
    model = request.get("model")
    text = (model if isinstance(model, str) else "") + "\x00" + "\x00".join(parts)
    limit = min(len(text), BLOCK_CHARS * MAX_KEY_BLOCKS)
    # prefixes ending on block boundaries, after each message (a conversation's next turn starts with
    # the whole of its last one, however short; the last MAX_KEY_MESSAGES of them) and at the end
    ends = set(range(BLOCK_CHARS, limit + 1, BLOCK_CHARS))
    at, message_ends = len(text) - len("\x00".join(parts)) - 1, []
    for part in parts:
        at += 1 + len(part)
        if at <= limit:
            message_ends.append(at)
    ends.update(message_ends[-MAX_KEY_MESSAGES:])
    anchor = min(len(text), BLOCK_CHARS)  # where a new prefix is hashed to a replica: its first block
    ends.add(anchor)
    digests, h, done = {}, hashlib.blake2b(digest_size=8), 0
    for end in sorted(ends):  # one pass over the text: each prefix's hash from the last one's state
        h.update(text[done:end].encode("utf-8", "surrogatepass"))
        done = end
        digests[end] = h.copy().hexdigest()
    return [digests[anchor]] + [digests[end] for end in sorted(ends)]


class PrefixAffinityRouter(RequestRouter):
    """Serve request router: prefix affinity with a load bound (see the module's doc)."""

    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, memory: int = ROUTER_MEMORY, **kwargs):
        self.imbalance = int(imbalance)
        self.memory = int(memory)
        self._owner: collections.OrderedDict[str, str] = collections.OrderedDict()  # block hash -> replica
        self._sent: dict[str, int] = {}  # replica -> requests routed there and not completed
        self._routed: dict[str, str] = {}  # internal request id -> replica

    @staticmethod
    def _key(pending_request: PendingRequest | None) -> list[str]:
        if pending_request is None:
            return []
        key = pending_request.kwargs.get("routing_key")
        return key if isinstance(key, list) else []

    def preferred(self, candidates: list[RunningReplica], key: list[str]) -> RunningReplica:
        by_id = {r.replica_id.unique_id: r for r in candidates}
        for block in reversed(key[1:]):  # the longest prefix a replica answered before
            owner = self._owner.get(block)
            if owner in by_id:
                return by_id[owner]
        return max(candidates, key=lambda r: hashlib.blake2b(f"{key[0]}/{r.replica_id.unique_id}".encode(),
                                                             digest_size=8).digest())

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = self._key(pending_request)
        if not key or len(candidate_replicas) < 2:
            return [candidate_replicas]  # the least loaded of all (the base class probes their queues)
        best = self.preferred(candidate_replicas, key)
        # queue lengths: the router's cache (probed replicas, fresh for 10 s) or, where it has none,
        # the requests this router sent and has not seen end; a replica never probed counts as idle
        queues = [self._queue(r) for r in candidate_replicas]
        mine = self._queue(best)
        if mine - min(queues) > self.imbalance:
            return [candidate_replicas]
        return [[best], [r for r in candidate_replicas if r is not best]]

    def _queue(self, replica: RunningReplica) -> int:
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        return cached if cached is not None else self._sent.get(replica.replica_id.unique_id, 0)

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        rid = replica_id.unique_id
        self._sent[rid] = self._sent.get(rid, 0) + 1
        self._routed[pending_request.metadata.internal_request_id] = rid
        for block in self._key(pending_request)[1:]:
            self._owner[block] = replica_id.unique_id
            self._owner.move_to_end(block)
        while len(self._owner) > self.memory:
            self._owner.popitem(last=False)

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        rid = self._routed.pop(internal_request_id, None)
        if rid is not None and self._sent.get(rid, 0) > 0:
            self._sent[rid] -= 1


# ---- the replica ---------------------------------------------------------------------------------
class _RayMetrics:
    """The replica's figures as Ray metrics (tagged by model and, by Ray, by replica)."""

    def __init__(self):
        from ray.serve import metrics  # ray.util.metrics with the deployment's and replica's tags

        self.requests = metrics.Counter("pocketlm_requests", "HTTP requests answered", tag_keys=("route", "status"))
        self.prompt_tokens = metrics.Counter("pocketlm_prompt_tokens", "prompt tokens", tag_keys=("model",))
        self.generated_tokens = metrics.Counter("pocketlm_generated_tokens", "generated tokens", tag_keys=("model",))
        self.ttft = metrics.Histogram("pocketlm_time_to_first_token_seconds", "time to first token",
                                      boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
                                      tag_keys=("model",))
        self.running = metrics.Gauge("pocketlm_running_sequences", "sequences generating", tag_keys=("model",))
        self.waiting = metrics.Gauge("pocketlm_waiting_requests", "requests queued for the batch", tag_keys=("model",))

    def attach(self, state) -> None:
        """Mirrors what the server's own Metrics records (pocketlm.server.metrics)."""
        metrics = state.metrics
        request, generation = metrics.request, metrics.generation

        def on_request(route: str, status: int) -> None:
            request(route, status)
            self.requests.inc(1, tags={"route": route, "status": str(status)})

        def on_generation(model_id: str, prompt_tokens: int, stats) -> None:
            generation(model_id, prompt_tokens, stats)
            tags = {"model": model_id}
            if prompt_tokens > 0:
                self.prompt_tokens.inc(int(prompt_tokens), tags=tags)
            if stats.generated_tokens:
                self.generated_tokens.inc(stats.generated_tokens, tags=tags)
            if getattr(stats, "ttft_seconds", None):
                self.ttft.observe(stats.ttft_seconds, tags=tags)

        metrics.request, metrics.generation = on_request, on_generation

    def sample(self, registry) -> None:
        for m in registry:
            scheduler = m.engine.scheduler
            self.running.set(scheduler.running, tags={"model": m.id})
            self.waiting.set(scheduler.waiting, tags={"model": m.id})


class PocketLMReplica:
    """One replica: the models' engines and the server's FastAPI app, called in process."""

    def __init__(self, models: list[str], engine_kwargs: dict, server_kwargs: dict):
        from pocketlm.server.app import create_app
        from pocketlm.server.run import load_models

        server_kwargs = dict(server_kwargs)
        app_kwargs = {k: server_kwargs.pop(k) for k in ("api_key", "cors_origins") if k in server_kwargs}
        from pocketlm.ray.data import node_models

        models, engine_kwargs = node_models(models, engine_kwargs)
        self.registry = load_models(models, **server_kwargs, **engine_kwargs)
        self.app = create_app(self.registry, **app_kwargs)
        self.state = self.app.state.pocketlm
        self.metrics = _RayMetrics()
        self.metrics.attach(self.state)

    async def handle(self, request: dict, routing_key: list[str] | None = None):
        """Runs one HTTP request through the app; yields its ASGI response messages."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
                 "method": request["method"], "path": request["path"], "raw_path": request["path"].encode(),
                 "query_string": request["query_string"], "root_path": "", "client": tuple(request["client"]),
                 "server": ("pocketlm", 0), "headers": [(k.encode("latin-1"), v.encode("latin-1"))
                                                        for k, v in request["headers"]]}
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        sent = [False]

        async def receive():
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": request["body"], "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            await messages.put(message)

        self.metrics.sample(self.registry)
        task = asyncio.ensure_future(self.app(scope, receive, send))
        getter = None
        try:
            while True:
                getter = asyncio.ensure_future(messages.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    while not messages.empty():
                        yield messages.get_nowait()
                    task.result()  # the app's own failure, if any
                    return
                message = getter.result()
                yield message
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    return
        finally:
            if getter is not None and not getter.done():
                getter.cancel()
            gone.set()  # the caller left (or the response ended): the app sees the client disconnect
            try:
                if not task.done():  # the app ends its generations at the disconnect: give it a moment
                    await asyncio.wait({task}, timeout=5)
            finally:
                if not task.done():
                    task.cancel()
                self.metrics.sample(self.registry)

    def __del__(self):
        for m in getattr(self, "registry", ()):
            m.engine.scheduler.close(timeout=1)


# ---- the ingress ---------------------------------------------------------------------------------
class PocketLMIngress:
    """Reads each request and forwards it to a replica (see the module's doc)."""

    def __init__(self, replica, max_body_bytes: int = MAX_BODY_BYTES, api_key: str | None = None):
        self.replica = replica  # DeploymentHandle of PocketLMReplica
        self.max_body = max_body_bytes
        self.api_key = api_key  # checked here too, before a body is read (the replica's gate checks it again)

    def __serve_build_asgi_app__(self):
        return _ASGI(self)

    async def asgi(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        # Serve keeps the application's route prefix in the path (and says it in root_path): the
        # replica's app knows its routes without it
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refused = refusal(path, scope["method"], headers, self.api_key, self.max_body)
        if refused is not None:
            await refused.response(path)(scope, receive, send)
            return
        try:
            body = await read_body(receive, self.max_body)
        except APIError as e:  # past the limit
            await e.response(path)(scope, receive, send)
            return
        if body is None:  # the client left
            return
        request = {"method": scope["method"], "path": path, "query_string": scope.get("query_string", b""),
                   "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
                   "client": list(scope.get("client") or ("-", 0)), "body": body}
        key = routing_key(path, body) if scope["method"] == "POST" else []
        await self._forward(scope, request, key, receive, send)

    async def _forward(self, scope, request: dict, key: list[str], receive, send) -> None:
        from ray.exceptions import RayError
        from ray.serve.exceptions import BackPressureError, RayServeException

        path = request["path"]
        stream = self.replica.options(stream=True, method_name="handle").remote(request, routing_key=key)
        started = finished = False
        kind = ""  # the response's content type

        async def client_left():
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(client_left())
        try:
            async for message in _until(stream, watcher):
                if message["type"] == "http.response.start":
                    started = True
                    kind = next((v.decode("latin-1") for k, v in message.get("headers", [])
                                 if k.lower() == b"content-type"), "")
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    finished = True
            if not finished and not watcher.done():
                raise ConnectionError("the replica's response ended early")
        except asyncio.CancelledError:
            raise  # the proxy cancelled the request (the client left): nothing to answer
        except (RayError, RayServeException, ConnectionError) as e:
            if finished or watcher.done():
                return  # answered already, or the client left: nothing to tell it
            log.warning("request %s %s: %s: %s", request["method"], path, type(e).__name__, e)
            if isinstance(e, BackPressureError):
                error = APIError(503, "every replica's queue is full; retry later", code="overloaded",
                                 headers={"Retry-After": "1"})
            else:
                error = APIError(502, f"the replica serving this request failed ({type(e).__name__}); retry the "
                                      "request", code="replica_failed")
            if not started:
                await error.response(path)(scope, receive, send)
            elif "text/event-stream" in kind:  # the error event the app's own streams end with
                event = json.dumps(error.body())
                await send({"type": "http.response.body", "body": f"data: {event}\n\n".encode(), "more_body": False})
            elif "ndjson" in kind:  # Ollama's streams end with an error line, as the app's own
                await send({"type": "http.response.body", "body": json.dumps({"error": error.message}).encode() + b"\n",
                            "more_body": False})
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            stream.cancel()


class _ASGI:
    """The ingress as an ASGI 3 application (uvicorn takes a bound method for ASGI 2)."""

    def __init__(self, ingress: PocketLMIngress):
        self.ingress = ingress

    async def __call__(self, scope, receive, send):
        await self.ingress.asgi(scope, receive, send)


async def _until(stream, watcher):
    """The messages of `stream` until it ends, or until `watcher` finishes (the client left)."""
    iterator = stream.__aiter__()
    while True:
        nxt = asyncio.ensure_future(iterator.__anext__())
        try:
            await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not nxt.done():
                nxt.cancel()
        if nxt.cancelled():
            return
        try:
            yield nxt.result()
        except StopAsyncIteration:
            return


# ---- building and running the application ----------------------------------------------------
def _int(args: dict, name: str, default: int | None) -> int | None:
    value = args.get(name, default)
    return None if value is None else int(value)


def _bool(args: dict, name: str) -> bool:
    """A flag from a config file (true/false) or `serve run`'s command line (the strings)."""
    value = args.get(name, False)
    if isinstance(value, str):
        if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no", ""):
            raise ValueError(f"{name}={value!r}: give true or false")
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _list(value) -> list[str] | None:
    if value is None:
        return None
    return [v for v in value.split(",") if v] if isinstance(value, str) else [str(v) for v in value]


def build_app(args: dict | None = None):
    """The Serve application: `serve run pocketlm.ray:app model=smollm2 replicas=2` (or a config file
    for `serve deploy`, docs/scale.md). Arguments (strings from the command line are fine): model
    (one, or several separated by commas), replicas (default 1) or autoscale "MIN:MAX", threads
    (per replica, default 1), ctx_size, max_sequences (default 16), max_queue (256: per replica's engine,
    and requests waiting in Serve for a replica),
    max_tokens_limit, kv_type, activations, api_key, imbalance (the router's, default 4),
    max_ongoing_requests (per replica, default 4 x max_sequences), plain_http / insecure (for a
    registry reference each node pulls)."""
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig

    args = dict(args or {})
    models = args.get("model", "smollm2")
    models = [m for m in models.split(",") if m] if isinstance(models, str) else list(models)
    threads = _int(args, "threads", 1)
    max_sequences = _int(args, "max_sequences", 16)
    engine_kwargs = {k: v for k, v in dict(
        threads=threads, max_context=_int(args, "ctx_size", None), max_batch=max_sequences,
        max_queue=_int(args, "max_queue", 256), kv_type=args.get("kv_type", "f16"),
        activations=args.get("activations", "auto"),
        # the policy as the deploying process sees it, given to every replica (worker nodes need not
        # have this environment): a path must be readable on every node
        trusted_keys=args.get("trusted_keys") or os.environ.get("POCKETLM_TRUSTED_KEYS") or None,
        decryption_key=args.get("decryption_key"), chat_template=args.get("chat_template"),
        sparse_layout=args.get("sparse_layout"),
        registry={k: True for k in ("plain_http", "insecure") if _bool(args, k)} or None).items()
        if v is not None}
    api_key = args.get("api_key") or os.environ.get("POCKETLM_API_KEY") or None
    server_kwargs = {k: v for k, v in dict(max_tokens_limit=_int(args, "max_tokens_limit", None),
                                           pooling=args.get("pooling"), api_key=api_key,
                                           cors_origins=_list(args.get("cors_origins"))).items() if v is not None}
    options: dict[str, Any] = dict(
        name="pocketlm-replica", ray_actor_options={"num_cpus": threads},
        max_ongoing_requests=_int(args, "max_ongoing_requests", 4 * max_sequences),
        # requests waiting in Serve for a replica with room, per caller; past it, 503 with Retry-After
        max_queued_requests=max(1, _int(args, "max_queue", 256)),  # (Serve takes -1 or >= 1)
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={"imbalance": _int(args, "imbalance", DEFAULT_IMBALANCE)}),
        # a replica stopped (scaled down, redeployed) finishes its answers first, for up to 60 s
        health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=60)
    autoscale = args.get("autoscale")
    if autoscale:
        low, _, high = str(autoscale).partition(":")
        options["autoscaling_config"] = AutoscalingConfig(min_replicas=int(low), max_replicas=int(high or low),
                                                          target_ongoing_requests=max_sequences)
    else:
        options["num_replicas"] = _int(args, "replicas", 1)
    replica = serve.deployment(PocketLMReplica).options(**options).bind(models, engine_kwargs, server_kwargs)
    ingress = serve.deployment(serve.ingress()(PocketLMIngress)).options(
        name="pocketlm-ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
    return ingress.bind(replica, api_key=api_key)


app = build_app  # `serve run pocketlm.ray:app model=...`: Serve calls an application builder with the arguments


def free_port(host: str) -> int:
    """A port the system gives for port 0 (Serve's proxy takes a fixed port), printed at start."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host.strip("[]"), 0))
        return sock.getsockname()[1]


def deploy(models: list[str], *, address: str | None = None, host: str = "127.0.0.1", port: int = 8000,
           replicas: int | None = 1, autoscale: str | None = None, **args) -> int:
    """`pocketlm serve --ray`: deploys the application on the cluster at `address` (None: a local
    Ray), serving HTTP on host:port, until SIGINT or SIGTERM; then deletes it (and stops the local
    Ray it started). Returns the exit status."""
    import signal
    import sys
    import threading

    from pocketlm.ray.data import import_ray, init_ray

    connected_before = import_ray().is_initialized()  # a caller's own Ray: left connected
    started_ray = address is None and not connected_before
    ray = init_ray(address, quiet=True)
    stop = threading.Event()
    received: list[int] = []
    state = {"deploying": True}  # while deploying, a signal interrupts it; after, it only asks to stop

    def on_signal(sig, frame):
        received.append(sig)
        stop.set()
        if state["deploying"]:  # loading, or waiting for CPUs that never come: give up (once)
            state["deploying"] = False
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        need = (int(str(autoscale).partition(":")[0]) if autoscale else replicas or 1) * int(args.get("threads") or 1)
        if need > cpus:
            print(f"pocketlm: warning: the replicas ask for {need} CPUs and the cluster has {cpus:g}: Serve waits "
                  "for a node that has them (Ctrl-C to give up)", file=sys.stderr, flush=True)
        serve.start(http_options={"host": host, "port": port})
        application = build_app({"model": ",".join(models), "replicas": replicas, "autoscale": autoscale, **args})
        what = f"autoscale {autoscale}" if autoscale else f"{replicas} replicas"
        print(f"pocketlm: deploying {', '.join(models)} on Ray ({what}) ...", file=sys.stderr, flush=True)
        serve.run(application, name="pocketlm", route_prefix="/", blocking=False)
        state["deploying"] = False
        print(f"pocketlm: listening on http://{host}:{port} (models: {', '.join(models)}; Ray Serve)",
              file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        if not received:
            raise
    finally:
        # The teardown runs to its end: more signals are recorded, not raised (the handler stays until after)
        state["deploying"] = False
        print("pocketlm: stopping", file=sys.stderr, flush=True)
        try:
            if started_ray:
                serve.shutdown()
            else:
                serve.delete("pocketlm")
        finally:
            if not connected_before:
                ray.shutdown()
            for s, h in previous.items():
                signal.signal(s, h)
    print("pocketlm: stopped", file=sys.stderr, flush=True)
    return 130 if signal.SIGINT in received else 0


__all__ = ["PocketLMIngress", "PocketLMReplica", "PrefixAffinityRouter", "app", "build_app", "deploy", "routing_key"]
