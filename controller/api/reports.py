"""Rollout report routes: the evidence behind a rollout as an HTML page and as JSON time series.

The data comes from `fleet.controller.report.collect`, the page from its pure `render_html`;
this router only maps them to HTTP.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from fleet.controller.api.deps import VIEWER, SessionDep
from fleet.controller.report import collect, render_html

router = APIRouter(prefix="/api/v1/rollouts", tags=["rollouts"])


@router.get("/{name}/timeseries", dependencies=[VIEWER],
            summary="A rollout's merged latency, agreement over time and drift (JSON)")
def rollout_timeseries(name: str, session: SessionDep, group_by: str | None = None) -> dict[str, Any]:
    return collect(session, name, group_by=group_by)


@router.get("/{name}/report", response_class=HTMLResponse, dependencies=[VIEWER],
            summary="A self-contained HTML report of a rollout (inline SVG, no scripts)")
def rollout_report(name: str, session: SessionDep, group_by: str | None = None) -> HTMLResponse:
    return HTMLResponse(render_html(collect(session, name, group_by=group_by)))
