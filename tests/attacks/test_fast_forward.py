"""The fast-forward attack and its recovery by key rotation, against the device's real metadata client.

Given a controller repository published over a real local HTTP server and a device client
(`TrustedMetadataClient` on python-tuf's ngclient) provisioned with root v1, an attacker who stole
the online key signs a timestamp with a huge version number. The device cannot tell it from a real
one and trusts it, so every genuine timestamp afterwards looks like a rollback and the device is
frozen. The operators' answer is to rotate the online key with a new root (signed by the release
key): the device must then drop what the old key signed, accept the controller's genuine lower
versions again, and refuse anything the old key signs from then on.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from integration.test_trust_http import SHA_V1, SHA_V2, Controller, client_for
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, MetaFile, Timestamp
from tuf.api.serialization.json import JSONSerializer

from fleet.core.errors import SignatureError
from fleet.core.trust import OnlineRepository, rotate_root


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    ctl = Controller(tmp_path / "controller-tuf")
    yield ctl
    ctl.close()


def forged_timestamp(controller: Controller, signer: Signer, version: int) -> bytes:
    """A timestamp for the controller's current snapshot, with the attacker's version number."""
    genuine = Metadata[Timestamp].from_bytes(controller.repo.get("timestamp.json")).signed
    snapshot = controller.repo.get("snapshot.json")
    meta = MetaFile(version=genuine.snapshot_meta.version, length=len(snapshot),
                    hashes=dict(genuine.snapshot_meta.hashes or {}))
    forged = Metadata(Timestamp(version=version, expires=datetime.now(timezone.utc) + timedelta(days=30),
                                snapshot_meta=meta))
    forged.sign(signer)
    return forged.to_bytes(JSONSerializer())


def serve_instead(controller: Controller, filename: str, body: bytes | None) -> None:
    """The attacker's mirror: answer `filename` with `body` (None: stop forging)."""
    original = getattr(controller.repo, "_genuine_get", controller.repo.get)

    def get(name: str) -> bytes:
        if body is not None and name == filename:
            return body
        return original(name)

    controller.repo._genuine_get = original  # type: ignore[attr-defined]
    controller.repo.get = get  # type: ignore[method-assign]


def test_fast_forward_with_a_stolen_online_key_is_undone_by_rotating_that_key(
    controller: Controller, tmp_path: Path
) -> None:
    """Attack: fast-forward after key rotation.

    A timestamp forged with the stolen online key at version 1,000,000 freezes the device; after the
    operators rotate the online key the device accepts the controller's genuine (lower) versions and
    sees new bundles again, while the old key's forgeries are refused as unsigned.
    """
    stolen = controller.online
    controller.push("detector", "v1", SHA_V1, 10)
    client = client_for(controller, tmp_path / "device", max_age_s=0)
    client.refresh()

    # The attacker's timestamp is valid under root v1: the device cannot tell and trusts it.
    serve_instead(controller, "timestamp.json", forged_timestamp(controller, stolen, 1_000_000))
    client.refresh()
    serve_instead(controller, "timestamp.json", None)

    # Frozen: the controller's real timestamp now looks like a rollback, so nothing new gets through.
    controller.push("detector", "v2", SHA_V2, 20)
    with pytest.raises(SignatureError) as frozen:
        client.refresh()
    assert frozen.value.details["reason"] == "rollback"

    # Recovery: the release key signs root v2 with a new online key; the controller re-signs with it.
    new_online = CryptoSigner.generate_ed25519()
    rotated = rotate_root(controller.root, [controller.release], online_public=new_online.public_key)
    controller.repo = OnlineRepository(new_online, controller.store)
    controller.repo.install_root(rotated)
    assert controller.repo.refresh() is True
    client.refresh()
    assert client.target_info("detector/v2/bundle.tar")[:2] == (20, SHA_V2)

    # The stolen key is worthless now: its fast-forwarded timestamp is refused as unsigned.
    serve_instead(controller, "timestamp.json", forged_timestamp(controller, stolen, 2_000_000))
    with pytest.raises(SignatureError) as refused:
        client.refresh()
    assert refused.value.details["reason"] == "unsigned"
    serve_instead(controller, "timestamp.json", None)
    client.refresh()
    with pytest.raises(SignatureError, match="no release-signed target"):
        client.target_info("detector/v3/bundle.tar")
