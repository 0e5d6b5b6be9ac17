"""Running a request's generations for an HTTP response, whatever the API: streamed (each piece as
it comes) or whole, with disconnects, shutdown and the in-flight bookkeeping handled alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from starlette.responses import StreamingResponse

from pocketlm.server.errors import APIError


def state_of(http: Request):
    """The ServerState the app holds."""
    return http.app.state.pocketlm


async def pieces(requests: list) -> AsyncIterator[tuple[int, str]]:
    """(choice index, text piece) as the requests produce them; raises the first request error."""
    if len(requests) == 1:
        async for piece in requests[0]:
            yield 0, piece
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, request) -> None:
        try:
            async for piece in request:
                await queue.put((i, piece, None))
            await queue.put((i, None, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
    try:
        running = len(tasks)
        while running:
            i, piece, error = await queue.get()
            if error is not None:
                raise error
            if piece is None:
                running -= 1
            else:
                yield i, piece
    finally:
        for t in tasks:
            t.cancel()


def cancel_all(requests: list) -> None:
    for r in requests:
        r.cancel()


def generation_error(e: BaseException) -> APIError:
    return APIError(500, f"the generation failed: {type(e).__name__}: {e}", code="generation_failed")


def check_running(http: Request, requests: list) -> None:
    """A request cancelled by the server's shutdown (not by its client) ends as 503."""
    if state_of(http).shutting_down and any(r.finish_reason == "cancelled" for r in requests):
        raise APIError(503, "the server is shutting down", code="shutting_down")


async def run_embedding(http: Request, model, work: Callable):
    """work(stop event) on the model's embedding thread (one at a time; 503 past MAX_EMBED_WAITING
    waiting); the event is set when the client disconnects or the server stops, and the work ends at
    its next text. Returns work's result (build the response body inside it: off the event loop)."""
    import threading

    from pocketlm.server.models import MAX_EMBED_WAITING, RETRY_AFTER_SECONDS

    state = state_of(http)
    if state.shutting_down:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    if model.embed_waiting >= MAX_EMBED_WAITING:
        raise APIError(503, f"{MAX_EMBED_WAITING} embedding requests already wait for {model.id}; retry later",
                       code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    stop = threading.Event()
    state.stops.add(stop)
    model.embed_waiting += 1
    job = asyncio.get_running_loop().run_in_executor(model.embedder, work, stop)
    try:
        if not await _before_disconnect(http, job):
            raise APIError(499, "the client disconnected")
        try:
            return job.result()
        except InterruptedError:
            raise APIError(503, "the server is shutting down", code="shutting_down") from None
    finally:
        stop.set()  # a job still queued returns at once
        state.stops.discard(stop)
        model.embed_waiting -= 1


async def _before_disconnect(http: Request, job: asyncio.Future) -> bool:
    """Waits for `job` or for the client to disconnect, whichever comes first; True if the job ended."""
    async def disconnected() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
        return job in done
    finally:
        watch.cancel()


def refuse_if_stopping(http: Request, requests: list) -> None:
    """Generations submitted while the server began to stop (their submit ran in a worker thread):
    cancelled, and the request answered 503."""
    if state_of(http).shutting_down:
        cancel_all(requests)
        raise APIError(503, "the server is shutting down", code="shutting_down")


def _prompt_lengths(prompts: list[list[int]], requests: list) -> list[int]:
    per_prompt = len(requests) // len(prompts)
    return [len(prompts[i // per_prompt]) for i in range(len(requests))]


async def _collect(http: Request, requests: list) -> list[str]:
    """Every choice's whole text; cancels them all if the client goes away first."""
    texts = [""] * len(requests)

    async def gather() -> None:
        async for i, piece in pieces(requests):
            texts[i] += piece

    work = asyncio.ensure_future(gather())
    try:
        if not await _before_disconnect(http, work):
            raise APIError(499, "the client disconnected")
        error = work.exception()
        if error is not None:
            raise error if isinstance(error, APIError) else generation_error(error)
    finally:
        work.cancel()
        cancel_all(requests)
    return texts


async def run_blocking(http: Request, model, prompts: list[list[int]], requests: list) -> list[str]:
    """The whole text of each request (prompt i's choices follow each other in `requests`)."""
    refuse_if_stopping(http, requests)
    state = state_of(http)
    state.track(model.id, requests, _prompt_lengths(prompts, requests))
    try:
        texts = await _collect(http, requests)
    finally:
        state.untrack(requests)
    check_running(http, requests)
    return texts


def stream_response(http: Request, model, prompts: list[list[int]], requests: list, *,
                    chunk: Callable[[int, str], str | None], final: Callable[[int, object, str], str],
                    after: Callable[[], str], error: Callable[[APIError], str], media_type: str,
                    end: str | None = None) -> StreamingResponse:
    """A streamed body: `chunk(i, piece)` for each piece (None: nothing to send yet), `final(i, request,
    whole text)` for each choice once all are done, then `after()`, then `end`; a failure mid-stream is
    sent as `error(APIError)` (then `end`)."""
    refuse_if_stopping(http, requests)
    state = state_of(http)
    state.track(model.id, requests, _prompt_lengths(prompts, requests))
    texts = [""] * len(requests)

    async def body() -> AsyncIterator[str]:
        try:
            async for i, piece in pieces(requests):
                texts[i] += piece
                data = chunk(i, piece)
                if data is not None:
                    yield data
            check_running(http, requests)
            for i, r in enumerate(requests):
                yield final(i, r, texts[i])
            tail = after()
            if tail:
                yield tail
        except APIError as e:
            yield error(e)
        except Exception as e:  # noqa: BLE001 - a failed generation fails its own stream only
            yield error(generation_error(e))
        if end is not None:
            yield end

    def close() -> None:  # however the response ends: sent, failed, or the client gone
        cancel_all(requests)
        state.untrack(requests)

    return GenerationStream(body(), close, media_type=media_type,
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class GenerationStream(StreamingResponse):
    """A streamed response that runs `close` when it ends, even if its body was never started
    (a client that disconnected at once)."""

    def __init__(self, content, close, **kwargs):
        super().__init__(content, **kwargs)
        self._close = close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._close()
