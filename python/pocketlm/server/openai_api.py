"""OpenAI's API: /v1/models, /v1/chat/completions, /v1/completions, streamed (server-sent events
ending with `data: [DONE]`) and not, as the official `openai` client speaks it.

Each choice is one Request on the model's engine scheduler, batched with every other request's
steps. Sampling fields map onto pocketlm's (`temperature`, `top_p`, `seed`, `stop`,
`frequency_penalty`, `presence_penalty`; llama.cpp's `top_k`, `min_p` and `repeat_penalty` too);
a field left out takes the model's default, and `max_tokens` left out runs to the end of the
context. A client that disconnects cancels its generations at the next step."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response, StreamingResponse

from pocketlm.errors import InvalidInputError
from pocketlm.server.errors import APIError
from pocketlm.server.streams import run_blocking, run_embedding, state_of, stream_response
from pocketlm.tools import call_grammar, check_tools, parse_tool_calls, prompt_messages, template_syntax

MAX_CHOICES = 16   # n: each choice is one more sequence in the batch
MAX_STOPS = 4      # as OpenAI
MAX_STOP_CHARS = 1000  # each stop string is matched against the text held back at every token

router = APIRouter()


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields this server has no use for


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    # llama.cpp's extensions
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    grammar: str | None = None  # Lark or GBNF, as llama-server's `grammar`


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=5)


# ---- request -> generations ------------------------------------------------------------------------------


def _stops(stop: str | list[str] | None) -> list[str]:
    return checked_stops(stop, "stop")


def checked_stops(stop: str | list[str] | None, param: str) -> list[str]:
    """The stop strings, at most MAX_STOPS of at most MAX_STOP_CHARS each (both routes)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"{param} takes at most {MAX_STOPS} strings, got {len(stops)}", param=param)
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"{param}: a stop string is longer than {MAX_STOP_CHARS} characters", param=param)
    return stops


def _sampling(body: _Sampling) -> dict[str, Any]:
    return {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "min_p": body.min_p,
            "repetition_penalty": body.repeat_penalty, "frequency_penalty": body.frequency_penalty,
            "presence_penalty": body.presence_penalty}


def _seed(body: _Sampling, choice: int) -> int | None:
    """Choice i of a seeded request samples with seed + i (so n > 1 gives n different answers, each
    reproducible); any integer is taken, modulo 2^64."""
    return None if body.seed is None else (body.seed + choice) % 2**64


def _unsupported(param: str, what: str) -> APIError:
    return APIError(400, f"{what} is not supported by this server yet", param=param, code="unsupported_parameter")


def check_tool_calls(i: int, calls: list | None) -> None:
    """messages[i].tool_calls (both APIs): each a dict with a 'function' holding a string 'name'."""
    for j, call in enumerate(calls or []):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(400, f"messages[{i}].tool_calls[{j}] needs a 'function' with a string 'name'",
                           param=f"messages[{i}].tool_calls[{j}]")


def _message_dict(i: int, m: ChatMessage) -> dict[str, Any]:
    if isinstance(m.content, list):
        texts = []
        for j, part in enumerate(m.content):
            if part.type != "text" or part.text is None:
                raise APIError(400, f"content parts of type {part.type!r} are not supported: these models read "
                                    f"text only", param=f"messages[{i}].content[{j}].type")
            texts.append(part.text)
        content: str | None = "".join(texts)
    else:
        content = m.content
    if content is None and not m.tool_calls:
        raise APIError(400, f"messages[{i}] has no content", param=f"messages[{i}].content")
    check_tool_calls(i, m.tool_calls)
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
    for key in ("name", "tool_calls", "tool_call_id"):
        value = getattr(m, key)
        if value is not None:
            out[key] = value
    return out


def _submit_all(model, prompts: list[list[int]], body: _Sampling, max_tokens: int | None, logprobs: int | None = None,
                keep: int = 4, **constraint) -> list:
    """One Request per (prompt, choice), in that order; on a failure, those already queued are cancelled.
    Runs in a worker thread: a constraint's first use builds the grammar's view of the vocabulary."""
    stops, sampling = _stops(body.stop), _sampling(body)
    if len(prompts) * body.n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts x n={body.n} make {len(prompts) * body.n} generations; at most "
                            f"{MAX_CHOICES} per request", param="prompt" if len(prompts) > 1 else "n")
    if logprobs is not None:
        model.token_info(0)  # the first use builds the tokenizer view the token texts come from (~0.2 s)
    prompt_param = "prompt" if isinstance(body, CompletionRequest) else "messages"
    requests = []
    try:
        for ids in prompts:
            for choice in range(body.n):
                requests.append(model.submit(ids, max_tokens=max_tokens, stop=stops, seed=_seed(body, choice),
                                             logprobs=logprobs, prompt_param=prompt_param, keep=keep, **constraint,
                                             **sampling))
    except BaseException:
        for r in requests:
            r.cancel()
        raise
    return requests


