"""Device routes: list with label selectors, inspect one device, decommission."""

from __future__ import annotations

from fastapi import APIRouter

from fleet.controller import devices as devices_svc
from fleet.controller.api.deps import ADMIN, VIEWER, Ctx, SessionDep
from fleet.controller.api.schemas import DeviceDetail, DevicePublic

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])


@router.get("", dependencies=[VIEWER], summary="List devices (optionally by label selector and connection)")
def list_devices(
    session: SessionDep,
    selector: str | None = None,
    connected: bool | None = None,
    include_decommissioned: bool = False,
) -> list[DevicePublic]:
    """`selector` is `key=value,key2=value2`; every term must match."""
    parsed = devices_svc.parse_selector(selector)
    rows = devices_svc.list_devices(
        session, parsed, connected=connected, include_decommissioned=include_decommissioned
    )
    return [DevicePublic.from_row(d) for d in rows]


@router.get("/{device_id}", dependencies=[VIEWER],
            summary="Show a device: labels, hardware, models, update state, events")
def get_device(device_id: str, session: SessionDep) -> DeviceDetail:
    device = devices_svc.get_device(session, device_id)
    return DeviceDetail.from_rows(device, devices_svc.recent_events(session, device_id))


@router.post("/{device_id}/decommission", dependencies=[ADMIN], summary="Revoke a device's identity")
def decommission(device_id: str, session: SessionDep, ctx: Ctx) -> DevicePublic:
    device = devices_svc.decommission_device(session, device_id)
    session.commit()
    # Let the reconciler drop it from rollouts, and its stream notice the change.
    ctx.on_desired_changed([device_id])
    ctx.kick()
    return DevicePublic.from_row(device)
