"""The one place where domain errors become HTTP responses.

Rule: handlers raise `fleet.core.errors` exceptions and never build status codes themselves;
this module maps each error class to a status and renders every error, including FastAPI's
own validation and routing errors, as `{"error": code, "message": str, "details": {...}}`, so
the CLI and scripts parse one shape.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleet.core import errors as E

log = logging.getLogger(__name__)


class PayloadTooLargeError(E.InvalidInputError):
    """A request body over the configured limit (REST only, hence defined here, not in the core)."""

    code = "payload_too_large"


# Most specific first: the first matching class wins.
STATUS_BY_ERROR: tuple[tuple[type[E.FleetError], int], ...] = (
    (PayloadTooLargeError, 413),
    (E.NotFoundError, 404),
    (E.ConflictError, 409),
    (E.InvalidInputError, 400),
    (E.BundleError, 400),
    (E.SignatureError, 400),
    (E.IntegrityError, 400),
    (E.AuthenticationError, 401),
    (E.PermissionDeniedError, 403),
    (E.StorageFullError, 507),
    (E.ModelLoadError, 422),
    (E.InferenceInputError, 400),
)

_HTTP_CODES = {
    400: "invalid_input",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    416: "range_not_satisfiable",
}


def status_for(exc: E.FleetError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": code, "message": message, "details": _safe(details or {})}


def error_response(
    status: int, code: str, message: str, details: dict[str, Any] | None = None, **kwargs: Any
) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, **kwargs)


def _safe(details: dict[str, Any]) -> Any:
    try:
        return jsonable_encoder(details)
    except (TypeError, ValueError):
        return {k: str(v) for k, v in details.items()}


def fleet_error_response(exc: E.FleetError) -> JSONResponse:
    """The response for a domain error (also used by middleware that runs before the routes)."""
    status = status_for(exc)
    if status >= 500:
        log.error("request failed: %s", exc, exc_info=exc)
    headers = {"WWW-Authenticate": www_authenticate(exc)} if status == 401 else None
    return error_response(status, exc.code, exc.message, exc.details, headers=headers)


async def _fleet_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, E.FleetError)
    return fleet_error_response(exc)


def www_authenticate(exc: E.FleetError) -> str:
    """RFC 6750: name the scheme; say `invalid_token` when a token was sent but refused."""
    if exc.details.get("reason") in (None, "missing"):
        return 'Bearer realm="fleet"'
    return 'Bearer realm="fleet", error="invalid_token"'


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Never echo the client's input back: it may be huge, hostile, or not even JSON-encodable (NaN).
    problems = [{k: e.get(k) for k in ("loc", "msg", "type") if k in e} for e in exc.errors()[:20]]
    first = problems[0] if problems else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = f"invalid request: {where}: {first.get('msg', 'invalid value')}" if where else "invalid request"
    return error_response(422, "invalid_input", message, {"errors": problems})


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error in REST request", exc_info=exc)
    return error_response(500, "internal", "internal error; see the controller's log")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(E.FleetError, _fleet_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