# ---- running them ----------------------------------------------------------------------------------------


def _finish_reason(request) -> str:
    reason = request.finish_reason
    return "length" if reason in ("length", "context") else "stop" if reason == "stop" else reason or "stop"


def _usage(prompts: list[list[int]], requests: list) -> dict:
    """OpenAI's usage, with `prompt_tokens_details.cached_tokens`: the prompt tokens whose KV came
    from the prefix cache (pocketlm.prefix_cache), not computed (per prompt: its choices' average)."""
    prompt = sum(len(p) for p in prompts)
    completion = sum(r.stats.generated_tokens for r in requests)
    choices = max(1, len(requests) // max(1, len(prompts)))
    cached = min(prompt, sum(r.stats.reused_tokens for r in requests) // choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class _LogprobCursor:
    """Hands out each request's token log-probabilities once, in OpenAI's shapes, as they come."""

    def __init__(self, model, requests: list, enabled: bool):
        self.model, self.requests, self.enabled = model, requests, enabled
        self.sent = [0] * len(requests)

    def take(self, i: int) -> list:
        if not self.enabled:
            return []
        entries = self.requests[i].generation.logprobs
        new = entries[self.sent[i]:len(entries)]
        self.sent[i] += len(new)
        return new

    def _item(self, token_id: int, logprob: float) -> dict:
        text, raw = self.model.token_info(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    def chat(self, i: int) -> dict | None:
        """choices[].logprobs of a chat completion (or chunk): the entries not handed out yet."""
        if not self.enabled:
            return None
        return {"content": [{**self._item(t, lp), "top_logprobs": [self._item(a, alp) for a, alp in top]}
                            for t, lp, top in self.take(i)], "refusal": None}

    def completion(self, i: int, offset: int) -> dict | None:
        """choices[].logprobs of a text completion: tokens, token_logprobs, top_logprobs, text_offset."""
        if not self.enabled:
            return None
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, top in self.take(i):
            text = self.model.token_info(t)[0]
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({self.model.token_info(a)[0]: alp for a, alp in top})
            out["text_offset"].append(offset)
            offset += len(text)
        return out


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _stream(http: Request, model, prompts: list[list[int]], requests: list, chunk: callable, final: callable,
            usage: callable, include_usage: bool) -> StreamingResponse:
    """Server-sent events: the chunks `chunk(i, piece)` makes (None: nothing to send yet), one
    `final(i, request, whole text)` per choice, then the usage chunk if asked for, then [DONE]. A
    failure mid-stream is sent as an error event."""
    return stream_response(
        http, model, prompts, requests, media_type="text/event-stream", end="data: [DONE]\n\n",
        chunk=lambda i, piece: None if (data := chunk(i, piece)) is None else _sse(data),
        final=lambda i, r, text: _sse(final(i, r, text)),
        after=lambda: _sse(usage()) if include_usage else "",
        error=lambda e: _sse(e.body()))


# ---- endpoints ---------------------------------------------------------------------------------------------


@router.get("/v1/models")
async def list_models(http: Request) -> dict:
    return {"object": "list", "data": [m.card() for m in state_of(http).models]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, http: Request) -> dict:
    return state_of(http).models.get(model_id).card()


def _tool_plan(body: ChatCompletionRequest, model) -> tuple[list[dict] | None, str | None]:
    """(the tools the reply may call, a grammar forcing one call or None) for the request's tools and
    tool_choice: "none" offers none, "auto" (the default with tools) lets the model choose, "required"
    or a named function constrains the reply to a call."""
    tools, choice = body.tools or None, body.tool_choice
    if tools is not None:
        try:
            tools = check_tools(tools)
        except InvalidInputError as e:
            raise APIError(400, str(e), param="tools") from None
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        forced = [t for t in tools or [] if t["function"]["name"] == name]
        if not forced:
            raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools",
                           param="tool_choice")
    elif choice in ("auto", "none", "required"):
        forced = tools if choice == "required" else None
        if choice == "required" and not tools:
            raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
    else:
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                            "'function': {'name': ...}}", param="tool_choice")
    if choice == "none":
        return None, None
    if forced and body.response_format is not None and body.response_format.get("type", "text") != "text":
        raise APIError(400, "a required tool call and a response_format cannot both shape the reply",
                       param="response_format")
    grammar = call_grammar(forced, template_syntax(model.engine.chat_template)) if forced else None
    return tools, grammar


def _message(text: str, r, tools: list[dict] | None) -> tuple[dict, str]:
    """The assistant message for one choice's text, and its finish_reason."""
    reason = _finish_reason(r)
    if tools:
        content, calls = parse_tool_calls(text, tools)
        if calls:
            return {"role": "assistant", "content": content, "refusal": None, "tool_calls": calls}, \
                "tool_calls" if reason == "stop" else reason
    return {"role": "assistant", "content": text, "refusal": None}, reason


def _chat_prompt(body: ChatCompletionRequest, model, tools: list[dict] | None) -> tuple[list[dict], list[dict] | None]:
    """The messages and the tools the chat template renders."""
    messages = [_message_dict(i, m) for i, m in enumerate(body.messages)]
    messages, native_tools = prompt_messages(messages, tools, model.engine.chat_template)
    return messages, tools if native_tools else None


@router.post("/apply-template")
async def apply_template(body: ChatCompletionRequest, http: Request) -> dict:
    """llama-server's: the prompt text a chat request would run (messages and tools through the template)."""
    model = state_of(http).models.get(body.model)

    def render() -> str:
        tools, _ = _tool_plan(body, model)
        messages, template_tools = _chat_prompt(body, model, tools)
        text = model.chat_text(messages, template_tools)
        try:  # the answer must be UTF-8: a lone surrogate from a JSON \ud800 escape in the request is its fault
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"the messages are not valid Unicode (a lone surrogate at character {e.start} of "
                                "the rendered prompt)", param="messages") from None
        return text

    return {"prompt": await asyncio.to_thread(render)}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, http: Request):
    state = state_of(http)
    model = state.models.get(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    top = (body.top_logprobs or 0) if body.logprobs else None
    def prepare():  # off the event loop: tools and messages may be megabytes of JSON to render
        tools, grammar = _tool_plan(body, model)
        messages, template_tools = _chat_prompt(body, model, tools)
        return tools, grammar, model.chat_prompt(messages, template_tools), model.chat_keep(messages, template_tools)

    tools, call_grammar_text, ids, keep = await asyncio.to_thread(prepare)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if call_grammar_text is not None:
        constraint = {"grammar": call_grammar_text}
    else:
        constraint = {"response_format": body.response_format} if body.grammar is None else {"grammar": body.grammar}
    requests = await asyncio.to_thread(_submit_all, model, [ids], body, max_tokens, top, keep, **constraint)
    cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
    head = {"id": cid, "created": created, "model": model.id, "system_fingerprint": state.fingerprint}
    lp = _LogprobCursor(model, requests, top is not None)

    if body.stream:
        started: set[int] = set()

        def chunk(i: int, piece: str) -> dict | None:
            if tools:  # a reply that may be a call is sent whole, once it is known which it is
                return None
            delta = {"content": piece}
            if i not in started:
                started.add(i)
                delta = {"role": "assistant", "content": piece}
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": i, "delta": delta, "logprobs": lp.chat(i), "finish_reason": None}]}

        def final(i: int, r, text: str) -> dict:
            if tools:
                message, reason = _message(text, r, tools)
                delta = {k: v for k, v in message.items() if k != "refusal"}
                if "tool_calls" in delta:
                    delta["tool_calls"] = [{"index": j, **c} for j, c in enumerate(delta["tool_calls"])]
            else:
                delta, reason = ({} if i in started else {"role": "assistant", "content": ""}), _finish_reason(r)
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": i, "delta": delta, "logprobs": lp.chat(i), "finish_reason": reason}]}

        def usage() -> dict:
            return {**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage([ids], requests)}

        include = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(http, model, [ids], requests, chunk, final, usage, include)

    texts = await run_blocking(http, model, [ids], requests)
    choices = []
    for i, (text, r) in enumerate(zip(texts, requests)):
        message, reason = _message(text, r, tools)
        choices.append({"index": i, "message": message, "logprobs": lp.chat(i), "finish_reason": reason})
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": _usage([ids], requests)})


def _completion_prompts(model, prompt) -> tuple[list[list[int]], list[str | None]]:
    """Token ids of each prompt, and its text (None when given as ids) for echo."""
    if isinstance(prompt, str):
        return [model.text_prompt(prompt)], [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return [model.text_prompt(p) for p in prompt], list(prompt)
    if all(isinstance(p, int) for p in prompt):
        return [_checked_ids(model, prompt, "prompt")], [None]
    return [_checked_ids(model, p, f"prompt[{i}]") for i, p in enumerate(prompt)], [None] * len(prompt)


def _checked_ids(model, ids: list[int], param: str) -> list[int]:
    vocab = model.engine.vocab_size
    if not ids:
        raise APIError(400, f"{param} holds no token", param=param)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"{param} holds token id {bad}, outside the vocabulary of {vocab}", param=param)
    return list(ids)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, http: Request):
    state = state_of(http)
    model = state.models.get(body.model)
    if body.suffix:
        raise _unsupported("suffix", "suffix (fill in the middle)")
    if body.logprobs is not None and body.echo:
        raise _unsupported("logprobs", "logprobs of echoed prompt tokens")
    prompts, texts_in = await asyncio.to_thread(_completion_prompts, model, body.prompt)
    requests = await asyncio.to_thread(_submit_all, model, prompts, body, body.max_tokens, body.logprobs,
                                       grammar=body.grammar)
    cid, created = "cmpl-" + secrets.token_hex(12), int(time.time())
    head = {"id": cid, "created": created, "model": model.id, "system_fingerprint": state.fingerprint}
    lp = _LogprobCursor(model, requests, body.logprobs is not None)
    offsets = [0] * len(requests)  # characters of each choice's text so far (text_offset)

    def logprobs(i: int) -> dict | None:
        out = lp.completion(i, offsets[i])
        if out is not None:
            offsets[i] += sum(len(t) for t in out["tokens"])
        return out

    def echo(i: int) -> str:
        if not body.echo:
            return ""
        text = texts_in[i // body.n]
        return text if text is not None else model.engine.tokenizer.decode(prompts[i // body.n])

    if body.stream:
        started: set[int] = set()

        def chunk(i: int, piece: str) -> dict:
            if i not in started:
                started.add(i)
                piece = echo(i) + piece
            return {**head, "object": "text_completion",
                    "choices": [{"index": i, "text": piece, "logprobs": logprobs(i), "finish_reason": None}]}

        def final(i: int, r, _whole: str) -> dict:
            text = "" if i in started else echo(i)
            return {**head, "object": "text_completion",
                    "choices": [{"index": i, "text": text, "logprobs": logprobs(i),
                                 "finish_reason": _finish_reason(r)}]}

        def usage() -> dict:
            return {**head, "object": "text_completion", "choices": [], "usage": _usage(prompts, requests)}

        include = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(http, model, prompts, requests, chunk, final, usage, include)

    texts = await run_blocking(http, model, prompts, requests)
    return JSONResponse({**head, "object": "text_completion", "choices": [
        {"index": i, "text": echo(i) + text, "logprobs": logprobs(i), "finish_reason": _finish_reason(r)}
        for i, (text, r) in enumerate(zip(texts, requests))], "usage": _usage(prompts, requests)})


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, http: Request):
    """Unit-length embeddings of the model's final hidden states, pooled as the server was started
    (--pooling). base64: the little-endian float32 bytes, as OpenAI sends them."""
    model = state_of(http).models.get(body.model)
    items = body.input
    if isinstance(items, str) or (items and all(isinstance(t, int) for t in items)):
        items = [items]
    if not items:
        raise APIError(400, "input is empty", param="input")
    hidden = model.engine.config["hidden_size"]
    if body.dimensions is not None and body.dimensions != hidden:
        raise APIError(400, f"dimensions: {model.id} gives {hidden}-dimensional embeddings, which this server "
                            f"does not shorten", param="dimensions")
    def work(stop) -> bytes:  # on the model's embedding thread, the response body too
        vectors, n_tokens = model.embed(items, stop=stop)
        data = []
        for i, v in enumerate(vectors):
            value = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") \
                if body.encoding_format == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        return json.dumps({"object": "list", "data": data, "model": model.id,
                           "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}).encode()

    return Response(await run_embedding(http, model, work), media_type="application/json")
