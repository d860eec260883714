"""Signing metadata for bundles, on The Update Framework's metadata model (python-tuf `Metadata` API).

Rules this module enforces:

- Offline keys and an online key. The operator's keys (Ed25519) sign `root` and `targets`; they
  never leave the operator's machines. The root and targets roles each have their own keys and
  threshold (e.g. root 2-of-3, targets 1-of-2; the default is one `release` key, 1-of-1). The
  controller's **online key** signs only `snapshot` and `timestamp` (threshold 1), so a
  compromised controller can delay or freeze updates but cannot make a device accept a bundle
  that a threshold of targets keys did not sign. The online key never holds a root or targets role.
- `targets` lists every bundle as `NAME/VERSION/bundle.tar` with its length, SHA-256 and custom
  fields. A bundle path, once signed, keeps its bytes: re-signing it with another hash is refused.
- The repository accepts a `targets` only if the current root's targets keys signed it, it is not
  expired, and its version is exactly the current one + 1, so two concurrent pushes cannot
  silently overwrite each other: the second one is told to re-sign on top of the first.
- A new root is accepted only if it is signed by a threshold of its own root keys *and* of the
  previous root's (basic key rotation), and only in version order. `root_signatures` says how
  far a root is from that, so the operator's tools refuse to upload an under-signed one.
- Uptane-style release counters: each bundle's target carries `custom.release`; a per-model
  target `NAME/policy.json` (custom `{"model", "min_release"}`) signed by the targets keys sets
  the lowest release a device may install. Unlike bundles, a policy target may be re-signed
  with new content.

Everything here is pure (bytes in, bytes out) except the key-file helpers at the top and the
`MetadataStore` the repository writes through. Consistent snapshots are off in this version, so
the published names are `N.root.json`, `root.json`, `timestamp.json`, `snapshot.json` and
`targets.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.signer import CryptoSigner, Key, Signer, SSlibKey
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from fleet.core.atomic import write_bytes_atomic
from fleet.core.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    SignatureError,
)
from fleet.core.manifest import Manifest

ROOT, TARGETS, SNAPSHOT, TIMESTAMP = Root.type, Targets.type, Snapshot.type, Timestamp.type
PUBLISHED_NAME_RE = re.compile(r"^(?:[1-9][0-9]{0,9}\.root|root|timestamp|snapshot|targets)\.json$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
POLICY_FILE = "policy.json"
POLICY_PATH_RE = re.compile(r"^[^/]+/policy\.json$")
# Indented JSON: operators read these files; a few hundred extra bytes do not matter.
_SERIALIZER = JSONSerializer(compact=False)

S = TypeVar("S", Root, Targets, Snapshot, Timestamp)


# --------------------------------------------------------------------------------------------------
# Key files (the only file IO in this module)


def public_key_path(private_path: Path) -> Path:
    """Where the public half of a key pair lives: `<name>.pub` beside the private key."""
    private_path = Path(private_path)
    public = private_path.with_suffix(".pub")
    if public == private_path:
        raise InvalidInputError(f"private key path {private_path} must not end in .pub")
    return public


def generate_key_pair(private_path: Path, *, overwrite: bool = False) -> str:
    """Create an Ed25519 key pair; return its TUF key id.

    The private key is PKCS#8 PEM, created with mode 0600 from the first byte (never written
    world-readable and then tightened); the public key is `<name>.pub` (SubjectPublicKeyInfo PEM).
    """
    private_path = Path(private_path)
    public_path = public_key_path(private_path)
    if not overwrite:
        for path in (private_path, public_path):
            if path.exists() or path.is_symlink():
                raise ConflictError(
                    f"{path} already exists; refusing to overwrite a key (pass overwrite=True to replace it)"
                )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if overwrite:
        write_bytes_atomic(private_path, private_pem, 0o600)
    else:
        _create_file(private_path, private_pem, 0o600)
    try:
        if overwrite:
            write_bytes_atomic(public_path, public_pem, 0o644)
        else:
            _create_file(public_path, public_pem, 0o644)
    except BaseException:
        # Half a key pair is worse than none: the next attempt would refuse to overwrite it.
        if not overwrite:
            with contextlib.suppress(FileNotFoundError):
                private_path.unlink()
        raise
    return SSlibKey.from_crypto(key.public_key()).keyid


def _create_file(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except FileExistsError:
        raise ConflictError(f"{path} already exists; refusing to overwrite a key") from None
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), mode)  # the umask may have removed bits we asked for; never adds any
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def load_signer(private_path: Path) -> CryptoSigner:
    """Load an Ed25519 private key file as a signer.

    Refuses (like ssh does) a key file that group or others may read or write: a release key
    that other local users can copy is not a release key any more. Fix with `chmod 600 PATH`.
    """
    private_path = Path(private_path)
    try:
        info = private_path.stat()
    except FileNotFoundError:
        raise NotFoundError(
            f"private key {private_path} does not exist (create one with `fleet keys init`)"
        ) from None
    if os.name == "posix" and info.st_mode & 0o077:
        raise PermissionDeniedError(
            f"private key {private_path} is accessible by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run `chmod 600 {private_path}`"
        )
    data = private_path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise InvalidInputError(
            f"{private_path} is an encrypted key; only unencrypted PKCS#8 PEM is supported"
        ) from exc
    except ValueError as exc:
        raise InvalidInputError(f"{private_path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidInputError(
            f"{private_path} holds a {type(key).__name__}; release and online keys are Ed25519"
        )
    return CryptoSigner(key)


def load_or_create_signer(private_path: Path) -> CryptoSigner:
    """The controller's online key: loaded if present, else generated (0600) on first start."""
    private_path = Path(private_path)
    if not private_path.exists():
        with contextlib.suppress(ConflictError):  # another process created it first: load theirs
            generate_key_pair(private_path)
    return load_signer(private_path)


