"""Hostile input on every path: bundles, model files, manifests and REST bodies.

Given a controller with a real SQLite file, an installed TUF root and an operator's release key
(the worst case: the hostile bundle is validly signed, so only the content checks stand between it
and the fleet), and a device's real model store, each test feeds one attack to the controller's
push path or the device's stage/load path, or a REST body to the API, and asserts the refusal,
its message, and that nothing was stored or written outside the staging directory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleet.agent import runtime
from fleet.agent.slots import ModelStore
from fleet.controller.access import admin_headers
from fleet.controller.app import create_app
from fleet.controller.context import ControllerContext, build_context
from fleet.controller.settings import ControllerSettings
from fleet.core import synthetic_models, trust
from fleet.core.bundle import build_bundle, extract_bundle
from fleet.core.errors import BundleError, ModelLoadError
from fleet.core.manifest import MANIFEST_NAME, Manifest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NAME, VERSION = "cls", "v1"


# -- the controller and the operator ----------------------------------------------------------------


def auth_headers(client: TestClient) -> dict[str, str]:
    """Headers every REST call of this file carries: an admin token (the attacks here are on input,
    not on access, so they are made with every right)."""
    cached: dict[str, str] | None = getattr(client, "_fleet_auth", None)
    if cached is None:
        cached = admin_headers(client.app.state.ctx)  # type: ignore[attr-defined]
        client._fleet_auth = cached  # type: ignore[attr-defined]
    return cached


def api(client: TestClient, method: str, url: str, **kwargs: Any) -> Any:
    headers = {**auth_headers(client), **kwargs.pop("headers", {})}
    return client.request(method, url, headers=headers, **kwargs)


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ControllerContext]:
    settings = ControllerSettings(
        data_dir=tmp_path / "controller",
        public_url="http://controller.test:8080",
        max_bundle_bytes=4 * 1024 * 1024,
        max_request_body_bytes=64 * 1024,
    )
    context = build_context(settings)
    yield context
    context.close()


@pytest.fixture
def client(ctx: ControllerContext) -> Iterator[TestClient]:
    with TestClient(create_app(ctx), raise_server_exceptions=False) as test_client:
        yield test_client


class Operator:
    """Holds the release key; signs whatever bytes it is given into targets.json."""

    def __init__(self, client: TestClient, key_path: Path) -> None:
        trust.generate_key_pair(key_path)
        self.signer = trust.load_signer(key_path)
        public = trust.load_public_key(trust.public_key_path(key_path))
        online = trust.load_public_key(api(client, "GET", "/api/v1/trust/online-key").json()["public_key_pem"])
        self.root = trust.new_root(self.signer, public, online)
        installed = api(client, "POST", "/api/v1/trust/root", content=self.root,
                        headers={"content-type": "application/json"})
        assert installed.status_code == 200, installed.text

    def push(self, client: TestClient, data: bytes) -> Any:
        targets = trust.add_target(
            None, self.root, self.signer, target_path=trust.target_path_for(NAME, VERSION),
            length=len(data), sha256=hashlib.sha256(data).hexdigest(), custom={},
        )
        return api(client, "POST", f"/api/v1/models/{NAME}/versions", files={
            "bundle": ("bundle.tar", data, "application/x-tar"),
            "targets": ("targets.json", targets, "application/json"),
        })


@pytest.fixture
def operator(client: TestClient, tmp_path: Path) -> Operator:
    return Operator(client, tmp_path / "ops" / "release.key")


def assert_refused_and_nothing_stored(response: Any, ctx: ControllerContext, client: TestClient, match: str) -> None:
    assert response.status_code == 400, response.text[:500]
    body = response.json()
    assert body["error"] in ("bad_bundle", "invalid_input")
    assert match in body["message"], body["message"]
    assert api(client, "GET", "/api/v1/models").json() == []
    stored = [p for p in ctx.settings.artifact_root.rglob("*") if p.is_file()]
    assert stored == []
    spool = ctx.settings.data_dir / "tmp"
    assert not spool.exists() or list(spool.iterdir()) == []


# -- hostile bundles --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], bytes]:
    root = tmp_path_factory.mktemp("real")
    model = root / "m.onnx"
    model.write_bytes(synthetic_models.classifier(0, input_shape=(-1, 3, 8, 8), channels=4))
    manifest = build_bundle(root / "b.tar", name=NAME, version=VERSION, task="classification",
                            model_files={"any": model})
    return manifest.to_dict(), model.read_bytes()


def _info(name: str, size: int, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, linkname
    return info


def _tar(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    for info, data in members:
        out.write(info.tobuf(format=fmt, encoding="utf-8", errors="surrogateescape"))
        out.write(data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))
    return out.getvalue() + b"\0" * (2 * tarfile.BLOCKSIZE)


def _bundle(manifest: dict[str, Any], model: bytes, *extra: tuple[tarfile.TarInfo, bytes],
            fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A bundle whose manifest states the model's true size and hash, plus `extra` members."""
    manifest = json.loads(json.dumps(manifest))
    manifest["variants"][0].update(size=len(model), sha256=hashlib.sha256(model).hexdigest())
    body = json.dumps(manifest).encode()
    return _tar([(_info(MANIFEST_NAME, len(body)), body), (_info("model.onnx", len(model)), model), *extra], fmt)


