"""The model registry: signed bundles in, bundle references out.

Rules this module enforces:

- A version enters the registry only if its bundle passes every check of `fleet.core.bundle`
  (safe archive, manifest valid, every model file's hash, every model file a self-contained
  ONNX model whose inputs and outputs agree with the manifest) *and* the release-signed targets
  metadata uploaded with it verifies against the installed root and lists this bundle under
  `NAME/VERSION/bundle.tar` with exactly its length and SHA-256. Anything else is refused and
  the stored bytes are removed, so the store never holds a bundle agents could not verify.
- `name:version` is immutable: a second upload of the same pair is a `ConflictError`.
- A version that anything still depends on (a device's desired or actual serving/shadow slot,
  an unfinished rollout as candidate or baseline, the newest assignment of a selection, an
  alias) cannot be deleted: `ConflictError` naming the user.

Uploads are serialized per process (`_WRITE_LOCK`): two uploads of the same `name:version` with
different bytes must not overwrite or delete each other's stored file. Service functions take
a `Session` and never commit, except `upload_version`, which owns its transaction so the lock
covers the commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.orm import Session

from fleet.controller.models import (
    FINISHED_PHASES,
    Assignment,
    Device,
    ModelAlias,
    ModelVersion,
    Rollout,
    RolloutDevice,
)
from fleet.core import bundle as bundle_rules
from fleet.core import trust as trust_rules
from fleet.core.errors import (
    BundleError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    SignatureError,
)

if TYPE_CHECKING:
    from fleet.controller.context import ControllerContext

CHUNK = 1024 * 1024
ALIAS_RE = re.compile(r"^[a-z][a-z0-9._-]{0,62}$")
_WRITE_LOCK = threading.Lock()


def bundle_key(name: str, version: str) -> str:
    return f"bundles/{name}/{version}/bundle.tar"


@dataclass
class ModelSummary:
    """A model as the registry lists it: its versions (newest first) and aliases."""

    name: str
    task: str
    versions: list[ModelVersion]
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def latest(self) -> ModelVersion:
        return self.versions[0]


# -- upload -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _spooled(src: BinaryIO, directory: Path, max_bytes: int) -> Iterator[tuple[Path, int, str]]:
    """Copy an upload to a private temp file (size-capped, hashed on the way); removed afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=".tar", dir=directory)
    path = Path(name)
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise InvalidInputError(
                        f"bundle is larger than the controller's limit of {max_bytes} bytes "
                        "(FLEET_MAX_BUNDLE_BYTES)",
                        limit=max_bytes,
                    )
                digest.update(chunk)
                out.write(chunk)
        if size == 0:
            raise BundleError("the uploaded bundle is empty")
        yield path, size, digest.hexdigest()
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _check_listed(targets: Any, target_path: str, size: int, sha256: str, where: str) -> None:
    target = targets.targets.get(target_path)
    if target is None:
        raise SignatureError(
            f"{where} does not list {target_path}: sign the bundle into targets.json with the release "
            "key (`fleet models push` does this) and upload that targets.json with it",
            target_path=target_path,
        )
    signed_sha = target.hashes.get("sha256")
    if target.length != size or signed_sha != sha256:
        raise BundleError(
            f"the uploaded bundle does not match its signed target {target_path}: signed {target.length} "
            f"bytes sha256 {signed_sha}, uploaded {size} bytes sha256 {sha256}",
            target_path=target_path,
            signed_length=target.length,
            signed_sha256=signed_sha,
            length=size,
            sha256=sha256,
        )


