"""Rollout routes: create, list, inspect, and the operator's pause/resume/promote/abort.

The rules live in `fleet.controller.rollouts`; this router only parses, commits, and asks the
reconciler to act on the change at once (`ctx.kick()`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from fleet.controller.api.deps import OPERATOR, VIEWER, Ctx, SessionDep
from fleet.controller.api.schemas import RolloutAction, RolloutCreate
from fleet.core.errors import InvalidInputError

router = APIRouter(prefix="/api/v1/rollouts", tags=["rollouts"])

ACTIONS = ("pause", "resume", "promote", "abort")


@router.post("", status_code=201, dependencies=[OPERATOR], summary="Start a rollout of MODEL:VERSION")
def create_rollout(body: RolloutCreate, session: SessionDep, ctx: Ctx) -> dict[str, Any]:
    from fleet.controller import rollouts

    result = rollouts.create_rollout(
        ctx,
        session,
        model=body.model,
        version=body.version,
        steps=body.steps,
        selector=body.selector,
        gate=body.gate,
        shadow_sample_rate=body.shadow_sample_rate,
        name=body.name,
    )
    session.commit()
    ctx.kick()
    return result


@router.get("", dependencies=[VIEWER], summary="List rollouts")
def list_rollouts(
    session: SessionDep, model: str | None = None, phase: str | None = None
) -> list[dict[str, Any]]:
    from fleet.controller import rollouts

    return rollouts.list_rollouts(session, model=model, phase=phase)


@router.get("/{name}", dependencies=[VIEWER], summary="Show a rollout: steps, cohorts, devices, decisions")
def get_rollout(name: str, session: SessionDep) -> dict[str, Any]:
    from fleet.controller import rollouts

    return rollouts.rollout_detail(session, name)


@router.post("/{name}/{action}", dependencies=[OPERATOR], summary="pause | resume | promote | abort")
def act_on_rollout(
    name: str, action: str, session: SessionDep, ctx: Ctx, body: RolloutAction | None = None
) -> dict[str, Any]:
    from fleet.controller import rollouts

    if action not in ACTIONS:
        raise InvalidInputError(f"unknown rollout action {action!r}: use one of {', '.join(ACTIONS)}")
    handler = getattr(rollouts, f"{action}_rollout")
    result: dict[str, Any] = handler(ctx, session, name, (body.reason if body else "") or "")
    session.commit()
    ctx.kick()
    return result
