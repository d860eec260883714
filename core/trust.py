"""Signing metadata for bundles, on The Update Framework's metadata model (python-tuf `Metadata` API).

Rules this module enforces:

- Two keys, two powers. The operator's **release key** (Ed25519) signs `root` and `targets`; it
  never leaves the operator's machine. The controller's **online key** signs only `snapshot` and
  `timestamp`, so a compromised controller can delay or freeze updates but cannot make a device
  accept a bundle the release key did not sign.
- `targets` lists every bundle as `NAME/VERSION/bundle.tar` with its length, SHA-256 and custom
  fields. A bundle path, once signed, keeps its bytes: re-signing it with another hash is refused.
- The repository accepts a `targets` only if the current root's targets keys signed it, it is not
  expired, and its version is exactly the current one + 1, so two concurrent pushes cannot
  silently overwrite each other: the second one is told to re-sign on top of the first.
- A new root is accepted only if it is signed by a threshold of its own root keys *and* of the
  previous root's (basic key rotation), and only in version order.

Everything here is pure (bytes in, bytes out) except the key-file helpers at the top and the
`MetadataStore` the repository writes through. Consistent snapshots are off in this version, so
the published names are `N.root.json`, `root.json`, `timestamp.json`, `snapshot.json` and
`targets.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import threading
from collections.abc import Iterator, Mapping, Sequence
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


def _check_immutable(old: Targets, new: Targets) -> None:
    for path, old_file in old.targets.items():
        new_file = new.targets.get(path)
        if new_file is not None and (
            new_file.length != old_file.length or new_file.hashes != old_file.hashes
        ):
            raise ConflictError(
                f"target {path} is already signed with a different length or hash; bundle versions are "
                "immutable: push it under a new version"
            )


# --------------------------------------------------------------------------------------------------
# Release-key operations (the operator's machine)


def new_root(
    release_signer: Signer,
    release_public: Key,
    online_public: Key,
    *,
    expires_days: int = 365,
    now: datetime | None = None,
) -> bytes:
    """Root v1: root and targets trust the release key, snapshot and timestamp the online key."""
    if release_signer.public_key.keyid != release_public.keyid:
        raise InvalidInputError("the release signer does not match the release public key")
    if release_public.keyid == online_public.keyid:
        raise InvalidInputError(
            "the online key must differ from the release key: "
            "the controller must never be able to sign targets"
        )
    root = Root(version=1, expires=_now(now) + timedelta(days=expires_days), consistent_snapshot=False)
    root.add_key(release_public, ROOT)
    root.add_key(release_public, TARGETS)
    root.add_key(online_public, SNAPSHOT)
    root.add_key(online_public, TIMESTAMP)
    md = Metadata(root)
    md.sign(release_signer)
    return _serialize(md)


def rotate_root(
    root_bytes: bytes,
    signers: Sequence[Signer],
    *,
    release_public: Key | None = None,
    online_public: Key | None = None,
    expires_days: int = 365,
    now: datetime | None = None,
) -> bytes:
    """The next root version, optionally replacing the release and/or online key.

    `signers` must include the current release key and, when it changes, the new one: clients
    accept a new root only when both the old and the new root keys signed it.
    """
    current = verify_root(root_bytes)
    # A separate parse, not to_dict(): python-tuf shares role key-id lists between the two.
    root = _parse(root_bytes, Root, "root metadata").signed
    root.version = current.version + 1
    root.expires = _now(now) + timedelta(days=expires_days)
    if release_public is not None:
        for role in (ROOT, TARGETS):
            for keyid in list(root.roles[role].keyids):
                root.revoke_key(keyid, role)
            root.add_key(release_public, role)
    if online_public is not None:
        for role in (SNAPSHOT, TIMESTAMP):
            for keyid in list(root.roles[role].keyids):
                root.revoke_key(keyid, role)
            root.add_key(online_public, role)
    md = Metadata(root)
    for signer in signers:
        md.sign(signer, append=True)
    data = _serialize(md)
    # Fail here, on the operator's machine, rather than at the controller.
    _verify(root, ROOT, md, f"root v{root.version}")
    _verify(current, ROOT, md, f"root v{root.version} (by the previous root)")
    return data


def add_target(
    targets_bytes: bytes | None,
    root_bytes: bytes,
    release_signer: Signer,
    *,
    target_path: str,
    length: int,
    sha256: str,
    custom: Mapping[str, Any],
    expires_days: int = 365,
    now: datetime | None = None,
) -> bytes:
    """The next signed targets: the previous targets (if any) plus one bundle, version + 1."""
    root = verify_root(root_bytes)
    keyid = release_signer.public_key.keyid
    if keyid not in root.roles[TARGETS].keyids:
        raise SignatureError(
            f"key {keyid} is not a targets key of root v{root.version} "
            f"(targets keys: {', '.join(root.roles[TARGETS].keyids)}); sign with the release key",
            reason="wrong_key",
        )
    _check_target_path(target_path)
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise InvalidInputError(f"target length must be a positive integer, got {length!r}")
    if not _SHA256_RE.match(sha256):
        raise InvalidInputError(f"target sha256 must be 64 lowercase hex digits, got {sha256!r}")

    previous: Targets | None = None
    if targets_bytes is not None:
        # An expired targets may be extended: signing the next version is how expiry is fixed.
        previous = verify_targets(targets_bytes, root_bytes, check_expiry=False)
    targets = Targets(
        version=1 if previous is None else previous.version + 1,
        expires=_now(now) + timedelta(days=expires_days),
        targets=dict(previous.targets) if previous is not None else {},
    )
    targets.targets[target_path] = TargetFile(
        length=length,
        hashes={"sha256": sha256},
        path=target_path,
        unrecognized_fields={"custom": dict(custom)},
    )
    if previous is not None:
        _check_immutable(previous, targets)
    md = Metadata(targets)
    md.sign(release_signer)
    return _serialize(md)


def resign_targets(
    targets_bytes: bytes,
    previous_root_bytes: bytes,
    root_bytes: bytes,
    release_signer: Signer,
    *,
    expires_days: int = 365,
    now: datetime | None = None,
) -> bytes:
    """Re-sign the current targets (version + 1, same entries) with the key of a newer root.

    Needed right after the targets key rotates: the published targets were signed by the old key,
    which the new root no longer trusts, so devices refuse them until this runs. The entries are
    checked against `previous_root_bytes` (the root that signed them) before being re-signed.
    """
    root = verify_root(root_bytes)
    keyid = release_signer.public_key.keyid
    if keyid not in root.roles[TARGETS].keyids:
        raise SignatureError(
            f"key {keyid} is not a targets key of root v{root.version}; sign with the new release key",
            reason="wrong_key",
        )
    previous = verify_targets(targets_bytes, previous_root_bytes, check_expiry=False)
    targets = Targets(
        version=previous.version + 1,
        expires=_now(now) + timedelta(days=expires_days),
        targets=dict(previous.targets),
    )
    md = Metadata(targets)
    md.sign(release_signer)
    return _serialize(md)


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