def load_public_key(path_or_pem: Path | str | bytes) -> Key:
    """A public key from a `.pub` file path or from PEM text itself."""
    if isinstance(path_or_pem, bytes):
        pem, where = path_or_pem, "the given PEM"
    elif isinstance(path_or_pem, str) and path_or_pem.lstrip().startswith("-----BEGIN"):
        pem, where = path_or_pem.encode(), "the given PEM"
    else:
        path = Path(path_or_pem)
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"public key file {path} does not exist") from None
        where = str(path)
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise InvalidInputError(f"{where} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidInputError(f"{where} holds a {type(key).__name__}; release and online keys are Ed25519")
    return SSlibKey.from_crypto(key)


def public_key_pem(key: Key) -> bytes:
    """PEM text of a public key (for showing to operators and provisioning)."""
    if not isinstance(key, SSlibKey):
        raise InvalidInputError(f"key {key.keyid} is not a local Ed25519 key")
    crypto_key = key._crypto_key()  # securesystemslib has no public accessor for this yet
    return crypto_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --------------------------------------------------------------------------------------------------
# Pure helpers


def target_path_for(name: str, version: str) -> str:
    """The name under which the release metadata signs a bundle."""
    return f"{name}/{version}/bundle.tar"


def target_custom(manifest: Manifest) -> dict[str, Any]:
    """The custom fields a bundle's target carries, signed with it."""
    return {
        "model": manifest.name,
        "version": manifest.version,
        "release": manifest.release,
        "task": manifest.task,
        "hardware": [v.hardware for v in manifest.variants],
    }


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc).replace(microsecond=0)
    if now.tzinfo is None:
        return now.replace(tzinfo=timezone.utc, microsecond=0)
    return now.astimezone(timezone.utc).replace(microsecond=0)


def _parse(data: bytes, signed_type: type[S], what: str) -> Metadata[S]:
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except DeserializationError as exc:
        raise SignatureError(f"{what} is not valid TUF metadata: {exc}") from exc
    if not isinstance(md.signed, signed_type):
        raise SignatureError(f"{what} is {md.signed.type} metadata, expected {signed_type.type}")
    return cast("Metadata[S]", md)


def _serialize(md: Metadata[Any]) -> bytes:
    return md.to_bytes(_SERIALIZER)


def _verify(delegator: Root, role: str, md: Metadata[Any], what: str) -> None:
    """Check a threshold of `role`'s keys in `delegator` signed `md`, with a message saying whose."""
    try:
        delegator.verify_delegate(role, md.signed_bytes, md.signatures)
    except UnsignedMetadataError as exc:
        expected = ", ".join(delegator.roles[role].keyids) or "none"
        got = ", ".join(md.signatures) or "no signatures"
        raise SignatureError(
            f"{what} is not signed by the {role} key(s) of root v{delegator.version} "
            f"({exc}; expected key ids {expected}; signed by {got})",
            reason="unsigned",
        ) from exc


def _check_not_expired(signed: Signed, what: str, now: datetime) -> None:
    if signed.is_expired(now):
        raise SignatureError(
            f"{what} expired at {signed.expires.isoformat()} (now {now.isoformat()})", reason="expired"
        )


def verify_root(root_bytes: bytes) -> Root:
    """Parse a root and check it is signed by a threshold of its own root keys."""
    md = _parse(root_bytes, Root, "root metadata")
    _verify(md.signed, ROOT, md, f"root v{md.signed.version}")
    return md.signed


