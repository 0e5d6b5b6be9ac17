"""Ollama's native API where it maps: /api/chat, /api/generate, /api/tags, /api/show, /api/ps,
/api/version. Many desktop apps and editor plugins speak only this.

Streaming is Ollama's: one JSON object per line (application/x-ndjson), streaming on unless
`"stream": false`, the last object with `"done": true`, `done_reason` and the timings in
nanoseconds. `options` carries the sampling fields (num_predict, temperature, top_k, top_p, min_p,
stop, seed, repeat_penalty, presence_penalty, frequency_penalty; num_ctx and the others are the
server's to set), `format` is "json" or a JSON schema (constrained decoding). Errors are Ollama's
`{"error": "..."}` with the same statuses as the OpenAI routes."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from datetime import datetime, timezone
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from pocketlm import __version__
from pocketlm.errors import InvalidInputError
from pocketlm.server.errors import APIError
from pocketlm.server.openai_api import check_tool_calls, checked_stops
from pocketlm.server.streams import run_blocking, run_embedding, state_of, stream_response
from pocketlm.tools import check_tools, parse_tool_calls, prompt_messages

router = APIRouter()


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class Options(_Body):
    num_predict: int | None = None  # -1: no limit, -2: fill the context (both: to the end of the context)
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    repeat_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[dict] | None = None


class ChatBody(_Body):
    model: str
    messages: list[Message] = []
    stream: bool = True
    format: str | dict | None = None
    options: Options | None = None
    tools: list[dict] | None = None


class GenerateBody(_Body):
    model: str
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    format: str | dict | None = None
    options: Options | None = None
    context: list[int] | None = None
    suffix: str | None = None
    images: list[str] | None = None


class ModelBody(_Body):
    model: str | None = None
    name: str | None = None  # older clients send the model as "name"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _response_format(fmt: str | dict | None) -> dict | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    raise APIError(400, f"format must be \"json\" or a JSON schema, not {fmt!r}", param="format")


def _generation_args(options: Options | None) -> tuple[int | None, list[str], dict[str, Any]]:
    o = options or Options()
    max_tokens = None if o.num_predict is None or o.num_predict < 0 else o.num_predict
    if max_tokens == 0:
        raise APIError(400, "options.num_predict must be positive, or -1 for no limit", param="options.num_predict")
    stops = checked_stops(o.stop, "options.stop")
    seed = None if o.seed is None else o.seed % 2**64
    return max_tokens, stops, {"temperature": o.temperature, "top_k": o.top_k, "top_p": o.top_p, "min_p": o.min_p,
                               "repetition_penalty": o.repeat_penalty, "presence_penalty": o.presence_penalty,
                               "frequency_penalty": o.frequency_penalty, "seed": seed}


def _done_reason(request) -> str:
    return "length" if request.finish_reason in ("length", "context") else "stop"


def _timings(request, prompt_tokens: int, t0: float) -> dict[str, Any]:
    stats = request.stats
    return {"total_duration": int((time.perf_counter() - t0) * 1e9), "load_duration": 0,
            "prompt_eval_count": prompt_tokens, "prompt_eval_duration": int(stats.prefill_seconds * 1e9),
            "eval_count": stats.generated_tokens, "eval_duration": int(stats.decode_seconds * 1e9)}


def _line(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"


def _ollama_calls(calls: list[dict]) -> list[dict]:
    return [{"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
            for c in calls]


def _submit(model, ids: list[int], max_tokens, stops, sampling, response_format, prompt_param: str, keep: int):
    return model.submit(ids, max_tokens=max_tokens, stop=stops, response_format=response_format,
                        prompt_param=prompt_param, keep=keep, **sampling)


async def _run(http: Request, model, ids: list[int], body, key: str, tools: list[dict] | None = None,
               extra_final=None, prompt_param: str = "messages", keep: int = 4):
    """Generates for `ids` and answers in Ollama's shape: `key` is "message" (chat) or "response"."""
    t0 = time.perf_counter()
    max_tokens, stops, sampling = _generation_args(body.options)
    request = await asyncio.to_thread(_submit, model, ids, max_tokens, stops, sampling, _response_format(body.format),
                                      prompt_param, keep)

    def piece(text: str) -> Any:
        return {"role": "assistant", "content": text} if key == "message" else text

    def final_fields(r, text: str) -> dict:
        out = {"model": body.model, "created_at": _now(), "done": True, "done_reason": _done_reason(r),
               **_timings(r, len(ids), t0), **(extra_final(r) if extra_final else {})}
        if key == "message":
            message = {"role": "assistant", "content": text}
            if tools:
                content, calls = parse_tool_calls(text, tools)
                if calls:
                    message = {"role": "assistant", "content": content or "", "tool_calls": _ollama_calls(calls)}
            out["message"] = message
        else:
            out["response"] = text
        return out

    if body.stream:
        def chunk(_i: int, text: str) -> str | None:
            if tools:  # a call cannot be told from text before the end
                return None
            return _line({"model": body.model, "created_at": _now(), key: piece(text), "done": False})

        def final(_i: int, r, whole: str) -> str:
            fields = final_fields(r, whole if tools else "")
            return _line(fields)

        return stream_response(http, model, [ids], [request], chunk=chunk, final=final, after=lambda: "",
                               error=lambda e: _line({"error": e.message}), media_type="application/x-ndjson")
    texts = await run_blocking(http, model, [ids], [request])
    return JSONResponse(final_fields(request, texts[0]))


