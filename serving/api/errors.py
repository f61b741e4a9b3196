"""OpenAI-shaped errors and the handlers that turn every failure into one.

    APIError (status, type, code)             {"error": {"message", "type", "param", "code"}}
    ├── InvalidRequest        400 invalid_request_error   malformed JSON, wrong types, bad values
    │   └── ContextLengthExceeded  400 code=context_length_exceeded
    ├── AuthenticationFailed  401 authentication_error    missing, wrong or revoked key
    ├── PermissionDenied      403 permission_error        e.g. a tenant key on an admin route
    ├── NotFound              404 not_found_error         unknown route; model_not_found
    ├── Conflict              409 invalid_request_error   already exists
    ├── PayloadTooLarge       413 invalid_request_error   body over the limit
    ├── UnprocessableAdapter  422 invalid_request_error   an adapter refused by validation
    ├── RateLimited           429 rate_limit_error        quota exceeded; carries Retry-After
    ├── ServiceUnavailable    503 service_unavailable     engine or registry down; retry later
    └── InsufficientStorage   507 server_error            the adapter cache's disk is full

Nothing here ever returns a stack trace; unexpected exceptions become a 500 whose message
names only the request id.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
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


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(APIError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(APIError):
    status = 403
    type = "permission_error"


class NotFound(APIError):
    status = 404
    type = "not_found_error"


class ModelNotFound(NotFound):
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        # OpenAI's own wording: says nothing about whether the model exists for someone else.
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.", param="model"
        )


class Conflict(APIError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class UnprocessableAdapter(APIError):
    status = 422
    type = "invalid_request_error"


class RateLimited(APIError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailable(APIError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class InsufficientStorage(APIError):
    status = 507
    type = "server_error"
    code = "insufficient_storage"


_STATUS_TO_ERROR: dict[int, type[APIError]] = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: NotFound,
    405: InvalidRequest,
    413: PayloadTooLarge,
    429: RateLimited,
    503: ServiceUnavailable,
}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request.", None
    msg = str(first.get("msg", "invalid value"))
    return (f"Invalid value for '{param}': {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    """Make every error path of ``app`` answer with an OpenAI-shaped body."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return InvalidRequest(message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        cls = _STATUS_TO_ERROR.get(exc.status_code, APIError)
        err = cls(str(exc.detail))
        err.status = exc.status_code
        return err.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:12]
        log.exception("unhandled error %s on %s %s", ref, request.method, request.url.path)
        return APIError(f"Internal error (reference {ref}).").response()