def verify_targets(
    targets_bytes: bytes, root_bytes: bytes, *, now: datetime | None = None, check_expiry: bool = True
) -> Targets:
    """Parse a targets metadata and check the given root's targets keys signed it (and its expiry)."""
    root = verify_root(root_bytes)
    md = _parse(targets_bytes, Targets, "targets metadata")
    _verify(root, TARGETS, md, f"targets v{md.signed.version}")
    if check_expiry:
        _check_not_expired(md.signed, f"targets v{md.signed.version}", _now(now))
    return md.signed


def is_policy_path(path: str) -> bool:
    """Whether a target path names a per-model policy (`NAME/policy.json`), not a bundle."""
    return POLICY_PATH_RE.match(path) is not None


def _check_immutable(old: Targets, new: Targets) -> None:
    for path, old_file in old.targets.items():
        if is_policy_path(path):
            continue  # a policy is meant to change: raising min_release re-signs it
        new_file = new.targets.get(path)
        if new_file is not None and (
            new_file.length != old_file.length or new_file.hashes != old_file.hashes
        ):
            raise ConflictError(
                f"target {path} is already signed with a different length or hash; bundle versions are "
                "immutable: push it under a new version"
            )


# --------------------------------------------------------------------------------------------------
# Offline-key operations (the operator's machine)

OFFLINE_ROLES = (ROOT, TARGETS)


def _short(keyid: str) -> str:
    return keyid[:16]


def _check_role_keys(root: Root) -> None:
    """Structural rules every root this module makes must keep (thresholds, key separation)."""
    online = set(root.roles[SNAPSHOT].keyids) | set(root.roles[TIMESTAMP].keyids)
    for role in (ROOT, TARGETS, SNAPSHOT, TIMESTAMP):
        keyids = root.roles[role].keyids
        threshold = root.roles[role].threshold
        if not keyids:
            raise InvalidInputError(f"the {role} role would have no keys; every role needs at least one")
        if threshold < 1 or threshold > len(keyids):
            raise InvalidInputError(
                f"the {role} threshold {threshold} must be between 1 and the number of {role} keys "
                f"({len(keyids)})"
            )
    for role in OFFLINE_ROLES:
        shared = online & set(root.roles[role].keyids)
        if shared:
            raise InvalidInputError(
                f"the online key {_short(sorted(shared)[0])} must not be a {role} key: the controller must "
                "never be able to sign root or targets"
            )
    if len(root.roles[SNAPSHOT].keyids) != 1 or root.roles[SNAPSHOT].keyids != root.roles[TIMESTAMP].keyids:
        raise InvalidInputError("snapshot and timestamp must both be the controller's one online key")


def _as_signers(signers: Signer | Sequence[Signer]) -> list[Signer]:
    return [signers] if isinstance(signers, Signer) else list(signers)


def _sign_all(md: Metadata[Any], signers: Sequence[Signer]) -> None:
    seen: set[str] = set()
    for signer in signers:
        if signer.public_key.keyid in seen:
            continue
        seen.add(signer.public_key.keyid)
        md.sign(signer, append=True)


def make_root(
    *,
    root_keys: Sequence[Key],
    targets_keys: Sequence[Key],
    online_public: Key,
    signers: Sequence[Signer],
    root_threshold: int = 1,
    targets_threshold: int = 1,
    expires_days: int = 365,
    now: datetime | None = None,
    require_threshold: bool = True,
) -> bytes:
    """Root v1 from public keys and thresholds; snapshot and timestamp trust the online key.

    Signed by `signers` (those that are root keys count towards the threshold). With
    `require_threshold` (the default) an under-signed root is refused here, with a message
    saying how many more root-key signatures it needs.
    """
    root = Root(version=1, expires=_now(now) + timedelta(days=expires_days), consistent_snapshot=False)
    for key in root_keys:
        root.add_key(key, ROOT)
    for key in targets_keys:
        root.add_key(key, TARGETS)
    root.add_key(online_public, SNAPSHOT)
    root.add_key(online_public, TIMESTAMP)
    root.roles[ROOT].threshold = root_threshold
    root.roles[TARGETS].threshold = targets_threshold
    _check_role_keys(root)
    md = Metadata(root)
    _sign_all(md, signers)
    data = _serialize(md)
    if require_threshold:
        check_root_signatures(data, None)
    return data


def new_root(
    release_signer: Signer,
    release_public: Key,
    online_public: Key,
    *,
    expires_days: int = 365,
    now: datetime | None = None,
) -> bytes:
    """Root v1 of the default setup: the release key is the one root and targets key (1-of-1)."""
    if release_signer.public_key.keyid != release_public.keyid:
        raise InvalidInputError("the release signer does not match the release public key")
    if release_public.keyid == online_public.keyid:
        raise InvalidInputError(
            "the online key must differ from the release key: "
            "the controller must never be able to sign targets"
        )
    return make_root(
        root_keys=[release_public], targets_keys=[release_public], online_public=online_public,
        signers=[release_signer], expires_days=expires_days, now=now,
    )


