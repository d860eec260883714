"""Enrolment token routes. The plaintext token is returned once, by the create call only."""

from __future__ import annotations

from fastapi import APIRouter

from fleet.controller import devices as devices_svc
from fleet.controller.api.deps import ADMIN, VIEWER, SessionDep
from fleet.controller.api.schemas import (
    EnrollmentTokenCreate,
    EnrollmentTokenCreated,
    EnrollmentTokenPublic,
)

router = APIRouter(prefix="/api/v1/enrollment-tokens", tags=["enrolment"])


@router.post("", status_code=201, dependencies=[ADMIN], summary="Create a bootstrap token for enrolling devices")
def create_token(body: EnrollmentTokenCreate, session: SessionDep) -> EnrollmentTokenCreated:
    plaintext, token = devices_svc.create_enrollment_token(
        session, max_uses=body.max_uses, ttl_s=body.ttl_seconds, labels=body.labels, device_id=body.device_id
    )
    return EnrollmentTokenCreated(**EnrollmentTokenPublic.from_row(token).model_dump(), token=plaintext)


@router.get("", dependencies=[VIEWER], summary="List enrolment tokens (never their secrets)")
def list_tokens(session: SessionDep) -> list[EnrollmentTokenPublic]:
    return [EnrollmentTokenPublic.from_row(t) for t in devices_svc.list_enrollment_tokens(session)]


@router.post("/{token_id}/revoke", dependencies=[ADMIN], summary="Revoke a token: it enrols no more devices")
def revoke_token(token_id: str, session: SessionDep) -> EnrollmentTokenPublic:
    return EnrollmentTokenPublic.from_row(devices_svc.revoke_enrollment_token(session, token_id))
