"""Signing metadata: release key files, the root -> targets -> snapshot -> timestamp chain, and the
repository's refusals (wrong key, out-of-order versions, expiry, root rotation).

The chain is checked with python-tuf's own client-side verifier (`TrustedMetadataSet`), the same
code `tuf.ngclient.Updater` runs on the devices.
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import RepositoryError, UnsignedMetadataError
from tuf.api.metadata import Metadata, Root
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet
from tuf.ngclient.config import EnvelopeType

from fleet.controller.tuf_store import FileMetadataStore
from fleet.core.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    SignatureError,
)
from fleet.core.manifest import Manifest
from fleet.core.trust import (
    MemoryMetadataStore,
    OnlineRepository,
    add_target,
    check_root_signatures,
    generate_key_pair,
    load_or_create_signer,
    load_public_key,
    load_signer,
    make_root,
    min_release_from_custom,
    new_root,
    next_root,
    policy_document,
    public_key_pem,
    resign_targets,
    root_signatures,
    rotate_root,
    set_min_release,
    sign_root,
    signed_min_release,
    target_custom,
    target_path_for,
    verify_targets,
)

SHA_A = "a" * 64
SHA_B = "b" * 64


def signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


class World:
    """A release key, an online key, a root, and a repository on a memory store."""

    def __init__(self) -> None:
        self.release = signer()
        self.online = signer()
        self.root = new_root(self.release, self.release.public_key, self.online.public_key)
        self.store = MemoryMetadataStore()
        self.repo = OnlineRepository(self.online, self.store)
        self.repo.install_root(self.root)

    def push(self, name: str, version: str, sha: str = SHA_A, length: int = 100) -> bytes:
        current = self.store.get("targets.json")
        targets = add_target(
            current,
            self.root,
            self.release,
            target_path=target_path_for(name, version),
            length=length,
            sha256=sha,
            custom={"model": name, "version": version},
        )
        self.repo.accept_targets(targets)
        return targets

    def client_view(self) -> TrustedMetadataSet:
        """What a device would trust after a full refresh, verified by python-tuf itself."""
        trusted = TrustedMetadataSet(self.repo.get("1.root.json"), EnvelopeType.METADATA)
        version = 2
        while (data := self.store.get(f"{version}.root.json")) is not None:
            trusted.update_root(data)
            version += 1
        trusted.update_timestamp(self.repo.get("timestamp.json"))
        trusted.update_snapshot(self.repo.get("snapshot.json"))
        trusted.update_targets(self.repo.get("targets.json"))
        return trusted


# -- key files ------------------------------------------------------------------------------------


def test_key_pair_files_and_permissions(tmp_path: Path) -> None:
    keyid = generate_key_pair(tmp_path / "keys" / "release.key")
    private, public = tmp_path / "keys" / "release.key", tmp_path / "keys" / "release.pub"
    assert private.stat().st_mode & 0o777 == 0o600
    assert public.exists()
    assert load_public_key(public).keyid == keyid
    assert load_signer(private).public_key.keyid == keyid
    assert load_public_key(public_key_pem(load_public_key(public)).decode()).keyid == keyid

    with pytest.raises(ConflictError, match="refusing to overwrite"):
        generate_key_pair(private)
    assert load_public_key(public).keyid == keyid  # untouched
    assert generate_key_pair(private, overwrite=True) != keyid
    assert private.stat().st_mode & 0o777 == 0o600


def test_loose_private_key_permissions_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "release.key"
    generate_key_pair(path)
    os.chmod(path, 0o644)
    with pytest.raises(PermissionDeniedError, match="chmod 600"):
        load_signer(path)
    with pytest.raises(NotFoundError, match="fleet keys init"):
        load_signer(tmp_path / "missing.key")
    with pytest.raises(InvalidInputError, match="not a PEM public key"):
        load_public_key(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")


# -- the chain ------------------------------------------------------------------------------------


def test_root_targets_snapshot_timestamp_chain_verifies() -> None:
    world = World()
    world.push("detector", "v1", SHA_A, 1234)
    world.push("detector", "v2", SHA_B, 999)
    trusted = world.client_view()
    targets = trusted.targets
    assert targets.version == 2
    info = targets.targets["detector/v1/bundle.tar"]  # earlier targets are kept
    assert (info.length, info.hashes, info.custom) == (
        1234,
        {"sha256": SHA_A},
        {"model": "detector", "version": "v1"},
    )
    assert world.repo.target_info("detector/v2/bundle.tar").length == 999
    assert world.repo.target_info("detector/v3/bundle.tar") is None
    assert trusted.root.roles["targets"].keyids == [world.release.public_key.keyid]
    assert trusted.root.roles["timestamp"].keyids == [world.online.public_key.keyid]


def test_targets_signed_by_a_wrong_key_are_refused() -> None:
    world = World()
    intruder = signer()
    # The intruder holds a root naming its own key; the repository's root does not.
    fake_root = new_root(intruder, intruder.public_key, world.online.public_key)
    forged = add_target(
        None, fake_root, intruder, target_path="evil/1/bundle.tar", length=1, sha256=SHA_A, custom={}
    )
    with pytest.raises(SignatureError, match="not signed by the targets key"):
        world.repo.accept_targets(forged)
    with pytest.raises(SignatureError, match="not a targets key"):
        add_target(
            None, world.root, intruder, target_path="evil/1/bundle.tar", length=1, sha256=SHA_A, custom={}
        )
    # The online key may sign snapshot and timestamp, never targets.
    with pytest.raises(SignatureError, match="not a targets key"):
        add_target(
            None, world.root, world.online, target_path="evil/1/bundle.tar", length=1, sha256=SHA_A, custom={}
        )
    with pytest.raises(SignatureError, match="not signed"):
        verify_targets(forged, world.root)
    assert world.store.get("targets.json") is None


def test_targets_version_must_be_current_plus_one() -> None:
    world = World()
    base = world.push("detector", "v1")
    # Two operators sign on top of the same v1; the second to arrive must re-sign on top of the first.
    first = add_target(
        base,
        world.root,
        world.release,
        target_path="detector/v2/bundle.tar",
        length=5,
        sha256=SHA_B,
        custom={},
    )
    second = add_target(
        base,
        world.root,
        world.release,
        target_path="detector/v3/bundle.tar",
        length=5,
        sha256=SHA_B,
        custom={},
    )
    world.repo.accept_targets(first)
    with pytest.raises(ConflictError, match="does not follow the published v2") as exc:
        world.repo.accept_targets(second)
    assert exc.value.details["expected_version"] == 3
    with pytest.raises(ConflictError):
        world.repo.accept_targets(base)  # replaying an old one
    assert world.repo.target_info("detector/v3/bundle.tar") is None


def test_signed_bundle_paths_are_immutable() -> None:
    world = World()
    base = world.push("detector", "v1", SHA_A)
    with pytest.raises(ConflictError, match="immutable"):
        add_target(
            base,
            world.root,
            world.release,
            target_path="detector/v1/bundle.tar",
            length=100,
            sha256=SHA_B,
            custom={},
        )


def test_expired_targets_are_refused() -> None:
    world = World()
    stale = add_target(
        None,
        world.root,
        world.release,
        target_path="m/1/bundle.tar",
        length=1,
        sha256=SHA_A,
        custom={},
        expires_days=1,
        now=datetime.now(timezone.utc) - timedelta(days=2),
    )
    with pytest.raises(SignatureError, match="expired"):
        world.repo.accept_targets(stale)


def test_refresh_resigns_only_when_needed() -> None:
    world = World()
    now = datetime.now(timezone.utc)
    assert world.repo.refresh(now) is False  # nothing published before the first push
    world.push("detector", "v1")
    snapshot, timestamp = world.store.get("snapshot.json"), world.store.get("timestamp.json")
    assert world.repo.refresh(now) is False
    assert world.store.get("timestamp.json") == timestamp

    later = now + timedelta(hours=13)  # past half of the 24 h timestamp lifetime
    assert world.repo.refresh(later) is True
    assert world.store.get("snapshot.json") == snapshot  # the snapshot is still far from expiry
    trusted = world.client_view()
    assert trusted.timestamp.version == 2
    assert trusted.snapshot.version == 1

    assert world.repo.refresh(now + timedelta(days=5)) is True  # snapshot (7 days) near expiry too
    trusted = world.client_view()
    assert (trusted.timestamp.version, trusted.snapshot.version) == (3, 2)


def test_tampered_snapshot_is_caught_by_the_client() -> None:
    world = World()
    world.push("detector", "v1")
    snapshot = world.store.get("snapshot.json")
    assert snapshot is not None
    world.store.put("snapshot.json", snapshot.replace(b'"version": 1', b'"version": 7', 1))
    with pytest.raises(RepositoryError, match=r"hash|length"):
        world.client_view()


# -- root installation and rotation ---------------------------------------------------------------


def test_root_must_name_this_controllers_online_key() -> None:
    release, online, other = signer(), signer(), signer()
    root = new_root(release, release.public_key, other.public_key)
    repo = OnlineRepository(online, MemoryMetadataStore())
    with pytest.raises(InvalidInputError, match="online key"):
        repo.install_root(root)
    with pytest.raises(NotFoundError, match="no root metadata installed"):
        repo.root()
    with pytest.raises(InvalidInputError, match="must differ"):
        new_root(release, release.public_key, release.public_key)


def test_root_rotation_needs_old_and_new_keys() -> None:
    world = World()
    world.push("detector", "v1")
    assert world.repo.install_root(world.root).version == 1  # re-installing is a no-op

    new_release = signer()
    rotated = rotate_root(world.root, [world.release, new_release], release_public=new_release.public_key)
    # Signed by the new key alone: the old root never vouched for it.
    only_new = rotate_root(world.root, [world.release, new_release], release_public=new_release.public_key)
    md = Metadata[Root].from_bytes(only_new)
    md.signatures.pop(world.release.public_key.keyid)
    with pytest.raises(SignatureError, match="by the keys of root v1"):
        world.repo.install_root(md.to_bytes())
    with pytest.raises(SignatureError):  # rotate_root itself refuses to produce it
        rotate_root(world.root, [new_release], release_public=new_release.public_key)

    assert world.repo.install_root(rotated).version == 2
    assert world.repo.get("2.root.json") == rotated == world.repo.get("root.json")
    with pytest.raises(ConflictError, match="rollback"):
        world.repo.install_root(world.root)

    # The published targets were signed by the old key: the new root does not trust them any more.
    with pytest.raises(UnsignedMetadataError):
        world.client_view()
    old_targets = world.repo.get("targets.json")
    with pytest.raises(SignatureError, match="not a targets key"):
        resign_targets(old_targets, world.root, rotated, world.release)
    world.repo.accept_targets(resign_targets(old_targets, world.root, rotated, new_release))
    assert world.client_view().targets.version == 2

    # The new release key signs targets now; the old one does not any more.
    world.root = rotated
    with pytest.raises(SignatureError, match="not a targets key"):
        world.push("detector", "v2")
    world.release = new_release
    world.push("detector", "v2")
    trusted = world.client_view()
    assert trusted.root.version == 2
    assert set(trusted.targets.targets) == {"detector/v1/bundle.tar", "detector/v2/bundle.tar"}


def test_online_key_rotation_resigns_snapshot_and_timestamp() -> None:
    world = World()
    world.push("detector", "v1")
    new_online = signer()
    rotated = rotate_root(world.root, [world.release], online_public=new_online.public_key)
    repo = OnlineRepository(new_online, world.store)  # the controller restarted with its new key
    repo.install_root(rotated)
    world.repo = repo
    with pytest.raises(UnsignedMetadataError):
        world.client_view()  # the old online key's timestamp no longer verifies
    assert repo.refresh() is True
    assert world.client_view().timestamp.version == 2


def test_root_versions_install_in_order() -> None:
    world = World()
    v2 = rotate_root(world.root, [world.release])
    v3 = rotate_root(v2, [world.release])
    with pytest.raises(ConflictError, match="skips versions"):
        world.repo.install_root(v3)
    world.repo.install_root(v2)
    world.repo.install_root(v3)
    assert world.repo.root().version == 3
    assert world.repo.get("2.root.json") == v2


def test_only_published_names_are_served() -> None:
    world = World()
    for name in ("../root.json", "keys.json", "0.root.json", "root.json/x"):
        with pytest.raises(NotFoundError):
            world.repo.get(name)
    with pytest.raises(NotFoundError, match="not published"):
        world.repo.get("timestamp.json")


def test_file_store_is_atomic_and_confined(tmp_path: Path) -> None:
    scratch = FileMetadataStore(tmp_path / "scratch")
    assert scratch.get("root.json") is None
    scratch.put("root.json", b"one")
    scratch.put("root.json", b"two")
    assert scratch.get("root.json") == b"two"
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir()) == ["root.json"]  # no temporaries left
    for bad in ("../x.json", "a/b.json", ".hidden", ""):
        with pytest.raises(InvalidInputError):
            scratch.put(bad, b"x")
    # A repository on the file store survives a restart.
    store = FileMetadataStore(tmp_path / "tuf")
    world = World()
    repo = OnlineRepository(world.online, store)
    repo.install_root(world.root)
    repo.accept_targets(
        add_target(
            None, world.root, world.release, target_path="m/1/bundle.tar", length=3, sha256=SHA_A, custom={}
        )
    )
    again = OnlineRepository(world.online, FileMetadataStore(tmp_path / "tuf"))
    assert again.target_info("m/1/bundle.tar") is not None
    assert again.refresh() is False


def test_online_key_is_created_once_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "controller" / "online.key"
    first = load_or_create_signer(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_signer(path).public_key.keyid == first.public_key.keyid


def test_target_custom_carries_the_signed_bundle_facts() -> None:
    manifest = Manifest.from_dict(
        {
            "schema": "fleet.bundle/v1",
            "name": "detector",
            "version": "v3",
            "task": "detection",
            "release": 7,
            "inputs": [{"name": "x", "dtype": "float32", "shape": [1]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [1]}],
            "variants": [
                {"hardware": "any", "file": "model.onnx", "sha256": SHA_A, "size": 1},
                {"hardware": "jetson", "file": "model-jetson.onnx", "sha256": SHA_B, "size": 2},
            ],
        }
    )
    assert target_custom(manifest) == {
        "model": "detector",
        "version": "v3",
        "release": 7,
        "task": "detection",
        "hardware": ["any", "jetson"],
    }


# -- several keys per role, thresholds ---------------------------------------------------------------


class ThresholdWorld(World):
    """Root 2-of-3, targets 1-of-2, online key for snapshot and timestamp."""

    def __init__(self, targets_threshold: int = 1) -> None:
        self.roots = [signer() for _ in range(3)]
        self.targets_keys = [signer() for _ in range(2)]
        self.online = signer()
        self.release = self.targets_keys[0]
        self.signers_for_targets: list[CryptoSigner] = self.targets_keys[:targets_threshold]
        self.root = make_root(
            root_keys=[s.public_key for s in self.roots], root_threshold=2,
            targets_keys=[s.public_key for s in self.targets_keys], targets_threshold=targets_threshold,
            online_public=self.online.public_key, signers=self.roots[:2],
        )
        self.store = MemoryMetadataStore()
        self.repo = OnlineRepository(self.online, self.store)
        self.repo.install_root(self.root)

    def push(self, name: str, version: str, sha: str = SHA_A, length: int = 100) -> bytes:
        targets = add_target(
            self.store.get("targets.json"), self.root, self.signers_for_targets,
            target_path=target_path_for(name, version), length=length, sha256=sha,
            custom={"model": name, "version": version},
        )
        self.repo.accept_targets(targets)
        return targets


def test_root_with_thresholds_is_made_checked_and_trusted_by_the_client() -> None:
    world = ThresholdWorld()
    root = Metadata[Root].from_bytes(world.root).signed
    assert root.roles["root"].threshold == 2 and len(root.roles["root"].keyids) == 3
    assert root.roles["targets"].threshold == 1 and len(root.roles["targets"].keyids) == 2
    assert root.roles["timestamp"].keyids == root.roles["snapshot"].keyids == [world.online.public_key.keyid]
    world.push("detector", "v1")
    # Either targets key alone meets 1-of-2.
    world.signers_for_targets = [world.targets_keys[1]]
    world.push("detector", "v2")
    assert set(world.client_view().targets.targets) == {"detector/v1/bundle.tar", "detector/v2/bundle.tar"}


def test_an_under_signed_first_root_is_refused_unless_asked_for() -> None:
    roots = [signer() for _ in range(3)]
    online = signer()
    kwargs = {"root_keys": [s.public_key for s in roots], "root_threshold": 2,
              "targets_keys": [roots[0].public_key], "online_public": online.public_key}
    with pytest.raises(SignatureError, match="only 1 of its own 2 required root-key signatures"):
        make_root(signers=roots[:1], **kwargs)  # type: ignore[arg-type]
    crafted = make_root(signers=roots[:1], require_threshold=False, **kwargs)  # type: ignore[arg-type]
    status = root_signatures(crafted, None)
    assert not status.ok and status.signed_by == (roots[0].public_key.keyid,) and status.threshold == 2
    with pytest.raises(SignatureError):
        OnlineRepository(online, MemoryMetadataStore()).install_root(crafted)
    # A second signature, added later, completes it.
    completed = sign_root(crafted, [roots[2]])
    assert check_root_signatures(completed, None).ok
    assert OnlineRepository(online, MemoryMetadataStore()).install_root(completed).version == 1


@pytest.mark.parametrize(("change", "message"), [
    ({"root_threshold": 4}, "root threshold 4 must be between 1 and the number of root keys"),
    ({"targets_threshold": 0}, "targets threshold 0 must be between 1"),
    ({"online_in_targets": True}, "must not be a targets key"),
])
def test_structurally_wrong_roots_are_refused(change: dict[str, object], message: str) -> None:
    roots = [signer() for _ in range(3)]
    online = signer()
    targets = [roots[0].public_key] + ([online.public_key] if change.get("online_in_targets") else [])
    with pytest.raises(InvalidInputError, match=message):
        make_root(root_keys=[s.public_key for s in roots], root_threshold=int(change.get("root_threshold", 2)),
                  targets_keys=targets, targets_threshold=int(change.get("targets_threshold", 1)),
                  online_public=online.public_key, signers=roots)


def test_next_root_adds_revokes_and_sets_thresholds() -> None:
    world = ThresholdWorld()
    world.push("detector", "v1")
    extra = signer()
    # Add a third targets key and require 2 of 3.
    v2 = next_root(world.root, world.roots[:2], add_keys={"targets": [extra.public_key]},
                   thresholds={"targets": 2})
    root = Metadata[Root].from_bytes(v2).signed
    assert root.version == 2 and root.roles["targets"].threshold == 2
    assert extra.public_key.keyid in root.roles["targets"].keyids
    world.repo.install_root(v2)
    # The published targets carry one signature: below the new threshold, devices refuse them.
    with pytest.raises(UnsignedMetadataError):
        world.client_view()
    with pytest.raises(SignatureError, match="need 2 signatures"):
        resign_targets(world.store.get("targets.json") or b"", world.root, v2, [world.targets_keys[0]])
    world.repo.accept_targets(resign_targets(world.store.get("targets.json") or b"", world.root, v2,
                                             [world.targets_keys[0], extra]))
    assert world.client_view().targets.version == 2
    world.root = v2

    # Revoke a targets key: it can no longer sign, even together with another one.
    revoked = world.targets_keys[1]
    v3 = next_root(world.root, world.roots[:2], revoke_keys={"targets": [revoked.public_key.keyid]})
    world.repo.install_root(v3)
    with pytest.raises(SignatureError, match="is not a targets key of root v3"):
        add_target(world.store.get("targets.json"), v3, [revoked, extra], target_path="detector/v9/bundle.tar",
                   length=1, sha256=SHA_B, custom={})
    with pytest.raises(NotFoundError, match="is not a targets key of root v3"):
        next_root(v3, world.roots[:2], revoke_keys={"targets": [revoked.public_key.keyid]})
    with pytest.raises(InvalidInputError, match="use 'root' or 'targets'"):
        next_root(v3, world.roots[:2], thresholds={"timestamp": 1})
    with pytest.raises(InvalidInputError, match="targets threshold 3 must be between 1 and the number"):
        next_root(v3, world.roots[:2], thresholds={"targets": 3})


def test_root_rotation_needs_both_thresholds() -> None:
    world = ThresholdWorld()
    new_roots = [signer() for _ in range(2)]
    old_ids = [s.public_key.keyid for s in world.roots]
    changes = {"add_keys": {"root": [s.public_key for s in new_roots]}, "revoke_keys": {"root": old_ids},
               "thresholds": {"root": 2}}
    # Old keys only: the new root's own threshold is not met.
    with pytest.raises(SignatureError, match="only 0 of its own 2 required"):
        next_root(world.root, world.roots, **changes)  # type: ignore[arg-type]
    # New keys only: the previous root never vouched for it.
    with pytest.raises(SignatureError, match="0 of the 2 required signatures by root v1's root keys"):
        next_root(world.root, new_roots, **changes)  # type: ignore[arg-type]
    # One old key is not enough either.
    with pytest.raises(SignatureError, match="1 of the 2 required signatures by root v1"):
        next_root(world.root, [*new_roots, world.roots[0]], **changes)  # type: ignore[arg-type]
    only_new = next_root(world.root, new_roots, require_threshold=False, **changes)  # type: ignore[arg-type]
    status = root_signatures(only_new, world.root)
    assert status.previous_version == 1 and status.previous_signed_by == () and not status.ok
    with pytest.raises(SignatureError, match="by the keys of root v1"):
        world.repo.install_root(only_new)
    only_old = next_root(world.root, world.roots, require_threshold=False, **changes)  # type: ignore[arg-type]
    with pytest.raises(SignatureError):
        world.repo.install_root(only_old)

    good = next_root(world.root, [*new_roots, *world.roots[1:]], **changes)  # type: ignore[arg-type]
    assert world.repo.install_root(good).version == 2
    # The next rotation is vouched for by the new keys alone.
    v3 = next_root(good, new_roots, thresholds={"targets": 2})
    assert world.repo.install_root(v3).version == 3


def test_targets_below_threshold_are_refused_everywhere() -> None:
    world = ThresholdWorld(targets_threshold=2)
    with pytest.raises(SignatureError, match="need 2 signatures by targets keys of root v1, 1 given"):
        add_target(None, world.root, [world.targets_keys[0]], target_path="detector/v1/bundle.tar",
                   length=1, sha256=SHA_A, custom={})
    both = add_target(None, world.root, world.targets_keys, target_path="detector/v1/bundle.tar",
                      length=1, sha256=SHA_A, custom={})
    md = Metadata.from_bytes(both)
    md.signatures.pop(world.targets_keys[1].public_key.keyid)
    with pytest.raises(SignatureError, match="not signed by the targets key"):
        world.repo.accept_targets(md.to_bytes())
    world.repo.accept_targets(both)
    assert world.client_view().targets.version == 1


# -- signed release policy ----------------------------------------------------------------------------


def test_policy_target_signs_the_minimum_release() -> None:
    world = World()
    world.push("detector", "v1")
    assert world.repo.min_release("detector") == 0
    targets = set_min_release(world.store.get("targets.json"), world.root, world.release, model="detector",
                              min_release=3)
    world.repo.accept_targets(targets)
    entry = world.client_view().targets.targets["detector/policy.json"]
    document = policy_document("detector", 3)
    assert entry.length == len(document) and entry.hashes == {"sha256": hashlib.sha256(document).hexdigest()}
    assert entry.custom == {"model": "detector", "min_release": 3}
    assert world.repo.min_release("detector") == 3 and world.repo.min_release("other") == 0
    assert signed_min_release(world.repo.targets(), "detector") == 3
    # A policy may be re-signed with a new minimum (bundles may not be re-signed).
    world.repo.accept_targets(set_min_release(world.store.get("targets.json"), world.root, world.release,
                                              model="detector", min_release=5))
    assert world.repo.min_release("detector") == 5
    with pytest.raises(ConflictError, match="immutable"):
        world.push("detector", "v1", sha=SHA_B)
    with pytest.raises(InvalidInputError, match="non-negative"):
        set_min_release(None, world.root, world.release, model="detector", min_release=-1)
    with pytest.raises(SignatureError, match="is not a targets key"):
        set_min_release(world.store.get("targets.json"), world.root, world.online, model="detector", min_release=9)


@pytest.mark.parametrize(("custom", "expected"), [
    (None, 0),
    ({"model": "detector", "min_release": 4}, 4),
    ({"model": "other", "min_release": 4}, "names model 'other'"),
    ({"model": "detector"}, "no valid min_release"),
    ({"model": "detector", "min_release": True}, "no valid min_release"),
    ({"model": "detector", "min_release": -2}, "no valid min_release"),
])
def test_policy_custom_fields_are_checked(custom: dict[str, object] | None, expected: int | str) -> None:
    if isinstance(expected, int):
        assert min_release_from_custom(custom, "detector") == expected
    else:
        with pytest.raises(SignatureError, match=expected):
            min_release_from_custom(custom, "detector")
