"""The device CA's certificate: what operators provision agents with (`--ca-cert`), public by nature."""

from __future__ import annotations

from fastapi import APIRouter, Response

from fleet.controller.api.deps import VIEWER, Ctx
from fleet.controller.pki import CA_CERT_NAME
from fleet.core.errors import NotFoundError

router = APIRouter(prefix="/api/v1/trust", tags=["trust"])


@router.get("/ca", dependencies=[VIEWER],
            summary="The controller's device CA certificate (PEM), for provisioning agents")
def device_ca(ctx: Ctx) -> Response:
    settings = ctx.settings
    path = settings.ca_cert_file or settings.tls_dir / CA_CERT_NAME
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(
            "the controller has no device CA yet: it is made when `fleet controller serve` starts"
        ) from None
    return Response(pem, media_type="application/x-pem-file")
