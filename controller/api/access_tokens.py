"""Operator API tokens and `whoami`. The plaintext token is returned once, by the create call only.

Making, listing and revoking tokens needs the admin role; `whoami` answers any valid token.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from fleet.controller import access
from fleet.controller.api.deps import ADMIN, CurrentPrincipal, SessionDep
from fleet.controller.models import ApiToken

router = APIRouter(prefix="/api/v1/access-tokens", tags=["access"])
whoami_router = APIRouter(prefix="/api/v1", tags=["access"])

Role = Literal["viewer", "operator", "admin"]


class AccessTokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=access.NAME_RE.pattern)
    role: Role
    ttl_seconds: int | None = Field(default=None, ge=1, le=access.MAX_TTL_S,
                                    description="Lifetime; without it the token lasts until revoked.")


class AccessTokenPublic(BaseModel):
    id: str
    name: str
    role: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    active: bool = Field(description="Neither revoked nor expired.")

    @classmethod
    def from_row(cls, row: ApiToken) -> AccessTokenPublic:
        now = datetime.now(UTC)
        return cls(
            id=row.id, name=row.name, role=row.role, created_at=row.created_at, expires_at=row.expires_at,
            revoked_at=row.revoked_at, last_used_at=row.last_used_at,
            active=row.revoked_at is None and (row.expires_at is None or row.expires_at > now),
        )


class AccessTokenCreated(AccessTokenPublic):
    token: str = Field(description="The bearer token. Shown only in this response.")


class WhoAmI(BaseModel):
    kind: str
    id: str
    name: str
    role: str | None


@router.post("", status_code=201, dependencies=[ADMIN], summary="Create an API token (shown once)")
def create_access_token(body: AccessTokenCreate, session: SessionDep) -> AccessTokenCreated:
    plaintext, row = access.create_token(session, name=body.name, role=body.role, ttl_s=body.ttl_seconds)
    return AccessTokenCreated(**AccessTokenPublic.from_row(row).model_dump(), token=plaintext)


@router.get("", dependencies=[ADMIN], summary="List API tokens (never their secrets or hashes)")
def list_access_tokens(session: SessionDep) -> list[AccessTokenPublic]:
    return [AccessTokenPublic.from_row(r) for r in access.list_tokens(session)]


@router.post("/{token_id}/revoke", dependencies=[ADMIN], summary="Revoke an API token: it is refused from now on")
def revoke_access_token(token_id: str, session: SessionDep) -> AccessTokenPublic:
    return AccessTokenPublic.from_row(access.revoke_token(session, token_id))


@whoami_router.get("/whoami", summary="Who the presented token is: id, name and role")
def whoami(principal: CurrentPrincipal) -> WhoAmI:
    return WhoAmI(kind=principal.kind, id=principal.id, name=principal.name, role=principal.role)
