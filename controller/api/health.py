"""Liveness and readiness probes (Kubernetes): live = the process answers; ready = the DB answers."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from fleet.controller.api.deps import PUBLIC, Ctx
from fleet.controller.api.errors import error_response
from fleet.controller.api.schemas import Status

router = APIRouter(tags=["health"])


@router.get("/healthz", dependencies=[PUBLIC], summary="Liveness")
def healthz() -> Status:
    return Status(status="ok")


@router.get("/readyz", dependencies=[PUBLIC], summary="Readiness: the database is reachable", response_model=Status)
def readyz(ctx: Ctx) -> JSONResponse:
    try:
        with ctx.session_factory() as session:
            session.execute(text("SELECT 1"))
            session.commit()
    except Exception as exc:  # any failure means "not ready"; the probe must not raise
        return error_response(503, "unavailable", f"database not reachable: {type(exc).__name__}: {exc}")
    return JSONResponse({"status": "ok"})