def next_root(
    root_bytes: bytes,
    signers: Sequence[Signer],
    *,
    add_keys: Mapping[str, Sequence[Key]] | None = None,
    revoke_keys: Mapping[str, Sequence[str]] | None = None,
    thresholds: Mapping[str, int] | None = None,
    online_public: Key | None = None,
    expires_days: int = 365,
    now: datetime | None = None,
    require_threshold: bool = True,
) -> bytes:
    """The next root version with changes, signed by `signers`.

    `add_keys` / `revoke_keys` / `thresholds` map a role (`root` or `targets`) to keys to add,
    key ids to revoke, or its new threshold; `online_public` replaces the controller's online
    key for snapshot and timestamp. Devices accept the result only if a threshold of the old
    root's root keys *and* of the new root's signed it; with `require_threshold` (the default)
    this is checked here, so an under-signed root never leaves the operator's machine. Pass
    False to make one anyway (tests, or to collect signatures with `sign_root` elsewhere).
    """
    previous = verify_root(root_bytes)
    # A separate parse, not to_dict(): python-tuf shares role key-id lists between the two.
    root = _parse(root_bytes, Root, "root metadata").signed
    root.version = previous.version + 1
    root.expires = _now(now) + timedelta(days=expires_days)
    for role in {*(add_keys or {}), *(revoke_keys or {}), *(thresholds or {})}:
        if role not in OFFLINE_ROLES:
            raise InvalidInputError(
                f"role {role!r} cannot be changed this way: use 'root' or 'targets' (snapshot and timestamp "
                "follow the controller's online key)"
            )
    for role, keyids in (revoke_keys or {}).items():
        for keyid in keyids:
            if keyid not in root.roles[role].keyids:
                raise NotFoundError(
                    f"key {_short(keyid)} is not a {role} key of root v{previous.version} "
                    f"({role} keys: {', '.join(_short(k) for k in root.roles[role].keyids)})"
                )
            root.revoke_key(keyid, role)
    for role, keys in (add_keys or {}).items():
        for key in keys:
            if key.keyid in root.roles[role].keyids:
                raise ConflictError(f"key {_short(key.keyid)} is already a {role} key")
            root.add_key(key, role)
    for role, threshold in (thresholds or {}).items():
        if isinstance(threshold, bool) or not isinstance(threshold, int):
            raise InvalidInputError(f"the {role} threshold must be an integer, got {threshold!r}")
        root.roles[role].threshold = threshold
    if online_public is not None:
        for role in (SNAPSHOT, TIMESTAMP):
            for keyid in list(root.roles[role].keyids):
                root.revoke_key(keyid, role)
            root.add_key(online_public, role)
    _check_role_keys(root)
    md = Metadata(root)
    _sign_all(md, signers)
    data = _serialize(md)
    if require_threshold:
        check_root_signatures(data, root_bytes)
    return data


def rotate_root(
    root_bytes: bytes,
    signers: Sequence[Signer],
    *,
    release_public: Key | None = None,
    online_public: Key | None = None,
    expires_days: int = 365,
    now: datetime | None = None,
) -> bytes:
    """The next root version, optionally replacing the one release key and/or the online key.

    `signers` must include the current release key and, when it changes, the new one: clients
    accept a new root only when both the old and the new root keys signed it.
    """
    current = verify_root(root_bytes)
    add: dict[str, list[Key]] = {}
    revoke: dict[str, list[str]] = {}
    thresholds: dict[str, int] = {}
    if release_public is not None:
        for role in OFFLINE_ROLES:
            revoke[role] = [k for k in current.roles[role].keyids if k != release_public.keyid]
            if release_public.keyid not in current.roles[role].keyids:
                add[role] = [release_public]
            thresholds[role] = 1
    return next_root(
        root_bytes, signers, add_keys=add, revoke_keys=revoke, thresholds=thresholds,
        online_public=online_public, expires_days=expires_days, now=now,
    )


def sign_root(root_bytes: bytes, signers: Sequence[Signer]) -> bytes:
    """Add signatures to a root (keeping the ones it has): for collecting a threshold in steps."""
    md = _parse(root_bytes, Root, "root metadata")
    _sign_all(md, signers)
    return _serialize(md)