def _message_dict(i: int, m: Message) -> dict[str, Any]:
    if m.images:
        raise APIError(400, f"messages[{i}] has images: these models read text only", param=f"messages[{i}].images")
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    check_tool_calls(i, m.tool_calls)
    if m.tool_calls:
        out["tool_calls"] = [{"type": "function", "function": {"name": (c.get("function") or {}).get("name"),
                                                               "arguments": (c.get("function") or {}).get("arguments", {})}}
                             for c in m.tool_calls]
    return out


@router.post("/api/chat")
async def chat(body: ChatBody, http: Request):
    model = state_of(http).models.get(body.model)
    if not body.messages:  # Ollama's way of loading a model: it is loaded already
        return JSONResponse({"model": body.model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                             "done": True, "done_reason": "load"})
    tools = None
    if body.tools:
        try:
            tools = check_tools(body.tools)
        except InvalidInputError as e:
            raise APIError(400, str(e), param="tools") from None
    def prepare() -> tuple[list[int], int]:  # off the event loop
        messages = [_message_dict(i, m) for i, m in enumerate(body.messages)]
        messages, native = prompt_messages(messages, tools, model.engine.chat_template)
        return (model.chat_prompt(messages, tools if native else None),
                model.chat_keep(messages, tools if native else None))

    ids, keep = await asyncio.to_thread(prepare)
    return await _run(http, model, ids, body, "message", tools=tools, keep=keep)


@router.post("/api/generate")
async def generate(body: GenerateBody, http: Request):
    model = state_of(http).models.get(body.model)
    if body.suffix:
        raise APIError(400, "suffix (fill in the middle) is not supported by this server yet", param="suffix")
    if body.images:
        raise APIError(400, "images: these models read text only", param="images")
    if not body.prompt and not body.context:
        return JSONResponse({"model": body.model, "created_at": _now(), "response": "", "done": True,
                             "done_reason": "load"})
    def prepare() -> list[int]:  # off the event loop
        if body.raw:
            ids = model.text_prompt(body.prompt) if body.prompt else []
        else:
            messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
                [{"role": "user", "content": body.prompt}]
            ids = model.chat_prompt(messages)
        if body.context:
            vocab = model.engine.vocab_size
            if any(not 0 <= t < vocab for t in body.context):
                raise APIError(400, f"context holds a token id outside the vocabulary of {vocab}", param="context")
            ids = list(body.context) + ids
        return ids

    ids = await asyncio.to_thread(prepare)
    return await _run(http, model, ids, body, "response", prompt_param="prompt",
                      extra_final=lambda r: {"context": ids + list(r.token_ids)})


class EmbedBody(_Body):
    model: str
    input: str | list[str]
    truncate: bool = True
    dimensions: int | None = Field(None, ge=1)