def _raw_manifest(body: bytes) -> bytes:
    return _tar([(_info(MANIFEST_NAME, len(body)), body)])


Builder = Callable[[dict[str, Any], bytes], bytes]

# Each hostile archive, and a phrase its refusal must contain (the same on both sides).
ARCHIVES: dict[str, tuple[Builder, str]] = {
    "path-traversal": (lambda m, b: _bundle(m, b, (_info("../../pwned", 1), b"x")), "path traversal"),
    "absolute-path": (lambda m, b: _bundle(m, b, (_info("/tmp/pwned", 1), b"x")), "absolute path"),
    "symlink": (lambda m, b: _bundle(m, b, (_info("pwned", 0, tarfile.SYMTYPE, "/etc/passwd"), b"")),
                "symbolic link"),
    "hard-link": (lambda m, b: _bundle(m, b, (_info("pwned", 0, tarfile.LNKTYPE, "/etc/passwd"), b"")),
                  "hard link"),
    "char-device": (lambda m, b: _bundle(m, b, (_info("pwned", 0, tarfile.CHRTYPE), b"")), "device or FIFO"),
    "fifo": (lambda m, b: _bundle(m, b, (_info("pwned", 0, tarfile.FIFOTYPE), b"")), "device or FIFO"),
    "duplicate-member": (lambda m, b: _bundle(m, b, (_info("model.onnx", len(b)), b)), "appears twice"),
    "too-many-members": (lambda m, b: _bundle(m, b, *[(_info(f"f{i}", 1), b"x") for i in range(70)]),
                         "more than 64 files"),
    "member-over-protobuf-limit": (lambda m, b: _bundle(m, b"", fmt=tarfile.PAX_FORMAT)[: -2 * tarfile.BLOCKSIZE]
                                   + _tar([(_info("model-x.onnx", 3 * 1024**3), b"")]), "2 GiB"),
    "gzip-bomb": (lambda m, b: gzip.compress(b"\0" * (32 * 1024 * 1024)), "gzip-compressed"),
    "non-utf8-name": (lambda m, b: _bundle(m, b, (_info("pwn\udcffed", 1), b"x"), fmt=tarfile.GNU_FORMAT),
                      "not valid UTF-8"),
    "over-long-name": (lambda m, b: _bundle(m, b, (_info("p" * 4000, 1), b"x")), "longer than 128 characters"),
    "huge-pax-header": (lambda m, b: _info("././@PaxHeader", 1024**3, tarfile.XHDTYPE).tobuf(tarfile.USTAR_FORMAT)
                        + _bundle(m, b), "tar extension header"),
    "deeply-nested-manifest": (lambda m, b: _raw_manifest(b'{"profile": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
                               "nests JSON too deeply"),
    "nan-in-manifest": (lambda m, b: _raw_manifest(b'{"release": NaN}'), "holds NaN"),
    "unlisted-member": (lambda m, b: _bundle(m, b, (_info("extra.bin", 1), b"x")), "not listed by the manifest"),
}


@pytest.mark.parametrize("kind", sorted(ARCHIVES))
def test_hostile_archive_is_refused_at_push(
    kind: str, client: TestClient, ctx: ControllerContext, operator: Operator, real: tuple[dict[str, Any], bytes]
) -> None:
    """Attack: a release-signed bundle archive built to escape, exhaust or confuse the reader, pushed.

    Asserted: 400 naming the problem, no version listed, no bytes in the artifact store or the spool.
    """
    build, match = ARCHIVES[kind]
    response = operator.push(client, build(*real))
    assert_refused_and_nothing_stored(response, ctx, client, match)


@pytest.mark.parametrize("kind", sorted(ARCHIVES))
def test_hostile_archive_is_refused_by_device_staging(
    kind: str, tmp_path: Path, real: tuple[dict[str, Any], bytes]
) -> None:
    """Attack: the same archives reaching a device's stage step (extraction into a slot staging dir).

    Asserted: `BundleError` naming the problem, the staging dir removed, no file written anywhere else.
    """
    build, match = ARCHIVES[kind]
    store = ModelStore(tmp_path / "agent")
    tar = store.download_path(NAME, VERSION)
    tar.write_bytes(build(*real))
    before = sorted(p for p in tmp_path.rglob("*"))
    staging = store.staging_dir(NAME, VERSION)
    with pytest.raises(BundleError, match=match.replace("(", r"\(")):
        extract_bundle(tar, staging)
    assert not staging.exists()
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "pwned").exists() and not Path("/tmp/pwned").exists()