@dataclass(frozen=True)
class RootSignatures:
    """How far a root is from being accepted: valid signatures against each threshold."""

    version: int
    threshold: int
    signed_by: tuple[str, ...]
    previous_version: int | None
    previous_threshold: int
    previous_signed_by: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return len(self.signed_by) >= self.threshold and len(self.previous_signed_by) >= self.previous_threshold

    def problem(self) -> str:
        """Empty when `ok`; else what is missing, in words an operator can act on."""
        parts = []
        if len(self.signed_by) < self.threshold:
            parts.append(
                f"{len(self.signed_by)} of its own {self.threshold} required root-key signatures"
            )
        if self.previous_version is not None and len(self.previous_signed_by) < self.previous_threshold:
            parts.append(
                f"{len(self.previous_signed_by)} of the {self.previous_threshold} required signatures by root "
                f"v{self.previous_version}'s root keys"
            )
        if not parts:
            return ""
        return f"root v{self.version} has only " + " and ".join(parts)


def root_signatures(root_bytes: bytes, previous_root_bytes: bytes | None) -> RootSignatures:
    """Count a root's valid signatures against its own root threshold and the previous root's.

    Pure: nothing is refused here, so callers (and tests crafting bad roots) can inspect it.
    """
    md = _parse(root_bytes, Root, "root metadata")
    own = md.signed.get_verification_result(ROOT, md.signed_bytes, md.signatures)
    prev_version: int | None = None
    prev_threshold = 0
    prev_signed: tuple[str, ...] = ()
    if previous_root_bytes is not None:
        previous = _parse(previous_root_bytes, Root, "previous root metadata").signed
        if md.signed.version != previous.version + 1:
            raise ConflictError(
                f"root v{md.signed.version} does not follow root v{previous.version}; make v{previous.version + 1}"
            )
        result = previous.get_verification_result(ROOT, md.signed_bytes, md.signatures)
        prev_version, prev_threshold, prev_signed = previous.version, result.threshold, tuple(sorted(result.signed))
    return RootSignatures(
        version=md.signed.version,
        threshold=own.threshold,
        signed_by=tuple(sorted(own.signed)),
        previous_version=prev_version,
        previous_threshold=prev_threshold,
        previous_signed_by=prev_signed,
    )


def check_root_signatures(root_bytes: bytes, previous_root_bytes: bytes | None) -> RootSignatures:
    """`root_signatures`, raising SignatureError (reason `threshold`) when a threshold is not met."""
    status = root_signatures(root_bytes, previous_root_bytes)
    if not status.ok:
        raise SignatureError(
            f"{status.problem()}; sign it with more root keys (devices would refuse it)",
            reason="threshold",
            version=status.version,
        )
    return status


def _check_targets_signers(root: Root, signers: Sequence[Signer]) -> None:
    role = root.roles[TARGETS]
    keyids = {s.public_key.keyid for s in signers}
    strangers = sorted(k for k in keyids if k not in role.keyids)
    if strangers:
        raise SignatureError(
            f"key {_short(strangers[0])} is not a targets key of root v{root.version} "
            f"(targets keys: {', '.join(_short(k) for k in role.keyids)}); sign with the release key(s)",
            reason="wrong_key",
        )
    if len(keyids) < role.threshold:
        raise SignatureError(
            f"targets need {role.threshold} signatures by targets keys of root v{root.version}, "
            f"{len(keyids)} given; sign with more targets keys",
            reason="threshold",
        )


def _next_targets(
    targets_bytes: bytes | None,
    root_bytes: bytes,
    signers: Signer | Sequence[Signer],
    entries: Mapping[str, TargetFile],
    *,
    expires_days: int,
    now: datetime | None,
) -> bytes:
    root = verify_root(root_bytes)
    signer_list = _as_signers(signers)
    _check_targets_signers(root, signer_list)
    previous: Targets | None = None
    if targets_bytes is not None:
        # An expired targets may be extended: signing the next version is how expiry is fixed.
        previous = verify_targets(targets_bytes, root_bytes, check_expiry=False)
    targets = Targets(
        version=1 if previous is None else previous.version + 1,
        expires=_now(now) + timedelta(days=expires_days),
        targets=dict(previous.targets) if previous is not None else {},
    )
    targets.targets.update(entries)
    if previous is not None:
        _check_immutable(previous, targets)
    md = Metadata(targets)
    _sign_all(md, signer_list)
    return _serialize(md)