def add_version(
    ctx: ControllerContext,
    session: Session,
    bundle_file: BinaryIO,
    targets_metadata: bytes,
    *,
    expected_name: str | None = None,
) -> ModelVersion:
    """Validate, verify and store one bundle; returns the new (flushed, uncommitted) version.

    `expected_name` is the model name of the URL the bundle was posted to; the manifest must agree.
    """
    settings = ctx.settings
    if not targets_metadata:
        raise SignatureError("the signed targets metadata (targets.json) is missing from the upload")
    with _spooled(bundle_file, settings.data_dir / "tmp", settings.max_bundle_bytes) as (path, size, sha256):
        # Full checks here (not only the manifest): a bundle whose files do not match its own
        # manifest, are not ONNX, or keep weights in external files would fail on every device;
        # refuse it once, at the door.
        manifest = bundle_rules.verify_bundle(path, max_total_bytes=settings.max_bundle_bytes, check_models=True)
        name, version = manifest.name, manifest.version
        if expected_name is not None and expected_name != name:
            raise BundleError(
                f"bundle is for model {name!r} but was uploaded to model {expected_name!r}",
                manifest_name=name,
            )
        if _find(session, name, version) is not None:
            raise ConflictError(
                f"{name}:{version} already exists; versions are immutable, push a new version",
                model=name,
                version=version,
            )
        target_path = trust_rules.target_path_for(name, version)
        # Verify against the installed root without publishing anything yet, so a targets.json
        # that does not cover this bundle never becomes the repository's current one.
        try:
            root_bytes = ctx.trust.get("root.json")
        except NotFoundError:
            raise ConflictError(
                "this controller has no root metadata yet: run `fleet keys init` and install its "
                "root.json (POST /api/v1/trust/root) before pushing bundles"
            ) from None
        verified = trust_rules.verify_targets(targets_metadata, root_bytes)
        _check_listed(verified, target_path, size, sha256, "the uploaded targets.json")

        key = bundle_key(name, version)
        with path.open("rb") as src:
            stored_size, stored_sha = ctx.artifacts.put(key, src, max_bytes=settings.max_bundle_bytes)
        try:
            if (stored_size, stored_sha) != (size, sha256):  # the temp file changed under us
                raise BundleError(f"stored bytes of {name}:{version} differ from the upload; retry")
            _publish_targets(ctx, targets_metadata, target_path, size, sha256)
            mv = ModelVersion(
                name=name,
                version=version,
                task=manifest.task,
                release=manifest.release,
                manifest=manifest.to_dict(),
                bundle_key=key,
                sha256=sha256,
                size=size,
                target_path=target_path,
            )
            session.add(mv)
            try:
                session.flush()
            except DBIntegrityError as exc:
                raise ConflictError(f"{name}:{version} already exists", model=name, version=version) from exc
            ctx.trust.refresh()
        except BaseException:
            ctx.artifacts.delete(key)
            raise
    return mv


def _publish_targets(ctx: ControllerContext, data: bytes, target_path: str, size: int, sha256: str) -> None:
    try:
        current = ctx.trust.get("targets.json")
    except NotFoundError:
        current = None
    if current == data:
        # A retried upload (say, the first try failed after publishing): already accepted.
        return
    accepted = ctx.trust.accept_targets(data)
    _check_listed(accepted, target_path, size, sha256, "the accepted targets.json")


def upload_version(
    ctx: ControllerContext,
    bundle_file: BinaryIO,
    targets_metadata: bytes,
    *,
    expected_name: str | None = None,
) -> ModelVersion:
    """`add_version` in its own committed transaction, serialized with other uploads in this process."""
    with _WRITE_LOCK, ctx.session_factory() as session:
        try:
            mv = add_version(ctx, session, bundle_file, targets_metadata, expected_name=expected_name)
            session.commit()
        except BaseException:
            session.rollback()
            raise
        return mv


# -- reading ----------------------------------------------------------------------------------------


def _find(session: Session, name: str, version: str) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    )


def _versions_of(session: Session, name: str) -> list[ModelVersion]:
    return list(
        session.scalars(
            select(ModelVersion)
            .where(ModelVersion.name == name)
            .order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc())
        )
    )


def _aliases_of(session: Session, name: str) -> dict[str, str]:
    rows = session.scalars(select(ModelAlias).where(ModelAlias.name == name).order_by(ModelAlias.alias))
    return {row.alias: row.version for row in rows}


def list_models(session: Session) -> list[ModelSummary]:
    """Every model with at least one version, by name."""
    by_name: dict[str, list[ModelVersion]] = {}
    query = select(ModelVersion).order_by(
        ModelVersion.name, ModelVersion.created_at.desc(), ModelVersion.id.desc()
    )
    for mv in session.scalars(query):
        by_name.setdefault(mv.name, []).append(mv)
    aliases: dict[str, dict[str, str]] = {}
    for row in session.scalars(select(ModelAlias)):
        aliases.setdefault(row.name, {})[row.alias] = row.version
    return [
        ModelSummary(name=n, task=vs[0].task, versions=vs, aliases=aliases.get(n, {}))
        for n, vs in by_name.items()
    ]


def get_model(session: Session, name: str) -> ModelSummary:
    versions = _versions_of(session, name)
    if not versions:
        raise NotFoundError(f"model {name!r} not found: push a version first", model=name)
    aliases = _aliases_of(session, name)
    return ModelSummary(name=name, task=versions[0].task, versions=versions, aliases=aliases)


