"""The server's ASGI application (FastAPI): routes, the gate every request passes, error shapes.

The gate (a plain ASGI middleware, so that streamed responses pass through untouched) gives each
request an id (the client's `X-Request-Id` if it sent a sane one, else a new one; echoed in the
response's `X-Request-Id`), refuses bodies over the limit (413) and requests without the API key
(401) before any route runs, and writes one access-log line when the response ends."""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.staticfiles import StaticFiles

from pocketlm import __version__
from pocketlm.errors import InvalidInputError
from pocketlm.server.errors import APIError
from pocketlm.server.metrics import Metrics
from pocketlm.server.models import ModelRegistry

MAX_BODY_BYTES = 16 << 20   # a request body past this is refused with 413
PUBLIC_PATHS = ("/health", "/", "/favicon.ico")  # answered without the API key (and /static/: the chat page)
STATIC = Path(__file__).resolve().parent / "static"
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
          "/apply-template", "/api/embed",
          "/api/chat", "/api/generate", "/api/tags", "/api/show", "/api/ps", "/api/version")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

log = logging.getLogger("pocketlm.server")


class ServerState:
    """What the routes share: the models, the metrics, and the generations in flight (which a
    shutdown cancels). Touched from the event loop only."""

    def __init__(self, models: ModelRegistry, api_key: str | None):
        self.models = models
        self.api_key = api_key
        self.fingerprint = f"pocketlm-{__version__}"
        self.shutting_down = False
        self.metrics = Metrics()
        self._running: dict = {}  # Request -> (model id, prompt tokens)
        self.stops: set = set()  # threading.Events of the embedding jobs in flight

    def track(self, model_id: str, requests: list, prompt_tokens: list[int]) -> None:
        for r, n in zip(requests, prompt_tokens):
            self._running[r] = (model_id, n)

    def untrack(self, requests: list) -> None:
        """The requests are over for their client (finished, failed or cancelled): counted in the metrics."""
        for r in requests:
            entry = self._running.pop(r, None)
            if entry is not None:
                self.metrics.generation(entry[0], entry[1], r.stats)

    def kv_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r, (model_id, _) in list(self._running.items()):
            if not r.done:
                out[model_id] = out.get(model_id, 0) + r.session.kv_bytes
        return out

    def shut_down(self) -> None:
        """Ends every generation in flight at its next step: their streams close at once."""
        self.shutting_down = True
        for r in list(self._running):
            r.cancel()
        for stop in list(self.stops):
            stop.set()


class Gate:
    def __init__(self, app, state: ServerState, max_body_bytes: int):
        self.app, self.state, self.max_body = app, state, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get("x-request-id", "")
        if not _REQUEST_ID.fullmatch(rid):
            rid = "req-" + secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = rid
        status = [0]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            response = self._refusal(scope, headers)
            if response is None and scope["method"] in ("POST", "PUT", "PATCH"):
                receive, response = await self._read_body(receive, scope["path"])
                # Every body this API takes is JSON: read it so whatever the client labelled it (`curl -d`
                # says form data), as llama-server and OpenAI do.
                if "json" not in headers.get("content-type", ""):
                    scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                    scope["headers"].append((b"content-type", b"application/json"))
            if response is not None:
                await response(scope, receive, send_with_id)
            else:
                try:
                    await self.app(scope, receive, send_with_id)
                except Exception as e:  # noqa: BLE001 - a bug's 500 still carries the request id
                    log.exception("request %s failed", rid)
                    if status[0]:  # the response had started: nothing more can be said
                        return
                    await APIError(500, f"internal error: {type(e).__name__}: {e}",
                                   code="internal_error").response(scope["path"])(scope, receive, send_with_id)
        finally:
            self.state.metrics.request(_route(scope["path"]), status[0] or 499)
            client = scope.get("client") or ("-", 0)
            log.info('%s "%s %s" %s %.3fs id=%s', client[0], scope["method"], scope["path"], status[0] or 499,
                     time.perf_counter() - t0, rid)

    def _refusal(self, scope, headers: dict[str, str]):
        error = refusal(scope["path"], scope["method"], headers, self.state.api_key, self.max_body)
        return None if error is None else error.response(scope["path"])

    async def _read_body(self, receive, path: str):
        """Reads the whole body (at most the limit; a chunked one too) and replays it to the app."""
        try:
            body = await read_body(receive, self.max_body)
        except APIError as e:
            return receive, e.response(path)
        if body is None:
            return receive, JSONResponse({}, status_code=499)
        sent = [False]

        async def replay():
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, None


def refusal(path: str, method: str, headers: dict[str, str], api_key: str | None,
            max_body: int) -> APIError | None:
    """Why a request is refused before its body is read: 401 without the API key (the public paths
    and CORS preflights need none), 413 for a declared body over the limit; None lets it in.
    `headers` by lower-case name. The gate's check, and Ray Serve's ingress's (pocketlm.ray.serve)."""
    if api_key is not None and method != "OPTIONS" and not (path in PUBLIC_PATHS or path.startswith("/static/")):
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            return APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY' "
                                 "with the key the server was started with", code="invalid_api_key",
                            headers={"WWW-Authenticate": "Bearer"})
    length = headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_body):
        return too_large(max_body)
    return None


async def read_body(receive, max_body: int) -> bytes | None:
    """A request's whole body (a chunked one too): None if the client disconnected first; past
    `max_body` bytes, too_large is raised. The gate's reading, and Ray Serve's ingress's."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_body:
            raise too_large(max_body)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def too_large(max_body: int) -> APIError:
    return APIError(413, f"the request body is larger than the {max_body} bytes allowed", code="request_too_large")


def _route(path: str) -> str:
    """The metrics label of a path: its route, so that the label set stays small."""
    if path in ROUTES:
        return path
    if path.startswith("/static/"):
        return "/static"
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


def _param(loc: tuple[Any, ...]) -> str | None:
    """pydantic's location of a bad field as OpenAI names it: messages[0].role."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and not any(c in p for c in "[]()"):  # skip pydantic's union-branch tags
            out += ("." if out else "") + p
    return out or None


def create_app(models: ModelRegistry, *, api_key: str | None = None, cors_origins: list[str] | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    from pocketlm.server import ollama_api, openai_api

    state = ServerState(models, api_key)
    app = FastAPI(title="pocketlm", version=__version__, docs_url="/docs", redoc_url=None)
    app.state.pocketlm = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = _param(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
        elif first.get("type") == "missing":
            message = f"'{param}' is required"
        else:
            message = f"'{param}': {first['msg']}" if param else first["msg"]
        return APIError(400, message, param=param).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return APIError(e.status_code, message, headers=dict(e.headers or {})).response(request.url.path)

    @app.exception_handler(InvalidInputError)
    async def invalid_input(request: Request, e: InvalidInputError):  # a value of the request pocketlm refused
        return APIError(400, str(e)).response(request.url.path)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("request %s failed", request.scope.get("state", {}).get("request_id"))
        return APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error").response(
            request.url.path)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        # (the state from the request, not a closure: FastAPI caches its endpoints in module-level
        # caches, which would keep every app's models alive for the process's life)
        served = request.app.state.pocketlm
        return PlainTextResponse(served.metrics.render(list(served.models), served.kv_bytes()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    app.add_middleware(Gate, state=state, max_body_bytes=max_body_bytes)
    if cors_origins:  # outside the gate: preflights need no key, and refusals carry the CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["X-Request-Id"])
    return app