@router.post("/api/embed")
async def embed(body: EmbedBody, http: Request):
    model = state_of(http).models.get(body.model)
    items = [body.input] if isinstance(body.input, str) else body.input
    if not items:
        raise APIError(400, "input is empty", param="input")
    hidden = model.engine.config["hidden_size"]
    if body.dimensions is not None and body.dimensions != hidden:
        raise APIError(400, f"dimensions: {model.id} gives {hidden}-dimensional embeddings", param="dimensions")
    t0 = time.perf_counter()

    def work(stop) -> bytes:  # on the model's embedding thread, the response body too
        vectors, n_tokens = model.embed(items, "input", body.truncate, stop=stop)
        return json.dumps({"model": body.model, "embeddings": vectors.tolist(),
                           "total_duration": int((time.perf_counter() - t0) * 1e9), "load_duration": 0,
                           "prompt_eval_count": n_tokens}).encode()

    return Response(await run_embedding(http, model, work), media_type="application/json")


# ---- what is loaded --------------------------------------------------------------------------------------


def _name(model) -> str:
    return model.id if ":" in model.id else f"{model.id}:latest"


def _parameters(model) -> int:
    return sum(math.prod(t.shape) for t in model.engine.bundle.tensors)


def _size_label(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}".rstrip("0").rstrip(".") + unit
    return str(n)


def _details(model) -> dict:
    meta = model.engine.metadata
    types = (meta.get("quantization") or {}).get("types") or {}
    weights = {k: v for k, v in types.items() if k not in ("f32",)} or types
    main = max(weights, key=weights.get).upper().removesuffix("_X16") if weights else "F32"
    arch = meta.get("architecture", "")
    return {"parent_model": "", "format": "plm", "family": arch, "families": [arch],
            "parameter_size": _size_label(_parameters(model)), "quantization_level": main}


def _digest(model) -> str:
    """The bundle's identity, as session files bind to it (computed once per engine)."""
    from pocketlm.session_file import bundle_digest

    return bundle_digest(model.engine)


def _entry(model) -> dict:
    path = model.engine.path
    return {"name": _name(model), "model": _name(model),
            "modified_at": datetime.fromtimestamp(os.path.getmtime(path), timezone.utc).isoformat(),
            "size": model.engine.bundle.file_bytes, "digest": _digest(model), "details": _details(model)}


@router.get("/api/tags")
async def tags(http: Request) -> dict:
    return {"models": [_entry(m) for m in state_of(http).models]}


@router.get("/api/ps")
async def ps(http: Request) -> dict:
    return {"models": [{**_entry(m), "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0,
                        "context_length": m.engine.max_context} for m in state_of(http).models]}


@router.post("/api/show")
async def show(body: ModelBody, http: Request) -> dict:
    name = body.model or body.name
    model = state_of(http).models.get(name)
    engine = model.engine
    cfg, arch = engine.config, engine.metadata.get("architecture", "")
    defaults = engine.generation_defaults
    names = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
             "repetition_penalty": "repeat_penalty", "max_tokens": "num_predict"}
    parameters = "\n".join(f"{names[k]:<16}{defaults[k]}" for k in names if defaults.get(k) is not None)
    info = {"general.architecture": arch, "general.parameter_count": _parameters(model),
            f"{arch}.context_length": cfg.get("max_position"), f"{arch}.embedding_length": cfg.get("hidden_size"),
            f"{arch}.block_count": cfg.get("n_layers"), f"{arch}.attention.head_count": cfg.get("n_heads"),
            f"{arch}.attention.head_count_kv": cfg.get("n_kv_heads"), f"{arch}.vocab_size": cfg.get("vocab_size")}
    return {"modelfile": f"# served by pocketlm from {engine.path}\nFROM {engine.path}\n", "parameters": parameters,
            "template": engine.chat_template or "", "details": _details(model), "model_info": info,
            "capabilities": ["completion", "tools"], "modified_at": _entry(model)["modified_at"]}


@router.get("/api/version")
async def version() -> dict:
    return {"version": __version__}