# -- model files whose weights live elsewhere -------------------------------------------------------



def _xy_manifest(real_manifest: dict[str, Any]) -> dict[str, Any]:
    return {**real_manifest, "task": "generic", "outputs_layout": {}, "profile": {},
            "inputs": [{"name": "x", "dtype": "float32", "shape": [4]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [4]}]}


@pytest.mark.parametrize("location", ["../../../../etc/passwd", "/etc/passwd", "weights.bin"])
def test_external_data_escape_is_refused_at_push(
    location: str, client: TestClient, ctx: ControllerContext, operator: Operator,
    real: tuple[dict[str, Any], bytes],
) -> None:
    """Attack: an ONNX file whose initializer points at external data outside the bundle (or unlisted).

    Asserted: 400 naming the tensor and the location, nothing stored.
    """
    data = _bundle(_xy_manifest(real[0]), synthetic_models.external_weights_model(location))
    response = operator.push(client, data)
    assert_refused_and_nothing_stored(response, ctx, client, "keeps tensor 'W' in external data")
    assert repr(location) in response.json()["message"]


@pytest.mark.parametrize("location", ["../outside/weights.bin", "ABSOLUTE", "weights.bin"])
def test_external_data_escape_is_refused_before_onnx_runtime_opens_it(
    location: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real: tuple[dict[str, Any], bytes]
) -> None:
    """Attack: a model in a device slot whose weights point at a real file outside the slot.

    Asserted: `ModelLoadError` naming external data, and ONNX Runtime is never asked to open the file.
    """
    slot, outside = tmp_path / "slot", tmp_path / "outside"
    slot.mkdir()
    outside.mkdir()
    for target in (outside / "weights.bin", slot / "weights.bin"):
        synthetic_models.EXTERNAL_WEIGHTS.tofile(target)
    if location == "ABSOLUTE":
        location = str(outside / "weights.bin")
    (slot / "model.onnx").write_bytes(synthetic_models.external_weights_model(location))
    opened: list[Any] = []
    monkeypatch.setattr(runtime.ort, "InferenceSession", lambda *a, **k: opened.append(a))
    manifest = Manifest.from_dict(_xy_manifest(real[0]))
    with pytest.raises(ModelLoadError, match="keeps tensor 'W' in external data"):
        runtime.load_model(slot / "model.onnx", manifest, [runtime.CPU])
    assert opened == []


def test_symlinked_model_in_a_slot_is_refused(tmp_path: Path, real: tuple[dict[str, Any], bytes]) -> None:
    """Attack: a slot's model file replaced by a symbolic link to a file elsewhere.

    Asserted: `ModelLoadError` saying it is a symbolic link.
    """
    manifest, model = real
    elsewhere = tmp_path / "elsewhere.onnx"
    elsewhere.write_bytes(model)
    slot = tmp_path / "slot"
    slot.mkdir()
    (slot / "model.onnx").symlink_to(elsewhere)
    with pytest.raises(ModelLoadError, match="symbolic link"):
        runtime.load_model(slot / "model.onnx", Manifest.from_dict(manifest), [runtime.CPU])


# -- manifests that lie -----------------------------------------------------------------------------


def _lying(manifest: dict[str, Any]) -> dict[str, Any]:
    lying = json.loads(json.dumps(manifest))
    lying["inputs"][0]["shape"] = [-1, 3, 32, 32]
    lying["inputs"][0]["dtype"] = "float16"
    return lying


