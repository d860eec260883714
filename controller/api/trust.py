"""Trust routes: the controller's online key, root installation, and the TUF metadata agents fetch.

`/tuf/{filename}` serves exactly the published names (`N.root.json`, `root.json`,
`timestamp.json`, `snapshot.json`, `targets.json`) with `Cache-Control: no-store`, because a
cached timestamp would hide new releases (and eventually look like a freeze attack). The
timestamp route also re-signs snapshot/timestamp when they near expiry (at most once a
minute), so an idle controller keeps its metadata fresh for the agents polling it.
"""

from __future__ import annotations

import contextlib
import time

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from tuf.api.metadata import Root

from fleet.controller.api.deps import ADMIN, OPERATOR, PUBLIC, VIEWER, Ctx
from fleet.controller.api.models import MAX_TARGETS_BYTES
from fleet.controller.api.schemas import OnlineKeyPublic, TrustRootPublic
from fleet.core import trust as trust_rules
from fleet.core.errors import InvalidInputError, NotFoundError

router = APIRouter(prefix="/api/v1/trust", tags=["trust"])
tuf_router = APIRouter(prefix="/tuf", tags=["trust"])

JSON = "application/json"
NO_STORE = {"Cache-Control": "no-store"}
REFRESH_EVERY_S = 60.0


@router.get("/online-key", dependencies=[VIEWER], summary="The controller's online public key (for `fleet keys init`)")
def online_key(ctx: Ctx) -> OnlineKeyPublic:
    key = ctx.trust.online_public_key()
    return OnlineKeyPublic(
        keyid=key.keyid, key=key.to_dict(), public_key_pem=trust_rules.public_key_pem(key).decode()
    )


def _root_public(root: Root) -> TrustRootPublic:
    return TrustRootPublic(
        version=root.version,
        expires=root.expires,
        consistent_snapshot=bool(root.consistent_snapshot),
        roles={
            name: {"keyids": list(role.keyids), "threshold": role.threshold}
            for name, role in root.roles.items()
        },
    )


@router.post("/root", dependencies=[ADMIN], summary="Install root.json (the first, or the next one of a rotation)")
async def install_root(request: Request, ctx: Ctx) -> TrustRootPublic:
    data = await request.body()
    if not data:
        raise InvalidInputError("send the root.json made by `fleet keys init` as the request body")

    def install() -> Root:
        root = ctx.trust.install_root(data)
        ctx.trust.refresh()  # new keys: re-sign snapshot and timestamp under them
        return root

    return _root_public(await run_in_threadpool(install))


@router.get("/root", dependencies=[VIEWER], summary="The installed root.json (to provision agents with)")
def get_root(ctx: Ctx) -> Response:
    return Response(ctx.trust.get("root.json"), media_type=JSON)


@router.post("/targets", dependencies=[OPERATOR],
             summary="Publish a targets.json re-signed by the operator (policy, key change)")
async def publish_targets(request: Request, ctx: Ctx) -> dict[str, int]:
    data = await request.body()
    if not data:
        raise InvalidInputError("send the signed targets.json as the request body")
    if len(data) > MAX_TARGETS_BYTES:
        raise InvalidInputError(f"targets.json is larger than {MAX_TARGETS_BYTES} bytes")
    targets = await run_in_threadpool(ctx.trust.accept_targets, data)
    return {"version": targets.version, "targets": len(targets.targets)}


@router.get("/targets", dependencies=[VIEWER],
            summary="The current signed targets.json (to sign the next push on top of)")
def get_targets(ctx: Ctx) -> Response:
    try:
        data = ctx.trust.get("targets.json")
    except NotFoundError:
        raise NotFoundError("no targets.json published yet: the first push creates it") from None
    return Response(data, media_type=JSON, headers=NO_STORE)


def _maybe_refresh(request: Request, ctx: Ctx) -> None:
    now = time.monotonic()
    # Racing requests may both refresh; harmless, the repository serializes and skips no-ops.
    if now - getattr(request.app.state, "tuf_refreshed_at", -REFRESH_EVERY_S) < REFRESH_EVERY_S:
        return
    request.app.state.tuf_refreshed_at = now
    with contextlib.suppress(NotFoundError):  # no root installed yet: nothing to sign
        ctx.trust.refresh()


@tuf_router.get("/{filename}", dependencies=[PUBLIC], summary="TUF metadata for agents")
def tuf_file(filename: str, request: Request, ctx: Ctx) -> Response:
    if not trust_rules.PUBLISHED_NAME_RE.match(filename):
        raise NotFoundError(f"{filename!r} is not a metadata file this controller publishes")
    if filename == "timestamp.json":
        _maybe_refresh(request, ctx)
    return Response(ctx.trust.get(filename), media_type=JSON, headers=NO_STORE)
