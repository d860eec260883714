"""Controller configuration: every address and path is an option with a default and an env variable.

Rule: with no configuration at all the controller runs embedded (SQLite file and a local
artifact directory under `data_dir`), so settings that derive from others (`db_url`,
`artifact_dir`, `public_url`) are left empty by default and filled in from `data_dir` and the
HTTP address after validation. Every field reads `FLEET_<FIELD>` from the environment, e.g.
`FLEET_DATA_DIR`, `FLEET_DB_URL`, `FLEET_HTTP_PORT`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 1024**3
MIB = 1024**2


class ControllerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore")

    data_dir: Path = Field(
        default=Path("~/.local/share/fleet/controller"),
        description="Root of the controller's state: database, artifacts, keys, TUF metadata.",
    )
    db_url: str = Field(
        default="",
        description="SQLAlchemy URL; default sqlite:///<data_dir>/fleet.db (postgresql+psycopg://... works).",
    )
    artifact_dir: Path | None = Field(
        default=None, description="Local artifact store; default <data_dir>/artifacts."
    )
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    grpc_enroll_port: int = Field(
        default=50052, ge=0, le=65535,
        description="gRPC port for enrolment only: server-authenticated TLS, no client certificate yet.",
    )
    tls_server_names: str = Field(
        default="localhost,127.0.0.1",
        description="Comma-separated DNS names and IPs the controller's server certificate is valid for.",
    )
    ca_cert_file: Path | None = Field(
        default=None,
        description="PEM CA certificate for device identity; default <data_dir>/tls/ca.pem (made on first start).",
    )
    ca_key_file: Path | None = Field(
        default=None, description="PEM private key of that CA; default <data_dir>/tls/ca.key (mode 0600)."
    )
    device_cert_ttl_hours: float = Field(
        default=24.0, gt=0, le=24 * 366, description="Lifetime of device certificates; agents renew at two thirds."
    )
    http_tls: bool = Field(default=False, description="Serve REST over HTTPS.")
    http_tls_cert: Path | None = Field(
        default=None, description="PEM certificate chain for HTTPS; default: one issued by the controller's CA."
    )
    http_tls_key: Path | None = Field(default=None, description="PEM private key for http_tls_cert.")
    admin_token: str = Field(
        default="",
        description="Bootstrap admin API token (e.g. from a Kubernetes Secret); stored hashed at start-up.",
    )
    metrics_public: bool = Field(
        default=False, description="Serve /metrics without a token (otherwise a viewer token is needed)."
    )
    public_url: str = Field(
        default="",
        description="Base URL agents use for bundle downloads and TUF metadata; default http://<http_host>:<http_port>.",
    )
    reconcile_interval_s: float = Field(default=1.0, gt=0)
    max_bundle_bytes: int = Field(default=2 * GIB, gt=0)
    max_request_body_bytes: int = Field(
        default=1 * MIB, gt=0, description="Cap for non-upload (JSON) request bodies."
    )
    telemetry_retention_hours: float = Field(default=168.0, gt=0)
    artifact_store: Literal["local", "s3"] = Field(
        default="local", description="Where bundle bytes live: a local directory or an S3-protocol bucket."
    )
    s3_bucket: str = Field(default="", description="Bucket for bundles when artifact_store is s3.")
    s3_prefix: str = Field(default="", description="Key prefix inside the bucket.")
    s3_endpoint_url: str | None = Field(default=None, description="S3-protocol endpoint (MinIO, Ceph); AWS if unset.")
    s3_region: str | None = Field(default=None)
    s3_presign_ttl_s: int = Field(default=900, ge=30, le=7 * 24 * 3600,
                                  description="Lifetime of the presigned download URLs agents are redirected to.")
    drift_psi_threshold: float = Field(default=0.2, gt=0, description="PSI at which a device or group is drifting.")
    drift_min_samples: int = Field(default=200, ge=1, description="Requests needed before drift is judged.")
    drift_window_s: float = Field(default=600.0, gt=0, description="Recent span of telemetry drift is judged on.")
    metrics_group_label: str = Field(
        default="site", description="Device label whose values group devices in /metrics (fleet_devices{group})."
    )

    gitops_enabled: bool = Field(
        default=False,
        description="Watch ModelRollout custom resources in the cluster and run them as rollouts (leader only).",
    )
    gitops_namespace: str = Field(
        default="", description="Namespace whose ModelRollouts are watched; empty: every namespace."
    )
    gitops_resync_s: float = Field(
        default=10.0, gt=0, description="How often every ModelRollout's status is re-synced from its rollout."
    )

    @model_validator(mode="after")
    def _derive_defaults(self) -> ControllerSettings:
        # Expand `~` once here so every consumer sees the same absolute path.
        self.data_dir = self.data_dir.expanduser()
        if not self.db_url:
            self.db_url = f"sqlite:///{self.data_dir / 'fleet.db'}"
        if self.artifact_dir is None:
            self.artifact_dir = self.data_dir / "artifacts"
        else:
            self.artifact_dir = self.artifact_dir.expanduser()
        if not self.public_url:
            scheme = "https" if self.http_tls else "http"
            self.public_url = f"{scheme}://{self.http_host}:{self.http_port}"
        # Joined with paths like "/api/v1/..."; a trailing slash would double up.
        self.public_url = self.public_url.rstrip("/")
        return self

    @property
    def artifact_root(self) -> Path:
        """`artifact_dir`, never None after validation (typed for callers)."""
        assert self.artifact_dir is not None
        return self.artifact_dir

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def tuf_dir(self) -> Path:
        return self.data_dir / "tuf"