def test_lying_manifest_is_refused_at_push_with_both_values(
    client: TestClient, ctx: ControllerContext, operator: Operator, real: tuple[dict[str, Any], bytes]
) -> None:
    """Attack: a manifest declaring an input dtype and shape the model does not have.

    Asserted: 400 whose message gives the manifest's and the model's values, nothing stored.
    """
    manifest, model = real
    response = operator.push(client, _bundle(_lying(manifest), model))
    assert_refused_and_nothing_stored(response, ctx, client, "does not match its manifest")
    message = response.json()["message"]
    assert "input 'input': manifest says float16, model has float32" in message
    assert "input 'input' dim 2: manifest says 32, model has 8" in message


def test_lying_manifest_is_refused_at_device_load_with_both_values(
    tmp_path: Path, real: tuple[dict[str, Any], bytes]
) -> None:
    """Attack: the same lying manifest reaching a device (say, a bundle from an older controller).

    Asserted: `ModelLoadError` with the manifest's and the model's values.
    """
    manifest, model = real
    (tmp_path / "model.onnx").write_bytes(model)
    with pytest.raises(ModelLoadError) as info:
        runtime.load_model(tmp_path / "model.onnx", Manifest.from_dict(_lying(manifest)), [runtime.CPU])
    assert "manifest says float16, model has float32" in str(info.value)
    assert "dim 2: manifest says 32, model has 8" in str(info.value)


@pytest.mark.parametrize("cut", [0, 64, -16])
def test_truncated_or_junk_model_is_refused_at_push(
    cut: int, client: TestClient, ctx: ControllerContext, operator: Operator, real: tuple[dict[str, Any], bytes]
) -> None:
    """Attack: a bundle whose model file is truncated or is not protobuf (hashes in the manifest match).

    Asserted: 400 saying it is not an ONNX model (or fails the checker), nothing stored.
    """
    manifest, model = real
    broken = model[:cut] if cut else b"PK\x03\x04 this is a zip, not a model" * 4
    response = operator.push(client, _bundle(manifest, broken))
    assert response.status_code == 400, response.text
    message = response.json()["message"]
    assert "is not an ONNX model" in message or "fails the ONNX checker" in message, message
    assert_refused_and_nothing_stored(response, ctx, client, "model.onnx")


# -- REST bodies ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "phrase"),
    [
        (b"{" * 10 + b'"x"', 422, "invalid request"),
        (b"[" * 30_000 + b"]" * 30_000, 400, "nests JSON too deeply"),
        (b'{"model": ' + b"[" * 40 + b"]" * 40 + b"}", 400, "levels deep"),
        (b'{"model": "m", "version": "v1", "canary_percent": NaN}', 400, "holds NaN"),
        (b'{"model": Infinity}', 400, "holds Infinity"),
        (b'{"model": ' + b"1" * 6000 + b"}", 400, "not acceptable JSON"),
        (b'{"model": "\xff\xfe"}', 400, "not UTF-8"),
        (b'{"model": "' + b"m" * 70_000 + b'"}', 413, "larger than the limit of 65536 bytes"),
    ],
    ids=["malformed", "deep-array", "too-deep", "nan", "infinity", "huge-int", "non-utf8", "oversized"],
)
def test_hostile_rest_body_is_a_clear_client_error(client: TestClient, body: bytes, status: int, phrase: str) -> None:
    """Attack: a JSON body built to crash the parser or the error handler (each case by id).

    Asserted: the stated 4xx with the API's error shape and a message naming the problem; never 500.
    """
    for content_type in ("application/json", None):
        headers = {"content-type": content_type} if content_type else {}
        response = api(client, "POST", "/api/v1/rollouts", content=body, headers=headers)
        assert response.status_code == status, response.text[:300]
        payload = response.json()
        assert set(payload) == {"error", "message", "details"}
        assert phrase in json.dumps(payload), payload


def test_oversized_streamed_upload_is_413(client: TestClient, ctx: ControllerContext) -> None:
    """Attack: a bundle upload streamed without Content-Length, far above the upload limit.

    Asserted: 413 in the error shape, nothing stored.
    """

    def chunks() -> Iterator[bytes]:
        # Well-formed multipart, so the parser keeps reading: one part far above the limit.
        yield b'--x\r\nContent-Disposition: form-data; name="bundle"; filename="b.tar"\r\n'
        yield b"Content-Type: application/x-tar\r\n\r\n"
        for _ in range(32):
            yield b"\0" * (1024 * 1024)
        yield b"\r\n--x--\r\n"

    response = api(client, "POST", f"/api/v1/models/{NAME}/versions", content=chunks(),
                   headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413, response.text[:300]
    assert response.json()["error"] == "payload_too_large"
    assert [p for p in ctx.settings.artifact_root.rglob("*") if p.is_file()] == []
