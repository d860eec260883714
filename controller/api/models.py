"""Model registry routes: upload signed bundles, list and inspect versions, aliases, downloads.

The bundle download is what agents use: it streams from the artifact store with single-range
`Range` support (206 + `Content-Range`, 416 when unsatisfiable), so an interrupted download
resumes where it stopped, and its ETag is the bundle's SHA-256. Stores that are not local
(S3) answer with a redirect to their own URL instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, BinaryIO

from fastapi import APIRouter, File, Request, Response, UploadFile
from fastapi.responses import RedirectResponse, StreamingResponse

from fleet.controller import registry
from fleet.controller.api.deps import DEVICE_OR_VIEWER, OPERATOR, VIEWER, Ctx, SessionDep
from fleet.controller.api.errors import error_response
from fleet.controller.api.schemas import (
    AliasPublic,
    AliasUpdate,
    ModelPublic,
    ModelVersionPublic,
    ModelVersionSummary,
)
from fleet.controller.context import ControllerContext
from fleet.controller.models import ModelVersion
from fleet.core.errors import InvalidInputError, NotFoundError

router = APIRouter(prefix="/api/v1/models", tags=["models"])

CHUNK = 1024 * 1024
# targets.json grows with every signed bundle; this is thousands of versions' worth.
MAX_TARGETS_BYTES = 16 * 1024 * 1024


def _public(ctx: ControllerContext, mv: ModelVersion) -> ModelVersionPublic:
    return ModelVersionPublic.from_row(mv, registry.bundle_ref(ctx, mv)["url"])


def _model_public(summary: registry.ModelSummary) -> ModelPublic:
    return ModelPublic(
        name=summary.name,
        task=summary.task,
        latest=summary.latest.version,
        versions=[ModelVersionSummary.model_validate(v) for v in summary.versions],
        aliases=summary.aliases,
    )


@router.post("/{name}/versions", status_code=201, dependencies=[OPERATOR], summary="Upload a signed bundle")
def upload_version(
    name: str,
    ctx: Ctx,
    bundle: Annotated[UploadFile, File(description="The bundle (.tar) built by `fleet models push`.")],
    targets: Annotated[UploadFile, File(description="The release-signed targets.json listing the bundle.")],
) -> ModelVersionPublic:
    targets_bytes = targets.file.read(MAX_TARGETS_BYTES + 1)
    if len(targets_bytes) > MAX_TARGETS_BYTES:
        raise InvalidInputError(f"targets.json is larger than {MAX_TARGETS_BYTES} bytes")
    mv = registry.upload_version(ctx, bundle.file, targets_bytes, expected_name=name)
    ctx.kick()  # a rollout may be waiting for this version
    return _public(ctx, mv)


@router.get("", dependencies=[VIEWER], summary="List models")
def list_models(session: SessionDep) -> list[ModelPublic]:
    return [_model_public(m) for m in registry.list_models(session)]


@router.get("/{name}", dependencies=[VIEWER], summary="Show a model, its versions and aliases")
def get_model(name: str, session: SessionDep) -> ModelPublic:
    return _model_public(registry.get_model(session, name))


@router.get("/{name}/versions/{version}", dependencies=[VIEWER],
            summary="Show one version (or alias) with its manifest")
def get_version(name: str, version: str, session: SessionDep, ctx: Ctx) -> ModelVersionPublic:
    return _public(ctx, registry.get_version(session, name, version))


@router.delete("/{name}/versions/{version}", status_code=204, dependencies=[OPERATOR],
               summary="Delete an unused version")
def delete_version(name: str, version: str, session: SessionDep, ctx: Ctx) -> Response:
    key = registry.delete_version(session, name, version)
    session.commit()
    # After the commit: a failed transaction must not leave a record pointing at no bytes.
    ctx.artifacts.delete(key)
    return Response(status_code=204)


@router.put("/{name}/aliases/{alias}", dependencies=[OPERATOR], summary="Point an alias at a version")
def set_alias(name: str, alias: str, body: AliasUpdate, session: SessionDep) -> AliasPublic:
    return AliasPublic.from_row(registry.set_alias(session, name, alias, body.version))


# -- download ---------------------------------------------------------------------------------------


class _Unsatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte span of a single `bytes=` range, or None to send the whole file.

    Multi-range, other units and malformed headers are ignored (RFC 9110 allows a server to
    ignore Range); a well-formed range that starts past the end is unsatisfiable.
    """
    if not header:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if not first:  # suffix range: the last N bytes
            length = int(last)
            if length <= 0:
                raise _Unsatisfiable
            return max(0, size - length), size - 1
        start = int(first)
        end = int(last) if last else None
    except ValueError:
        return None
    if start < 0 or (end is not None and end < start):
        return None  # syntactically invalid: ignored
    if start >= size:
        raise _Unsatisfiable
    return start, size - 1 if end is None else min(end, size - 1)


def _chunks(handle: BinaryIO, start: int, length: int) -> Iterator[bytes]:
    with handle:
        handle.seek(start)
        remaining = length
        while remaining > 0:
            chunk = handle.read(min(CHUNK, remaining))
            if not chunk:
                break  # the file shrank under us; the client sees a short body and retries
            remaining -= len(chunk)
            yield chunk


@router.get(
    "/{name}/versions/{version}/bundle",
    dependencies=[DEVICE_OR_VIEWER],
    summary="Download a bundle (supports Range)",
    response_class=Response,
    responses={200: {"content": {"application/x-tar": {}}}, 206: {"description": "Partial content"}},
)
@router.head("/{name}/versions/{version}/bundle", dependencies=[DEVICE_OR_VIEWER], include_in_schema=False,
             response_class=Response)
def download_bundle(name: str, version: str, request: Request, ctx: Ctx) -> Response:
    # A short session of its own: no transaction may stay open while a large body streams.
    with ctx.session_factory() as session:
        mv = registry.get_version(session, name, version)
        key, sha256, size = mv.bundle_key, mv.sha256, mv.size
        session.commit()
    if ctx.artifacts.local_path(key) is None:
        return RedirectResponse(ctx.artifacts.download_url(key, ctx.settings.public_url), status_code=307)
    etag = f'"{sha256}"'
    headers = {"Accept-Ranges": "bytes", "ETag": etag, "Content-Type": "application/x-tar"}
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() != etag:
        range_header = None  # the client's partial copy is of other bytes: send them all
    try:
        span = parse_range(range_header, size)
    except _Unsatisfiable:
        return error_response(
            416,
            "range_not_satisfiable",
            f"range {range_header!r} is outside the bundle's {size} bytes",
            {"size": size},
            headers={"Content-Range": f"bytes */{size}", **headers},
        )
    start, end = span if span is not None else (0, size - 1)
    status = 206 if span is not None else 200
    length = end - start + 1
    headers["Content-Length"] = str(length)
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    try:
        handle = ctx.artifacts.open(key)
    except NotFoundError as exc:
        raise NotFoundError(f"the bytes of {name}:{version} are missing from the artifact store") from exc
    if not handle.seekable():
        with contextlib.suppress(Exception):
            handle.close()
        raise NotFoundError(f"the artifact store cannot serve {name}:{version} directly")
    return StreamingResponse(_chunks(handle, start, length), status_code=status, headers=headers)
