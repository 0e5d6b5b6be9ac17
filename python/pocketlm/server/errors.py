"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}.

Every failure of a request ends as one of these, with the HTTP status clients expect (the official
`openai` client maps 400 to BadRequestError, 401 to AuthenticationError, 404 to NotFoundError, 413,
503 and others to APIStatusError, and retries 503 after `Retry-After`)."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 503: "server_error", 500: "server_error",
         502: "server_error"}


class APIError(Exception):
    """A request that fails: its status, message, the request field at fault (`param`) and a code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self, path: str = "") -> JSONResponse:
        """The response; on Ollama's routes (/api/...) in Ollama's shape, {"error": message}."""
        body = {"error": self.message} if path.startswith("/api/") else self.body()
        return JSONResponse(body, status_code=self.status, headers=self.headers)