def add_target(
    targets_bytes: bytes | None,
    root_bytes: bytes,
    release_signer: Signer | Sequence[Signer],
    *,
    target_path: str,
    length: int,
    sha256: str,
    custom: Mapping[str, Any],
    expires_days: int = 365,
    now: datetime | None = None,
) -> bytes:
    """The next signed targets: the previous targets (if any) plus one bundle, version + 1.

    `release_signer` is one targets key or several; together they must meet the targets threshold.
    """
    _check_target_path(target_path)
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise InvalidInputError(f"target length must be a positive integer, got {length!r}")
    if not _SHA256_RE.match(sha256):
        raise InvalidInputError(f"target sha256 must be 64 lowercase hex digits, got {sha256!r}")
    entry = TargetFile(
        length=length,
        hashes={"sha256": sha256},
        path=target_path,
        unrecognized_fields={"custom": dict(custom)},
    )
    return _next_targets(targets_bytes, root_bytes, release_signer, {target_path: entry},
                         expires_days=expires_days, now=now)


def resign_targets(
    targets_bytes: bytes,
    previous_root_bytes: bytes,
    root_bytes: bytes,
    release_signer: Signer | Sequence[Signer],
    *,
    expires_days: int = 365,
    now: datetime | None = None,
) -> bytes:
    """Re-sign the current targets (version + 1, same entries) with the key(s) of a newer root.

    Needed right after the targets keys change: the published targets were signed by keys the
    new root may no longer trust (or not enough of them), so devices refuse them until this
    runs. The entries are checked against `previous_root_bytes` (the root that signed them).
    """
    root = verify_root(root_bytes)
    signer_list = _as_signers(release_signer)
    _check_targets_signers(root, signer_list)
    previous = verify_targets(targets_bytes, previous_root_bytes, check_expiry=False)
    targets = Targets(
        version=previous.version + 1,
        expires=_now(now) + timedelta(days=expires_days),
        targets=dict(previous.targets),
    )
    md = Metadata(targets)
    _sign_all(md, signer_list)
    return _serialize(md)


# --------------------------------------------------------------------------------------------------
# Signed per-model policy (release counter minimum)


def policy_path_for(name: str) -> str:
    """The target that carries a model's signed policy."""
    return f"{name}/{POLICY_FILE}"


def policy_document(name: str, min_release: int) -> bytes:
    """The policy's own bytes (canonical JSON); its target signs their length and hash."""
    _check_min_release(min_release)
    return json.dumps({"model": name, "min_release": min_release}, sort_keys=True, separators=(",", ":")).encode()


