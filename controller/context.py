"""The controller's shared objects, built once per process and handed to every transport.

Rule: everything the REST routers, the gRPC service and the reconciler share (settings, the
database session factory, the artifact store, the TUF online repository, and the two
notification callbacks) lives in one `ControllerContext`; nothing is a module-level global, so
tests build as many isolated controllers as they like.

`build_context` is the only place that touches the disk at start-up: it creates the data
folders, migrates the database to the newest schema, and creates the controller's online
signing key on first start (`<data_dir>/keys/online.key`, mode 0600).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from securesystemslib.signer import CryptoSigner
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from fleet.controller.artifacts import ArtifactStore, LocalArtifactStore
from fleet.controller.db import is_sqlite, make_engine, make_session_factory, migrate
from fleet.controller.drift import DriftPolicy
from fleet.controller.metrics import ControllerMetrics
from fleet.controller.settings import ControllerSettings
from fleet.core import trust as trust_rules

ONLINE_KEY_NAME = "online.key"


def _no_changes(_device_ids: list[str]) -> None:
    return None


def _no_kick() -> None:
    return None


@dataclass
class ControllerContext:
    settings: ControllerSettings
    session_factory: sessionmaker[Session]
    artifacts: ArtifactStore
    trust: trust_rules.OnlineRepository
    engine: Engine | None = None
    # Wired by the server: wake the Sync streams of these devices (their desired state changed).
    on_desired_changed: Callable[[list[str]], None] = field(default=_no_changes)
    # Wired by the server: ask the reconciler for a pass as soon as possible.
    kick: Callable[[], None] = field(default=_no_kick)
    metrics: ControllerMetrics | None = None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()


def load_or_create_online_key(settings: ControllerSettings) -> CryptoSigner:
    path = settings.keys_dir / ONLINE_KEY_NAME
    settings.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        trust_rules.generate_key_pair(path)
    return trust_rules.load_signer(path)


def make_artifact_store(settings: ControllerSettings) -> ArtifactStore:
    if settings.artifact_store == "s3":
        from fleet.controller.artifacts_s3 import S3ArtifactStore

        return S3ArtifactStore(
            settings.s3_bucket, prefix=settings.s3_prefix, endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region, presign_ttl_s=settings.s3_presign_ttl_s,
        )
    return LocalArtifactStore(settings.artifact_root)


def build_context(settings: ControllerSettings) -> ControllerContext:
    """Create folders, migrate the database and load (or create) the online key."""
    from fleet.controller.tuf_store import FileMetadataStore, SqlMetadataStore

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / "tmp").mkdir(exist_ok=True)
    migrate(settings.db_url)
    engine = make_engine(settings.db_url)
    session_factory = make_session_factory(engine)
    # With PostgreSQL (several replicas) metadata lives in the database, so every replica serves
    # and extends one repository; SQLite means one process, whose data directory is enough (and
    # a second SQLite writer inside an open request transaction would only wait on itself).
    store: trust_rules.MetadataStore = (
        FileMetadataStore(settings.tuf_dir) if is_sqlite(settings.db_url) else SqlMetadataStore(session_factory)
    )
    repository = trust_rules.OnlineRepository(load_or_create_online_key(settings), store)
    return ControllerContext(
        settings=settings,
        session_factory=session_factory,
        artifacts=make_artifact_store(settings),
        trust=repository,
        engine=engine,
        metrics=ControllerMetrics(session_factory, settings.metrics_group_label, DriftPolicy.from_settings(settings)),
    )
