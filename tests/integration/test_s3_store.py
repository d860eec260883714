"""Bundles in an S3-protocol store: a real moto server over HTTP (not a patched boto3).

Given a controller configured with the S3 artifact store,
when a signed bundle is pushed through the REST API,
then its bytes land in the bucket, agents are redirected to a fresh presigned URL for them,
a download interrupted half-way resumes with a Range request against S3 itself, and deleting
the version removes the object.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from fastapi.testclient import TestClient

from fleet.agent.download import download_bundle
from fleet.controller.access import admin_headers
from fleet.controller.app import create_app
from fleet.controller.context import build_context
from fleet.controller.settings import ControllerSettings
from fleet.core import synthetic_models as sm
from fleet.core.bundle import build_bundle, sha256_file
from fleet.core.trust import add_target, generate_key_pair, load_public_key, load_signer, new_root, target_path_for

moto_server = pytest.importorskip("moto.server")
BUCKET = "fleet-bundles"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    port = _port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(key, value)


def test_push_redirect_resume_delete(tmp_path: Path, s3_endpoint: str, aws_env: None) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    settings = ControllerSettings(data_dir=tmp_path / "ctl", artifact_store="s3", s3_bucket=BUCKET,
                                  s3_prefix="prod", s3_endpoint_url=s3_endpoint, s3_region="us-east-1",
                                  public_url="http://testserver")
    ctx = build_context(settings)
    client = TestClient(create_app(ctx), headers=admin_headers(ctx))

    # Given a release key, a root installed on the controller and a signed bundle
    generate_key_pair(tmp_path / "release.key")
    signer = load_signer(tmp_path / "release.key")
    online = client.get("/api/v1/trust/online-key").json()
    root = new_root(signer, load_public_key(tmp_path / "release.pub"), load_public_key(online["public_key_pem"]))
    assert client.post("/api/v1/trust/root", content=root).status_code in (200, 201)
    model = tmp_path / "m.onnx"
    model.write_bytes(sm.classifier(1, channels=64, num_classes=1000))
    bundle = tmp_path / "bundle.tar"
    build_bundle(bundle, name="det", version="v1", task="classification", model_files={"any": model})
    size, digest = bundle.stat().st_size, sha256_file(bundle)
    targets = add_target(None, root, signer, target_path=target_path_for("det", "v1"), length=size, sha256=digest,
                         custom={})

    # When it is pushed
    response = client.post("/api/v1/models/det/versions",
                           files={"bundle": ("bundle.tar", bundle.read_bytes()), "targets": ("t.json", targets)})
    assert response.status_code == 201, response.text

    # Then the bytes are in the bucket under the prefix, and not on the controller's disk
    stored = s3.get_object(Bucket=BUCKET, Key="prod/bundles/det/v1/bundle.tar")["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == digest
    assert not list((tmp_path / "ctl").rglob("bundle.tar"))

    # And the bundle route redirects to a presigned URL of the object store
    redirect = client.get("/api/v1/models/det/versions/v1/bundle", follow_redirects=False)
    assert redirect.status_code == 307
    presigned = redirect.headers["location"]
    assert presigned.startswith(s3_endpoint) and "X-Amz-Signature" in presigned

    # And an interrupted download resumes with Range against S3 and verifies
    part = tmp_path / "dl" / "det-v1.part"
    part.parent.mkdir()
    part.write_bytes(stored[: size // 3])
    with httpx.Client(follow_redirects=True) as http:
        done = download_bundle(http, presigned, part, length=size, sha256=digest)
    assert done.read_bytes() == stored
    ranged = httpx.get(presigned, headers={"Range": f"bytes={size - 10}-"})
    assert ranged.status_code == 206 and ranged.content == stored[-10:]

    # And deleting the version removes the object
    assert client.delete("/api/v1/models/det/versions/v1").status_code == 204
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="prod/")
    assert listed.get("KeyCount", 0) == 0