def _check_min_release(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(f"min_release must be a non-negative integer, got {value!r}")
    return value


def set_min_release(
    targets_bytes: bytes | None,
    root_bytes: bytes,
    signers: Signer | Sequence[Signer],
    *,
    model: str,
    min_release: int,
    expires_days: int = 365,
    now: datetime | None = None,
) -> bytes:
    """The next signed targets with `model`'s policy set to `min_release` (replacing any before)."""
    path = policy_path_for(model)
    _check_target_path(path)
    document = policy_document(model, min_release)
    entry = TargetFile(
        length=len(document),
        hashes={"sha256": _sha256(document)},
        path=path,
        unrecognized_fields={"custom": {"model": model, "min_release": min_release}},
    )
    return _next_targets(targets_bytes, root_bytes, signers, {path: entry}, expires_days=expires_days, now=now)


def min_release_from_custom(custom: Mapping[str, Any] | None, model: str) -> int:
    """A policy target's signed minimum release; 0 when there is no policy (`custom` None).

    A policy that names another model or holds no valid counter is refused: it was signed by
    mistake or crafted, and guessing a value would either block or allow the wrong releases.
    """
    if custom is None:
        return 0
    if custom.get("model") != model:
        raise SignatureError(
            f"the signed policy for {model} names model {custom.get('model')!r}", reason="invalid", transient=False
        )
    value = custom.get("min_release")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SignatureError(
            f"the signed policy for {model} has no valid min_release ({value!r})", reason="invalid", transient=False
        )
    return value


def signed_min_release(targets: Targets | None, model: str) -> int:
    """The minimum release the signed targets allow for `model` (0 without a policy)."""
    if targets is None:
        return 0
    entry = targets.targets.get(policy_path_for(model))
    if entry is None:
        return 0
    custom = entry.custom
    return min_release_from_custom(custom if isinstance(custom, Mapping) else {}, model)


def _check_target_path(path: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in path:
        raise InvalidInputError(f"target path {path!r} must be a relative path like NAME/VERSION/bundle.tar")


# --------------------------------------------------------------------------------------------------
# The controller's online repository


class MetadataStore(Protocol):
    """Where the repository keeps its metadata files. `put` must be atomic (all or nothing)."""

    def get(self, filename: str) -> bytes | None: ...

    def put(self, filename: str, data: bytes) -> None: ...


class MemoryMetadataStore:
    """A `MetadataStore` in a dict: tests and throwaway demos."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def get(self, filename: str) -> bytes | None:
        return self.files.get(filename)

    def put(self, filename: str, data: bytes) -> None:
        self.files[filename] = bytes(data)


class OnlineRepository:
    """The controller's side: verifies what the release key signed, signs snapshot and timestamp.

    State lives only in the store, so a restarted controller picks up where it left off. A lock
    serializes writers in this process. Replicas sharing one store are not yet safe: the
    version check in `accept_targets` and the following `put` are not one atomic step across
    processes, so such a deployment needs a store with compare-and-swap (not built yet).
    """

    def __init__(
        self,
        online_signer: Signer,
        store: MetadataStore,
        *,
        timestamp_expiry_hours: float = 24,
        snapshot_expiry_days: float = 7,
    ) -> None:
        self._signer = online_signer
        self._store = store
        self._lock = threading.RLock()
        self._ts_life = timedelta(hours=timestamp_expiry_hours)
        self._snap_life = timedelta(days=snapshot_expiry_days)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Serialise read-check-write sequences: a thread lock, plus the store's own lock when it
        is shared between processes (several controller replicas on one database)."""
        with self._lock:
            exclusive = getattr(self._store, "exclusive", None)
            with exclusive() if exclusive is not None else contextlib.nullcontext():
                yield

    def online_public_key(self) -> Key:
        return self._signer.public_key

    # -- reading ------------------------------------------------------------------------------------

    def get(self, filename: str) -> bytes:
        """A published metadata file, for serving under the metadata URL."""
        if not PUBLISHED_NAME_RE.match(filename):
            raise NotFoundError(f"{filename!r} is not a metadata file this repository publishes")
        data = self._store.get(filename)
        if data is None:
            hint = " (no root installed yet)" if filename == "root.json" else " yet"
            raise NotFoundError(f"{filename} is not published{hint}")
        return data

    def root(self) -> Root:
        return self._root_md().signed

    def targets(self) -> Targets | None:
        data = self._store.get("targets.json")
        return None if data is None else _parse(data, Targets, "stored targets.json").signed

    def target_info(self, target_path: str) -> TargetFile | None:
        targets = self.targets()
        return None if targets is None else targets.targets.get(target_path)

    def min_release(self, model: str) -> int:
        """The lowest release of `model` the published, release-signed policy allows (0: no policy)."""
        return signed_min_release(self.targets(), model)

    def _root_md(self) -> Metadata[Root]:
        data = self._store.get("root.json")
        if data is None:
            raise NotFoundError(
                "no root metadata installed yet: the first `fleet models push` (or `fleet keys export-root`) "
                "creates it from the operator's release key"
            )
        return _parse(data, Root, "stored root.json")

    # -- writing ------------------------------------------------------------------------------------

    def install_root(self, root_bytes: bytes, *, now: datetime | None = None) -> Root:
        """Install the first root, or the next one (signed by both old and new root keys).

        Installing the same root again is a no-op, so a controller may re-apply it at start-up.
        """
        when = _now(now)
        md = _parse(root_bytes, Root, "root metadata")
        new = md.signed
        _verify(new, ROOT, md, f"root v{new.version}")
        if new.consistent_snapshot:
            raise InvalidInputError(
                "this root enables consistent snapshots, which this repository does not serve yet; "
                "make the root with consistent_snapshot off"
            )
        mine = self._signer.public_key.keyid
        for role in (SNAPSHOT, TIMESTAMP):
            if mine not in new.roles[role].keyids:
                raise InvalidInputError(
                    f"root v{new.version} does not name this controller's online key {mine} for {role} "
                    f"(it names {', '.join(new.roles[role].keyids) or 'none'}); make the root with this "
                    "controller's online public key"
                )
        _check_not_expired(new, f"root v{new.version}", when)
        with self._exclusive():
            current_bytes = self._store.get("root.json")
            if current_bytes is not None:
                current = _parse(current_bytes, Root, "stored root.json").signed
                if new.version == current.version:
                    if _parse(current_bytes, Root, "stored root.json").signed_bytes == md.signed_bytes:
                        return current
                    raise ConflictError(f"a different root v{new.version} is already installed")
                if new.version < current.version:
                    raise ConflictError(
                        f"root v{new.version} is older than the installed v{current.version} "
                        "(rollback refused)"
                    )
                if new.version != current.version + 1:
                    raise ConflictError(
                        f"root v{new.version} skips versions: install v{current.version + 1} first"
                    )
                _verify(current, ROOT, md, f"root v{new.version} (by the keys of root v{current.version})")
            self._store.put(f"{new.version}.root.json", root_bytes)
            self._store.put("root.json", root_bytes)
        return new

    def accept_targets(self, targets_bytes: bytes, *, now: datetime | None = None) -> Targets:
        """Verify and publish a targets signed by the release key, then re-sign snapshot and timestamp."""
        when = _now(now)
        with self._exclusive():
            root_md = self._root_md()
            md = _parse(targets_bytes, Targets, "targets metadata")
            new = md.signed
            _verify(root_md.signed, TARGETS, md, f"targets v{new.version}")
            _check_not_expired(new, f"targets v{new.version}", when)
            current = self.targets()
            expected = 1 if current is None else current.version + 1
            if new.version != expected:
                raise ConflictError(
                    f"targets v{new.version} does not follow the published v{expected - 1}: another push may "
                    "have landed first; fetch targets.json, sign on top of it and retry",
                    expected_version=expected,
                )
            if current is not None:
                _check_immutable(current, new)
            self._store.put("targets.json", targets_bytes)
            self._refresh_locked(when, self._ts_life, self._snap_life)
            return new

    def refresh(
        self,
        now: datetime | None = None,
        timestamp_expiry_hours: float | None = None,
        snapshot_expiry_days: float | None = None,
    ) -> bool:
        """Re-sign snapshot and timestamp when targets changed, keys rotated or they near expiry.

        A timestamp is re-signed once half its lifetime has passed, a snapshot once it would
        expire within max(timestamp lifetime, half its own). Lifetimes default to the
        constructor's. Returns whether anything was re-signed; safe to call every minute.
        """
        ts_life = self._ts_life if timestamp_expiry_hours is None else timedelta(hours=timestamp_expiry_hours)
        snap_life = self._snap_life if snapshot_expiry_days is None else timedelta(days=snapshot_expiry_days)
        with self._exclusive():
            return self._refresh_locked(_now(now), ts_life, snap_life)

    def _refresh_locked(self, now: datetime, ts_life: timedelta, snap_life: timedelta) -> bool:
        root = self._root_md().signed
        targets_bytes = self._store.get("targets.json")
        if targets_bytes is None:
            return False  # nothing to publish until the first push
        targets = _parse(targets_bytes, Targets, "stored targets.json").signed
        targets_meta = MetaFile(
            version=targets.version, length=len(targets_bytes), hashes={"sha256": _sha256(targets_bytes)}
        )

        snapshot_bytes = self._store.get("snapshot.json")
        snapshot_md = (
            None if snapshot_bytes is None else _parse(snapshot_bytes, Snapshot, "stored snapshot.json")
        )
        # Re-sign the snapshot before it could expire under a freshly signed timestamp.
        snap_margin = max(ts_life, snap_life / 2)
        if (
            snapshot_bytes is None
            or snapshot_md is None
            or snapshot_md.signed.meta.get("targets.json") != targets_meta
            or snapshot_md.signed.expires <= now + snap_margin
            or not self._signed_by_current_keys(root, SNAPSHOT, snapshot_md)
        ):
            snapshot_md = Metadata(
                Snapshot(
                    version=1 if snapshot_md is None else snapshot_md.signed.version + 1,
                    expires=now + snap_life,
                    meta={"targets.json": targets_meta},
                )
            )
            snapshot_md.sign(self._signer)
            snapshot_bytes = _serialize(snapshot_md)
            # Snapshot before timestamp: a timestamp must never point at a snapshot not yet stored.
            self._store.put("snapshot.json", snapshot_bytes)
        snapshot_meta = MetaFile(
            version=snapshot_md.signed.version,
            length=len(snapshot_bytes),
            hashes={"sha256": _sha256(snapshot_bytes)},
        )

        timestamp_bytes = self._store.get("timestamp.json")
        timestamp_md = (
            None if timestamp_bytes is None else _parse(timestamp_bytes, Timestamp, "stored timestamp.json")
        )
        if (
            timestamp_md is not None
            and timestamp_md.signed.snapshot_meta == snapshot_meta
            and timestamp_md.signed.expires > now + ts_life / 2
            and self._signed_by_current_keys(root, TIMESTAMP, timestamp_md)
        ):
            # An unchanged snapshot and a timestamp far from expiry: nothing to do.
            return False
        timestamp_md = Metadata(
            Timestamp(
                version=1 if timestamp_md is None else timestamp_md.signed.version + 1,
                expires=now + ts_life,
                snapshot_meta=snapshot_meta,
            )
        )
        timestamp_md.sign(self._signer)
        self._store.put("timestamp.json", _serialize(timestamp_md))
        return True

    @staticmethod
    def _signed_by_current_keys(root: Root, role: str, md: Metadata[Any]) -> bool:
        try:
            root.verify_delegate(role, md.signed_bytes, md.signatures)
        except UnsignedMetadataError:
            return False
        return True


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
