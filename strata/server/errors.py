"""OpenAI-style error responses: {"error": {"message", "type", "param", "code"}}.

Status codes: 400 bad parameters (and a prompt longer than the context), 401 a missing
or wrong API key, 404 an unknown model or route, 422 a body that is not JSON, 429 a
full waiting queue (with Retry-After), 500 a request the engine failed, 503 loading or
shutting down (with Retry-After).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from strata.errors import ContextLengthError, InvalidRequestError

logger = logging.getLogger("strata.server")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid_request(exc: InvalidRequestError, param: str | None = None) -> APIError:
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param=param, code="context_length_exceeded")
    return APIError(400, str(exc), param=exc.param if exc.param is not None else param)


def server_error(message: str) -> APIError:
    return APIError(500, message, type_="server_error", code="internal_error")


def unavailable(message: str, retry_after_s: int = 5) -> APIError:
    return APIError(
        503, message, type_="service_unavailable", code="service_unavailable",
        headers={"Retry-After": str(retry_after_s)},
    )  # fmt: skip


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return invalid_request(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            first = errors[0]
            message = f"the request body is not valid JSON: {first.get('msg', '')}"
            return APIError(422, message, code="invalid_json").response()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None  # the top-level field; the message has the full path
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problems)"
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type_, code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return server_error(f"internal error: {type(exc).__name__}: {exc}").response()
