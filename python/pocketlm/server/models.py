"""The models a server holds: one Engine each, found by the id clients send as `model`."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pocketlm.errors import (ChatTemplateError, ConstraintError, ContextOverflowError, InvalidInputError, QueueFullError,
                             UnsupportedModelError)
from pocketlm.server.errors import APIError

RETRY_AFTER_SECONDS = 1  # what a client told the queue is full waits before trying again
# Embedding requests, as OpenAI bounds them: inputs and tokens per request. They run one at a time per
# model on its own worker thread; past MAX_EMBED_WAITING waiting, 503.
MAX_EMBED_INPUTS = 2048
MAX_EMBED_TOKENS = 300_000
MAX_EMBED_WAITING = 16


def model_id(spec: str | os.PathLike) -> str:
    """The id of a model given as `pocketlm serve` takes it: a known name as is, a file by its stem."""
    text = os.fspath(spec)
    path = Path(text)
    return path.stem if path.suffix.lower() in (".plm", ".gguf") else text


MAX_TOKENS_PER_CONTEXT = 4  # the default answer limit: four contexts' worth (a shifting answer's longest)


@dataclass
class ServedModel:
    id: str
    engine: Any  # pocketlm.Engine
    created: int = field(default_factory=lambda: int(time.time()))
    pooling: str | None = None  # how embeddings pool the tokens' hidden states (None: the model's own, Engine.embed)
    # the most tokens one answer may ask for (answers past the context shift it, so without a bound one
    # request could hold a sequence for 2^32 tokens); None: MAX_TOKENS_PER_CONTEXT x the context
    max_tokens_limit: int | None = None

    def __post_init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.embedder = ThreadPoolExecutor(1, thread_name_prefix=f"pocketlm-embed-{self.id}")
        self.embed_waiting = 0  # requests queued on or running in `embedder` (event loop only)

    def card(self) -> dict:
        """The model as /v1/models lists it."""
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "pocketlm"}

    @property
    def shifts(self) -> bool:
        """Whether answers that outgrow the context shift it (models with rotary positions)."""
        return self.engine.can_shift

    def chat_keep(self, messages: list[dict], tools: list[dict] | None = None) -> int:
        """Tokens a chat's context shift keeps: its system prompt (Engine.chat_keep)."""
        try:
            return self.engine.chat_keep(messages, tools) if self.shifts else 4
        except InvalidInputError as e:
            raise APIError(400, str(e), param="messages") from None

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The token ids of `messages` rendered with the model's chat template (which writes BOS
        itself where the model wants one, as HF's apply_chat_template)."""
        text = self.chat_text(messages, tools)
        try:  # text the tokenizer refuses (a lone surrogate from a JSON \ud800 escape) is the request's fault
            return self.engine.tokenizer.encode(text, add_special_tokens=False)
        except InvalidInputError as e:
            raise APIError(400, str(e), param="messages") from None

    def chat_text(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        try:
            text = self.engine.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        except ChatTemplateError as e:
            raise APIError(400, f"the model's chat template cannot render these messages: {e}",
                           param="messages") from None
        except InvalidInputError as e:
            raise APIError(400, str(e), param="messages") from None
        return text

    def text_prompt(self, text: str) -> list[int]:
        try:
            ids = self.engine.tokenizer.encode(text, add_special_tokens=True)
        except InvalidInputError as e:
            raise APIError(400, str(e), param="prompt") from None
        tok = self.engine.tokenizer
        if not ids and tok.bos_id is not None:
            ids = [tok.bos_id]
        if not ids:
            raise APIError(400, "the prompt is empty and the model has no BOS token to start from", param="prompt")
        return ids

    def token_info(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and its bytes (a token may hold part of a UTF-8 character: its text then has
        U+FFFD, its bytes are exact), as OpenAI's logprobs give them."""
        cache = self.__dict__.setdefault("_token_info", {})
        if token_id not in cache:
            try:
                from pocketlm.constrain import _lltokenizer

                raw = _lltokenizer(self.engine).decode_bytes([token_id])
            except Exception:  # noqa: BLE001 - without llguidance: the text's own bytes
                raw = self.engine.tokenizer.decode([token_id]).encode("utf-8", "replace")
            cache[token_id] = (raw.decode("utf-8", "replace"), list(raw))
        return cache[token_id]

    def embed(self, inputs: list, param: str = "input", truncate: bool = False, stop=None):
        """(unit-length embeddings [n, hidden] float32, the tokens they read) of texts or token-id lists.
        truncate: a text longer than the context keeps its first tokens (else 400). stop: a
        threading.Event that ends the work early (the client left, the server stops)."""
        engine = self.engine
        if len(inputs) > MAX_EMBED_INPUTS:
            raise APIError(400, f"{param} holds {len(inputs)} inputs; at most {MAX_EMBED_INPUTS} per request",
                           param=param)
        lists, total = [], 0
        for i, item in enumerate(inputs):
            try:
                ids = engine.embedding_ids(item) if isinstance(item, str) else list(item)
            except InvalidInputError as e:
                raise APIError(400, f"{param}[{i}]: {e}", param=param) from None
            if not isinstance(item, str) and any(not 0 <= t < engine.vocab_size for t in ids):
                raise APIError(400, f"{param}[{i}] holds a token id outside the vocabulary of {engine.vocab_size}",
                               param=param)
            if not ids and engine.tokenizer.bos_id is not None:  # an empty id list: BOS, as an empty text
                ids = [engine.tokenizer.bos_id]
            if not ids:
                raise APIError(400, f"{param}[{i}] is empty", param=param)
            if len(ids) > engine.max_context:
                if not truncate:
                    raise APIError(400, f"{param}[{i}] is {len(ids)} tokens, more than this server's context of "
                                        f"{engine.max_context} for {self.id}", param=param,
                                   code="context_length_exceeded")
                ids = ids[:engine.max_context]
            total += len(ids)
            if total > MAX_EMBED_TOKENS:
                raise APIError(400, f"{param} holds more than {MAX_EMBED_TOKENS} tokens; send fewer per request",
                               param=param)
            lists.append(ids)
        try:
            return engine.embed(lists, pooling=self.pooling, stop=stop), total
        except UnsupportedModelError as e:
            raise APIError(400, str(e), param="model") from None

    def submit(self, ids: list[int], *, max_tokens: int | None, stop: list[str], response_format: dict | None = None,
               grammar: str | None = None, logprobs: int | None = None, prompt_param: str = "messages",
               keep: int = 4, **sampling):
        """Queues a generation on the engine's scheduler; its Request. Failures as APIError
        (prompt_param: the request field a prompt too long is named by). A prompt must fit the context;
        an answer longer than what is left of it shifts the context (its first `keep` tokens stay: the
        system prompt of a chat, Engine.chat_keep) up to max_tokens."""
        engine = self.engine
        if len(ids) >= engine.max_context:
            raise APIError(400, f"the prompt is {len(ids)} tokens, and this server's context for {self.id} is "
                                f"{engine.max_context} tokens (one more is needed for the answer); shorten the "
                                f"{prompt_param} or start the server with a larger -c", param=prompt_param,
                           code="context_length_exceeded")
        if max_tokens is None:  # up to the end of the context, as OpenAI and llama-server
            max_tokens = engine.max_context - len(ids)
        limit = self.max_tokens_limit or MAX_TOKENS_PER_CONTEXT * engine.max_context
        if max_tokens > limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server answers at most {limit} tokens per request "
                                f"for {self.id} (serve --max-tokens-limit)", param="max_tokens")
        try:
            shift = {"on_overflow": "shift", "keep": min(keep, len(ids))} if self.shifts else {}
            return engine.submit(ids, max_tokens=max_tokens, stop=stop, add_special_tokens=False,
                                 response_format=response_format, grammar=grammar, logprobs=logprobs, **shift,
                                 **sampling)
        except ConstraintError as e:
            raise APIError(400, str(e), param="grammar" if grammar is not None else "response_format") from None
        except ContextOverflowError as e:
            raise APIError(400, str(e), param=prompt_param, code="context_length_exceeded") from None
        except QueueFullError as e:
            raise APIError(503, str(e), code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except InvalidInputError as e:
            raise APIError(400, str(e)) from None


class ModelRegistry:
    def __init__(self, models: list[ServedModel]):
        self.models: dict[str, ServedModel] = {}
        for m in models:
            if m.id in self.models:
                raise ValueError(f"two models have the id {m.id!r}; give one of them another file name")
            self.models[m.id] = m

    def get(self, model_id: str | None) -> ServedModel:
        """The model of that id; Ollama's `name:latest` finds `name`."""
        if isinstance(model_id, str) and model_id not in self.models and model_id.endswith(":latest"):
            model_id = model_id[:-len(":latest")]
        if model_id is None or model_id not in self.models:
            known = ", ".join(sorted(self.models))
            raise APIError(404, f"The model {model_id!r} does not exist on this server (it serves: {known})",
                           param="model", code="model_not_found")
        return self.models[model_id]

    def __iter__(self):
        return iter(self.models.values())
