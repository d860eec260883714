"""Drift route: the fleet's drift per device, label group and model version.

The rules live in `fleet.controller.drift`; this router only parses the query. Defaults come from
the controller settings (`drift_psi_threshold`, `drift_min_samples`, `drift_window_s`), and a
request may override them for one query.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from fleet.controller import drift as drift_svc
from fleet.controller.api.deps import VIEWER, Ctx, SessionDep

router = APIRouter(prefix="/api/v1/drift", tags=["drift"])


@router.get("", dependencies=[VIEWER], summary="Drift of serving models per device, label group and version")
def get_drift(
    *,
    session: SessionDep,
    ctx: Ctx,
    model: str | None = None,
    version: str | None = None,
    group_by: Annotated[str | None, Query(description="Device label whose values form the groups.")] = None,
    since_s: Annotated[float | None, Query(gt=0, description="Seconds back from now (default: setting).")] = None,
    psi_threshold: Annotated[float | None, Query(gt=0)] = None,
    min_samples: Annotated[int | None, Query(ge=1)] = None,
) -> dict[str, Any]:
    """`{"devices": [...], "groups": [...], "versions": [...]}`; each entry has its features' PSI,
    KS and JS recomputed from merged counts, its sample count and a `drifting` flag."""
    policy = drift_svc.DriftPolicy.from_settings(
        ctx.settings, since_s=since_s, psi_threshold=psi_threshold, min_samples=min_samples
    )
    return drift_svc.drift_report(session, policy, model=model, version=version, group_by=group_by)
