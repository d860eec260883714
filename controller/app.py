"""The controller's FastAPI application: routers, error mapping, request size limits.

Rules this module enforces:

- every request body is capped while it streams, before any handler or multipart parser
  buffers it: bundle uploads at `max_bundle_bytes` (plus room for targets.json and multipart
  framing), everything else at `max_request_body_bytes`; an over-long body is answered with
  413 in the API's error shape, whether it announced its length or not;
- a JSON body the handlers could not take safely is refused with 400 before routing: not UTF-8,
  nested deeper than `MAX_JSON_DEPTH`, holding NaN/Infinity (not JSON, and unstorable in
  PostgreSQL) or integers too long to convert; other malformed JSON gets FastAPI's 422;
- every error leaves as `{"error", "message", "details"}` (see `fleet.controller.api.errors`);
- every route declares who may call it (`fleet.controller.api.deps`: PUBLIC, VIEWER, OPERATOR,
  ADMIN, DEVICE_OR_VIEWER); `/metrics` needs a viewer token unless `metrics_public` is set.
"""

from __future__ import annotations

import json
import re

from fastapi import FastAPI, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet.controller import access
from fleet.controller.api import access_tokens, devices, health, models, rollouts, tokens, trust
from fleet.controller.api import device_ca as device_ca_api
from fleet.controller.api import drift as drift_api
from fleet.controller.api import reports as reports_api
from fleet.controller.api.deps import PUBLIC, VIEWER, authenticate_request
from fleet.controller.api.errors import error_body, fleet_error_response, install_error_handlers
from fleet.controller.context import ControllerContext
from fleet.controller.metrics import ControllerMetrics
from fleet.controller.web import router as web_router
from fleet.core.bundle import json_depth
from fleet.core.errors import FleetError

UPLOAD_PATH_RE = re.compile(r"^/api/v1/models/[^/]+/versions/?$")
# Multipart framing and the targets.json part ride along with the bundle.
UPLOAD_OVERHEAD_BYTES = models.MAX_TARGETS_BYTES + 1024 * 1024
# No request of this API nests more than a few levels; hundreds of levels only attack the parser.
MAX_JSON_DEPTH = 32


class BodySizeLimitMiddleware:
    """Refuses request bodies over a limit with 413, counting bytes as they arrive."""

    def __init__(self, app: ASGIApp, *, default_limit: int, upload_limit: int) -> None:
        self.app = app
        self.default_limit = default_limit
        self.upload_limit = upload_limit

    def limit_for(self, method: str, path: str) -> int:
        # A re-signed targets.json alone may be as large as the one riding with a bundle.
        if method == "POST" and (UPLOAD_PATH_RE.match(path) or path.rstrip("/") == "/api/v1/trust/targets"):
            return self.upload_limit
        return self.default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("method", "GET"), scope.get("path", ""))
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:
                    await self._too_large(send, limit)
                    return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    # Make the app stop reading; whatever it answers is replaced below.
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._too_large(send, limit)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large(send, limit)
        except Exception:
            if not exceeded:
                raise
            if not started:
                await self._too_large(send, limit)

    @staticmethod
    async def _too_large(send: Send, limit: int) -> None:
        body = json.dumps(
            error_body("payload_too_large", f"request body is larger than the limit of {limit} bytes",
                       {"limit": limit})
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


class JsonBodyGuardMiddleware:
    """Refuses JSON bodies that would crash or poison a handler, with 400 and a clear message.

    Runs inside `BodySizeLimitMiddleware`, so the body it buffers is already capped.
    """

    def __init__(self, app: ASGIApp, *, max_depth: int = MAX_JSON_DEPTH) -> None:
        self.app = app
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; let the app see the disconnect
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = self.problem(body)
        if problem is not None:
            await _send_json(send, 400, error_body("invalid_input", problem, {}))
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def problem(self, body: bytes) -> str | None:
        """Why this body is refused, or None to let the application parse it."""
        if not body.strip():
            return None
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"request body is not UTF-8 ({exc}); send JSON encoded as UTF-8"
        try:
            value = json.loads(text, parse_constant=_refuse_constant)
        except _NotJson as exc:
            return str(exc)
        except RecursionError:
            return f"request body nests JSON too deeply (the limit is {self.max_depth} levels)"
        except json.JSONDecodeError:
            return None  # plain syntax errors: FastAPI answers 422 with the position
        except ValueError as exc:  # e.g. an integer literal with thousands of digits
            return f"request body is not acceptable JSON: {exc}"
        depth = json_depth(value)
        if depth > self.max_depth:
            return f"request body nests JSON {depth} levels deep, above the limit of {self.max_depth}"
        return None


class _NotJson(ValueError):
    pass


def _refuse_constant(name: str) -> None:
    raise _NotJson(f"request body holds {name}, which is not JSON: send a finite number or null")


def _is_json(scope: Scope) -> bool:
    """JSON, or no content type at all (FastAPI parses such a body as JSON too)."""
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return True


async def _send_json(send: Send, status: int, payload: dict[str, object]) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class UploadAuthMiddleware:
    """Checks an upload's credentials before its body streams in.

    FastAPI parses a multipart body (spooling it to disk) before it runs route dependencies, so
    without this an anonymous client could make the controller store gigabytes only to be told
    401. The route still declares OPERATOR; this answers the same refusal earlier.
    """

    def __init__(self, app: ASGIApp, ctx: ControllerContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not UPLOAD_PATH_RE.match(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            principal = await run_in_threadpool(authenticate_request, self.ctx, headers)
            access.authorize(principal, "operator")
        except FleetError as exc:
            await fleet_error_response(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(ctx: ControllerContext) -> FastAPI:
    """The REST application over one controller context (no lifespan work: the server owns that)."""
    app = FastAPI(
        title="edge-fleet controller",
        version="0.1.0",
        description="Registry of signed model bundles, devices, and evidence-gated rollouts.",
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    for router in (
        health.router,
        models.router,
        devices.router,
        tokens.router,
        rollouts.router,
        trust.router,
        trust.tuf_router,
        device_ca_api.router,
        drift_api.router,
        reports_api.router,
        access_tokens.router,
        access_tokens.whoami_router,
        web_router,  # the dashboard: `/` redirects to `/ui/`
    ):
        app.include_router(router)
    settings = ctx.settings
    app.add_middleware(JsonBodyGuardMiddleware)  # inside the size limit: it buffers what that let through
    app.add_middleware(UploadAuthMiddleware, ctx=ctx)
    app.add_middleware(
        BodySizeLimitMiddleware,
        default_limit=settings.max_request_body_bytes,
        upload_limit=settings.max_bundle_bytes + UPLOAD_OVERHEAD_BYTES,
    )
    if ctx.metrics is not None:
        metrics = ctx.metrics
        # Scrapers send a viewer token unless the operator chose public metrics.
        metrics_access = PUBLIC if settings.metrics_public else VIEWER
        app.add_api_route("/metrics", lambda: _metrics_response(metrics), methods=["GET"], include_in_schema=False,
                          dependencies=[metrics_access])
        app.add_middleware(_MetricsMiddleware, metrics=metrics)
    return app


class _MetricsMiddleware:
    """Counts every REST request (outermost, so refused bodies and errors count too)."""

    def __init__(self, app: ASGIApp, metrics: ControllerMetrics) -> None:
        self.inner = metrics.asgi_middleware(app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.inner(scope, receive, send)


def _metrics_response(metrics: ControllerMetrics) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


__all__ = ["BodySizeLimitMiddleware", "JsonBodyGuardMiddleware", "create_app"]