def get_version(session: Session, name: str, version: str) -> ModelVersion:
    """A version by its exact name, else through an alias of that name (`detector:stable`)."""
    mv = _find(session, name, version)
    if mv is not None:
        return mv
    alias = session.get(ModelAlias, (name, version))
    if alias is not None:
        mv = _find(session, name, alias.version)
        if mv is not None:
            return mv
    raise NotFoundError(f"model version {name}:{version} not found", model=name, version=version)


def bundle_ref(ctx: ControllerContext, mv: ModelVersion) -> dict[str, Any]:
    """The BundleRef an agent gets in its desired state (see docs/ARCHITECTURE.md).

    The URL is always the controller's bundle route, never a store URL: the route serves local
    bytes itself and redirects to a freshly presigned URL for object stores, so desired state
    stored today still works when a device comes back next month.
    """
    return {
        "version": mv.version,
        "url": f"{ctx.settings.public_url.rstrip('/')}/api/v1/models/{mv.name}/versions/{mv.version}/bundle",
        "sha256": mv.sha256,
        "length": mv.size,
        "target_path": mv.target_path,
    }


# -- changing -------------------------------------------------------------------------------------


def set_alias(session: Session, name: str, alias: str, version: str) -> ModelAlias:
    """Point `name:alias` at an existing version (create or move the alias)."""
    if not ALIAS_RE.match(alias):
        raise InvalidInputError(
            f"invalid alias {alias!r}: start with a lowercase letter; then letters, digits, '.', '_', '-'"
        )
    if _find(session, name, version) is None:
        raise NotFoundError(f"model version {name}:{version} not found", model=name, version=version)
    if _find(session, name, alias) is not None:
        raise ConflictError(f"{alias!r} is already a version of {name}; an alias cannot shadow it")
    row = session.get(ModelAlias, (name, alias))
    if row is None:
        row = ModelAlias(name=name, alias=alias, version=version)
        session.add(row)
    else:
        row.version = version
    session.flush()
    return row


def _uses_in_state(state: Any, name: str, version: str, *, actual: bool) -> bool:
    if not isinstance(state, dict):
        return False
    for model in state.get("models") or []:
        if not isinstance(model, dict) or model.get("model") != name:
            continue
        if actual:
            for slot in model.get("slots") or []:
                # "previous" is the device's own rollback copy; it needs nothing from the registry.
                if slot.get("role") in ("serving", "shadow") and slot.get("version") == version:
                    return True
        else:
            for role in ("serving", "shadow"):
                ref = model.get(role)
                if isinstance(ref, dict) and ref.get("version") == version:
                    return True
    return False


def version_users(session: Session, name: str, version: str) -> list[str]:
    """Who still depends on `name:version`, as readable phrases (empty: free to delete)."""
    users: list[str] = []
    for device in session.scalars(select(Device).where(Device.decommissioned.is_(False))):
        if _uses_in_state(device.desired, name, version, actual=False):
            users.append(f"device {device.id} (desired state)")
        elif _uses_in_state(device.actual, name, version, actual=True):
            users.append(f"device {device.id} (running it)")
    active = select(Rollout).where(Rollout.model == name, Rollout.phase.not_in(FINISHED_PHASES))
    for rollout in session.scalars(active):
        if rollout.version == version:
            users.append(f"rollout {rollout.id} (candidate)")
            continue
        baseline = session.scalar(
            select(RolloutDevice.device_id)
            .where(RolloutDevice.rollout_id == rollout.id, RolloutDevice.baseline_version == version)
            .limit(1)
        )
        if baseline is not None:
            users.append(f"rollout {rollout.id} (baseline)")
    newest: dict[str, Assignment] = {}
    for assignment in session.scalars(
        select(Assignment).where(Assignment.model == name).order_by(Assignment.created_at, Assignment.id)
    ):
        newest[json.dumps(assignment.selector or {}, sort_keys=True)] = assignment
    for selector_key, assignment in newest.items():
        if assignment.version == version:
            users.append(f"assignment {selector_key} (newest for its selection)")
    for alias, target in _aliases_of(session, name).items():
        if target == version:
            users.append(f"alias {name}:{alias}")
    return users


def delete_version(session: Session, name: str, version: str) -> str:
    """Remove a version's record; returns its artifact key for the caller to delete after commit.

    The bytes are removed only after the commit, so a failed transaction never leaves a record
    pointing at nothing.
    """
    mv = _find(session, name, version)
    if mv is None:
        raise NotFoundError(f"model version {name}:{version} not found", model=name, version=version)
    users = version_users(session, name, version)
    if users:
        shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
        raise ConflictError(
            f"{name}:{version} is in use by {shown}; roll those forward (or move the alias) first",
            users=users,
        )
    key = mv.bundle_key
    session.delete(mv)
    session.flush()
    return key
