"""FastAPI dependencies and their `Annotated` aliases: the context, a per-request session, and who may call.

Rule: a request's database work is one transaction. The session commits when the endpoint
returns and rolls back when it raises; the dependency is function-scoped, so the commit (and
any error it raises) happens before the response is sent, never after the client saw success.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from fleet.controller import access
from fleet.controller import devices as devices_svc
from fleet.controller.context import ControllerContext
from fleet.controller.db import session_scope
from fleet.core.errors import AuthenticationError


def get_ctx(request: Request) -> ControllerContext:
    ctx: ControllerContext = request.app.state.ctx
    return ctx


def get_session(request: Request) -> Iterator[Session]:
    with session_scope(get_ctx(request).session_factory) as session:
        yield session


Ctx = Annotated[ControllerContext, Depends(get_ctx)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


# -- access control ---------------------------------------------------------------------------
#
# Every route declares who may call it, in its decorator: `dependencies=[VIEWER]` (or OPERATOR,
# ADMIN, DEVICE_OR_VIEWER) or `dependencies=[PUBLIC]`. `tests/attacks/test_access_attacks.py`
# fails for a route that declares nothing, and checks that what answers without a token is
# exactly `PUBLIC_ROUTES`.

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    description="An API token (`fleet access create`, or the admin token in `<data_dir>/admin.token`).",
)

# (method, path) of the routes that answer without credentials, and why:
PUBLIC_ROUTES: frozenset[tuple[str, str]] = frozenset({
    # probes: Kubernetes calls them without credentials
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    # TUF metadata: signed by the release and online keys, public by design
    ("GET", "/tuf/{filename}"),
    # the dashboard's static shell; the data it loads needs a token
    ("GET", "/"),
    ("GET", "/ui"),
    ("GET", "/ui/"),
    ("GET", "/ui/{name}"),
    # the API's description (not its data)
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("HEAD", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("HEAD", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("HEAD", "/redoc"),
    ("HEAD", "/openapi.json"),
})
# Public only when `settings.metrics_public` is set; a viewer token otherwise.
METRICS_ROUTE = ("GET", "/metrics")

_AUTH_HEADER_HELP = "send `Authorization: Bearer <token>` (a token from `fleet access create`)"


class RoleRequirement:
    """A route dependency: the caller must hold at least `role` (or be a device, if `devices`)."""

    def __init__(self, role: str, *, devices: bool = False) -> None:
        self.role = access.check_role(role)
        self.devices = devices

    def __repr__(self) -> str:
        return f"RoleRequirement({self.role!r}{', devices=True' if self.devices else ''})"

    def __call__(
        self, request: Request, _scheme: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
    ) -> access.Principal:
        principal = authenticate_request(get_ctx(request), request.headers, devices=self.devices)
        if principal.kind == "token":
            access.authorize(principal, self.role)
        return principal


class PublicRoute:
    """A route dependency that checks nothing: the route is public (listed in `PUBLIC_ROUTES`)."""

    role = "public"

    def __repr__(self) -> str:
        return "PublicRoute()"

    def __call__(self) -> None:
        return None


def bearer_token(headers: Mapping[str, str]) -> str:
    """The token of an `Authorization: Bearer` header; AuthenticationError when absent or malformed."""
    value = headers.get("authorization")
    if value is None or not value.strip():
        raise AuthenticationError(f"this needs an API token: {_AUTH_HEADER_HELP}", reason="missing")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
        raise AuthenticationError(f"malformed Authorization header: {_AUTH_HEADER_HELP}", reason="malformed")
    return token


def authenticate_request(ctx: ControllerContext, headers: Mapping[str, str], *, devices: bool = False
                         ) -> access.Principal:
    """Who the request's credentials prove; devices count only where `devices` is true."""
    token = bearer_token(headers)
    device_id = headers.get("x-fleet-device-id")
    with session_scope(ctx.session_factory) as session:
        if device_id is not None:
            if not devices:
                raise AuthenticationError(
                    "device credentials are not accepted here; operators use an API token", reason="device",
                )
            device = devices_svc.authenticate(session, device_id, token)
            return access.Principal(kind="device", id=device.id, name=device.id, role=None)
        row = access.authenticate(session, token)
        access.touch(session, row)
        return access.principal_for(row)


PUBLIC = Depends(PublicRoute())
VIEWER = Depends(RoleRequirement("viewer"))
OPERATOR = Depends(RoleRequirement("operator"))
ADMIN = Depends(RoleRequirement("admin"))
DEVICE_OR_VIEWER = Depends(RoleRequirement("viewer", devices=True))
CurrentPrincipal = Annotated[access.Principal, VIEWER]


def declared_access(route_dependant: Dependant) -> list[str]:
    """The access declarations found in a route's dependency tree: 'public', a role, or 'device|<role>'."""
    found: list[str] = []
    stack = [route_dependant]
    while stack:
        dependant = stack.pop()
        call = dependant.call
        if isinstance(call, PublicRoute):
            found.append("public")
        elif isinstance(call, RoleRequirement):
            found.append(f"device|{call.role}" if call.devices else call.role)
        stack.extend(dependant.dependencies)
    return found


def access_table(app: FastAPI) -> dict[tuple[str, str], list[str]]:
    """(method, path) -> the access declarations of every route the app serves (none for plain routes)."""
    table: dict[tuple[str, str], list[str]] = {}
    for route in iter_route_contexts(app.routes):
        dependant = getattr(route, "dependant", None) if isinstance(route.original_route, APIRoute) else None
        for method in sorted(route.methods or ()):
            table[(method, str(route.path))] = declared_access(dependant) if dependant is not None else []
    return table
