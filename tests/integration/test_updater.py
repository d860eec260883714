"""The per-model updater against real parts: bundles, an HTTP server, ONNX Runtime, the model host.

Given a device serving `det:v1`, when an update to `v2` fails or the agent crashes at any state,
then `det` keeps answering from a verified model, the status says why, and after a restart the
chain of states follows the transition table. Only the trust client is a fake here (it returns
the true length and hash of each bundle); real signatures are tested in the trust tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import io
import itertools
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fleet.agent.inference import ModelHost
from fleet.agent.slots import ModelStore
from fleet.agent.updater import FAULT_SWITCHED_COMMIT, FAULT_SWITCHED_ROLLBACK, ModelUpdater
from fleet.core import update as um
from fleet.core.bundle import build_bundle, manifest_json
from fleet.core.errors import FleetError, SignatureError
from fleet.core.manifest import Manifest
from fleet.core.synthetic_models import classifier

MODEL = "det"
HARDWARE = {"hardware_class": "cpu", "accelerators": [], "execution_providers": ["CPUExecutionProvider"]}
D, V, S, L, SH, C, R = (um.DOWNLOADING, um.VERIFYING, um.STAGING, um.LOADING, um.SHADOWING, um.COMMITTING,
                        um.ROLLING_BACK)
CS, RS = FAULT_SWITCHED_COMMIT, FAULT_SWITCHED_ROLLBACK


class Crash(BaseException):
    """Escapes every `except Exception`, like the process dying at that instant."""


class InjectedError(FleetError):
    code = "injected"


# -- bundles and the server ------------------------------------------------------------------------


def _onnx(tmp: Path, seed: int) -> Path:
    path = tmp / f"model-{seed}.onnx"
    path.write_bytes(classifier(seed, channels=4))
    return path


def _not_onnx_bundle(path: Path, version: str, like: Manifest) -> None:
    """A well-formed bundle whose model file is not ONNX (its hash is right, so only loading fails)."""
    junk = b"this is not an onnx model " * 40
    raw = like.to_dict()
    raw["version"] = version
    raw["variants"] = [{"hardware": "any", "file": "model.onnx", "sha256": hashlib.sha256(junk).hexdigest(),
                        "size": len(junk), "providers": []}]
    manifest = manifest_json(Manifest.from_dict(raw))
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("manifest.json", manifest), ("model.onnx", junk)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@dataclass
class Served:
    """The files the HTTP server offers (path -> bytes) and what it was asked for."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        served: Served = self.server.served  # type: ignore[attr-defined]
        served.requests.append(self.path)
        body = served.files.get(self.path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        header = self.headers.get("Range")
        if header:
            start = int(header.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the agent hanging up on an oversized body is part of some tests


@dataclass
class Release:
    """One bundle as the controller would offer it: its bytes, BundleRef and signed target."""

    version: str
    data: bytes

    @property
    def target_path(self) -> str:
        return f"{MODEL}/{self.version}/bundle.tar"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def ref(self, **override: Any) -> dict[str, Any]:
        out = {"version": self.version, "url": f"/bundles/{self.target_path}", "sha256": self.sha256,
               "length": len(self.data), "target_path": self.target_path}
        out.update(override)
        return out


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Release]:
    tmp = tmp_path_factory.mktemp("bundles")
    out: dict[str, Release] = {}
    manifest = None
    for seed, version in ((1, "v1"), (2, "v2"), (3, "v3")):
        path = tmp / f"{version}.tar"
        manifest = build_bundle(path, name=MODEL, version=version, task="classification",
                                model_files={"any": _onnx(tmp, seed)})
        out[version] = Release(version, path.read_bytes())
    assert manifest is not None
    _not_onnx_bundle(tmp / "junk.tar", "v9", manifest)
    out["v9"] = Release("v9", (tmp / "junk.tar").read_bytes())
    return out


class FakeTrust:
    """Returns what the release metadata would sign: the true length and hash of each bundle."""

    def __init__(self, releases: dict[str, Release]) -> None:
        self.signed = {r.target_path: (len(r.data), r.sha256, {"model": MODEL, "version": r.version,
                                                               "release": int(r.version[1:]), "hardware": ["any"]})
                       for r in releases.values()}
        self.min_releases: dict[str, int] = {}
        self.refreshes = 0

    def refresh(self) -> None:
        self.refreshes += 1

    def target_info(self, target_path: str) -> tuple[int, str, dict[str, Any]]:
        if target_path not in self.signed:
            raise SignatureError(f"no release-signed target {target_path!r}")
        return self.signed[target_path]

    def min_release(self, model: str) -> int:
        return self.min_releases.get(model, 0)

    def sign_custom(self, rel: Release, /, **custom: Any) -> None:
        """Re-sign `rel`'s target with other custom fields (None removes a field)."""
        length, sha, old = self.signed[rel.target_path]
        merged = {k: v for k, v in {**old, **custom}.items() if v is not None}
        self.signed[rel.target_path] = (length, sha, merged)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Device:
    """One agent's world: data dir, server, trust, clock; `boot()` starts a fresh process' updater."""

    root: Path
    served: Served
    base_url: str
    trust: FakeTrust
    client: httpx.Client
    clock: Clock = field(default_factory=Clock)
    points: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    hosts: list[ModelHost] = field(default_factory=list)

    def boot(self, fail_at: str | None = None, raise_: Callable[[], BaseException] | None = None
             ) -> tuple[ModelUpdater, ModelHost]:
        host = ModelHost(workers=1)
        self.hosts.append(host)
        self.points.clear()

        def fault(point: str) -> None:
            self.points.append(point)
            if point == fail_at and raise_ is not None:
                raise raise_()

        updater = ModelUpdater(MODEL, ModelStore(self.root), host, self.trust, self.client, self.base_url,
                               HARDWARE, ["CPUExecutionProvider"], 1, self.events.append, fault=fault,
                               clock=self.clock, warmup_runs=1)
        return updater, host


@pytest.fixture
def device(tmp_path: Path, releases: dict[str, Release]) -> Iterator[Device]:
    served = Served({f"/bundles/{r.target_path}": r.data for r in releases.values()})
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.served = served  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    client = httpx.Client(timeout=5.0)
    base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    dev = Device(tmp_path / "agent", served, base_url, FakeTrust(releases), client)
    try:
        yield dev
    finally:
        for host in dev.hosts:
            host.close()
        client.close()
        httpd.shutdown()
        httpd.server_close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def assignment(serving: Release | None, shadow: Release | None = None, rate: float = 0.5,
               **ref_override: Any) -> dict[str, Any]:
    return {"model": MODEL, "serving": serving.ref(**ref_override) if serving else None,
            "shadow": shadow.ref() if shadow else None, "shadow_sample_rate": rate if shadow else 0.0}


def answers(host: ModelHost, version: str) -> None:
    """The serving model of `det` is `version` and answers a real request through the host."""
    loaded = host.serving(MODEL)
    assert loaded is not None, "nothing serves det"
    inputs = loaded.synthetic_inputs(np.random.default_rng(1))
    served_by, outputs = run(host.infer(MODEL, inputs))
    assert served_by == version
    probs = outputs["probabilities"]
    assert probs.shape == (1, 10) and np.isclose(probs.sum(), 1.0, atol=1e-4)


def legal(chain: list[str]) -> bool:
    """Whether consecutive states (ignoring the `.switched` checkpoints) are rows of the table."""
    states = [p for p in chain if "." not in p]
    rows = set(um.TRANSITIONS.items())
    return all(any(((a, ev), b) in rows for ev in um.EVENTS) for a, b in itertools.pairwise(states))


def install_v1(dev: Device, releases: dict[str, Release]) -> None:
    updater, host = dev.boot()
    run(updater.apply(assignment(releases["v1"])))
    assert updater.status()["state"] == um.IDLE, updater.status()
    answers(host, "v1")


# -- the happy paths -------------------------------------------------------------------------------


def test_fresh_install_walks_the_table_and_reports(device, releases):
    updater, host = device.boot()
    run(updater.recover())
    run(updater.apply(assignment(releases["v1"])))
    assert device.points == [D, V, S, L, C, CS]
    answers(host, "v1")
    status = updater.status()
    assert status | {"updated_at_ms": 0} == {
        "target_version": "v1", "target_role": "serving", "state": "Idle", "error": "", "failed_version": "",
        "attempt": 1, "updated_at_ms": 0, "bytes_done": len(releases["v1"].data),
        "bytes_total": len(releases["v1"].data)}
    assert updater.slots() == [{"role": "serving", "version": "v1", "sha256": releases["v1"].sha256,
                                "loaded": True, "execution_providers": ["CPUExecutionProvider"]}]
    assert [e["state"] for e in device.events][-2:] == [C, um.IDLE]
    assert all(e["model"] == MODEL and e["at_ms"] > 0 for e in device.events)
    store = ModelStore(device.root)
    assert store.load_record(MODEL).serving_version == "v1"
    assert store.verify_version(MODEL, "v1")
    assert list((device.root / "downloads").iterdir()) == []  # the bundle is unpacked, not kept twice
    assert device.trust.refreshes == 1
    # Applying the same desired state again does nothing.
    run(updater.apply(assignment(releases["v1"])))
    assert device.points == [D, V, S, L, C, CS]


def test_shadow_then_promote_switches_without_reloading(device, releases):
    install_v1(device, releases)
    updater, host = device.boot()
    run(updater.apply(assignment(releases["v1"])))  # fresh process: v1 comes back from its slot
    run(updater.apply(assignment(releases["v1"], shadow=releases["v2"], rate=0.25)))
    assert device.points == [D, V, S, L, SH]
    shadow = host.shadow(MODEL)
    assert shadow is not None and shadow.version == "v2"
    assert host.assignment(MODEL).sample_rate == 0.25
    answers(host, "v1")
    assert {s["role"]: s["loaded"] for s in updater.slots()} == {"serving": True, "shadow": True}

    run(updater.apply(assignment(releases["v1"], shadow=releases["v2"], rate=0.75)))  # rate only
    assert host.assignment(MODEL).sample_rate == 0.75 and host.shadow(MODEL) is shadow

    device.points.clear()
    run(updater.apply(assignment(releases["v2"])))
    assert device.points == [C, CS]
    assert host.serving(MODEL) is shadow  # the same warmed session, not a reload
    assert host.shadow(MODEL) is None
    answers(host, "v2")
    rec = updater.record
    assert (rec.serving_version, rec.shadow_version, rec.previous_version) == ("v2", "", "v1")


def test_rollback_to_the_cached_previous_version_needs_no_download(device, releases):
    install_v1(device, releases)
    updater, host = device.boot()
    run(updater.recover())
    run(updater.apply(assignment(releases["v2"])))
    answers(host, "v2")
    asked = len(device.served.requests)
    device.points.clear()
    run(updater.apply(assignment(releases["v1"])))
    assert device.points == [R, RS]
    assert len(device.served.requests) == asked
    answers(host, "v1")
    assert (updater.record.serving_version, updater.record.previous_version) == ("v1", "v2")


def test_dropping_shadow_and_unassigning_the_model(device, releases):
    install_v1(device, releases)
    updater, host = device.boot()
    run(updater.apply(assignment(releases["v1"], shadow=releases["v2"])))
    assert host.shadow(MODEL) is not None
    run(updater.apply(assignment(releases["v1"])))
    assert host.shadow(MODEL) is None and updater.record.shadow_version == ""
    assert not ModelStore(device.root).has_version(MODEL, "v2")  # pruned: neither serving nor previous
    run(updater.apply(None))
    assert host.serving(MODEL) is None
    assert (updater.record.serving_version, updater.record.previous_version) == ("", "v1")
    assert ModelStore(device.root).has_version(MODEL, "v1")  # kept for a quick return


def test_old_versions_are_pruned_but_previous_is_kept(device, releases):
    install_v1(device, releases)
    updater, host = device.boot()
    run(updater.recover())
    run(updater.apply(assignment(releases["v2"])))
    run(updater.apply(assignment(releases["v3"])))
    answers(host, "v3")
    assert ModelStore(device.root).versions(MODEL) == ["v2", "v3"]


# -- failures at every state -----------------------------------------------------------------------

# (the desired state to reach from "v1 serving", the state to fail in, the points expected before)
FAILURE_CASES = [
    ("serve", D, [D]),
    ("serve", V, [D, V]),
    ("serve", S, [D, V, S]),
    ("serve", L, [D, V, S, L]),
    ("serve", C, [D, V, S, L, C]),
    ("shadow", SH, [D, V, S, L, SH]),
    ("rollback", R, [R]),
]


def _setup_for(kind: str, device: Device, releases: dict[str, Release]) -> tuple[dict[str, Any], str, str]:
    """Prepare the device; return (desired state, version serving before, target version)."""
    install_v1(device, releases)
    if kind == "rollback":
        updater, _ = device.boot()
        run(updater.recover())
        run(updater.apply(assignment(releases["v2"])))
        return assignment(releases["v1"]), "v2", "v1"
    if kind == "shadow":
        return assignment(releases["v1"], shadow=releases["v2"]), "v1", "v2"
    return assignment(releases["v2"]), "v1", "v2"


@pytest.mark.parametrize(("kind", "state", "points"), FAILURE_CASES,
                         ids=[f"{k}-{s}" for k, s, _ in FAILURE_CASES])
def test_an_error_in_any_state_fails_the_update_and_serving_goes_on(device, releases, kind, state, points):
    desired, before, target = _setup_for(kind, device, releases)
    updater, host = device.boot(fail_at=state, raise_=lambda: InjectedError(f"injected failure in {state}"))
    run(updater.recover())
    run(updater.apply(desired))

    assert device.points == points
    status = updater.status()
    assert (status["state"], status["failed_version"], status["attempt"]) == (um.FAILED, target, 1)
    assert status["error"] == f"injected failure in {state}"
    answers(host, before)
    if kind == "shadow":
        assert host.shadow(MODEL) is None
    assert ModelStore(device.root).load_record(MODEL).state == um.FAILED
    failed = [e for e in device.events if e["state"] == um.FAILED]
    assert failed[-1]["reason"] == f"injected failure in {state}" and failed[-1]["version"] == target
    assert not (device.root / "models" / MODEL / "staging").exists() or not any(
        (device.root / "models" / MODEL / "staging").iterdir())

    # The same desired state does not retry at once...
    device.points.clear()
    run(updater.apply(desired))
    assert device.points == [] and updater.status()["state"] == um.FAILED
    # ...but does after the backoff, as attempt 2.
    device.clock.now += um.retry_delay_s(1) + 1
    updater.fault = None
    run(updater.apply(desired))
    assert updater.status()["state"] == um.IDLE and updater.status()["attempt"] == 2
    if kind == "shadow":
        assert host.shadow(MODEL) is not None and host.shadow(MODEL).version == target
        answers(host, before)
    else:
        answers(host, target)


# -- crashes at every state ------------------------------------------------------------------------

# (desired state, crash point, points after restart, serving at the end, shadow at the end)
CRASH_CASES = [
    ("serve", D, [D, V, S, L, C, CS], "v2", None),
    ("serve", V, [V, S, L, C, CS], "v2", None),
    ("serve", S, [V, S, L, C, CS], "v2", None),
    ("serve", L, [L, C, CS], "v2", None),
    ("serve", C, [C, CS], "v2", None),
    ("serve", CS, [C], "v2", None),
    ("shadow", D, [D, V, S, L, SH], "v1", "v2"),
    ("shadow", L, [L, SH], "v1", "v2"),
    ("shadow", SH, [L, SH], "v1", "v2"),
    ("rollback", R, [R, RS], "v1", None),
    ("rollback", RS, [R], "v1", None),
]


@pytest.mark.parametrize("case", CRASH_CASES, ids=[f"{k}-{p}" for k, p, *_ in CRASH_CASES])
def test_a_crash_in_any_state_recovers_per_the_table(device, releases, case):
    kind, point, after, serving, shadow = case
    desired, before, _ = _setup_for(kind, device, releases)
    updater, host = device.boot(fail_at=point, raise_=Crash)
    run(updater.recover())
    with pytest.raises(Crash):
        run(updater.apply(desired))
    crashed_in = point.split(".")[0]
    assert ModelStore(device.root).load_record(MODEL).state == crashed_in
    host.close()

    # A new process: fresh host, fresh updater, same disk.
    updater, host = device.boot()
    run(updater.recover())
    assert device.points == after
    assert legal([crashed_in, *after, um.IDLE])
    assert updater.status()["state"] == um.IDLE, updater.status()
    answers(host, serving)
    assert (host.shadow(MODEL).version if host.shadow(MODEL) else None) == shadow
    # The desired state is then already met: nothing more happens.
    device.points.clear()
    run(updater.apply(desired))
    assert device.points == []
    answers(host, serving)
    assert before in ("v1", "v2")


def test_a_crash_loop_is_stopped_by_the_loop_guard(device, releases):
    install_v1(device, releases)
    boots = 0
    while True:
        updater, host = device.boot(fail_at=L, raise_=Crash)
        boots += 1
        try:
            run(updater.recover() if boots > 1 else updater.apply(assignment(releases["v2"])))
        except Crash:
            host.close()
            continue
        break
    status = updater.status()
    assert status["state"] == um.FAILED and "update loop detected" in status["error"]
    # Boot 1 enters D, V, S, L (4 entries); boots 2.. re-enter Loading until entry MAX + 1 fails.
    assert boots == 1 + (um.MAX_STATE_ENTRIES - 4) + 1
    answers(host, "v1")


# -- bad bundles -----------------------------------------------------------------------------------


def test_a_tampered_bundle_is_refused(device, releases):
    install_v1(device, releases)
    data = bytearray(releases["v2"].data)
    data[len(data) // 2] ^= 0x01
    device.served.files[f"/bundles/{releases['v2'].target_path}"] = bytes(data)
    updater, host = device.boot()
    run(updater.apply(assignment(releases["v2"])))
    status = updater.status()
    assert status["state"] == um.FAILED and "SHA-256" in status["error"] and "tampered" in status["error"]
    answers(host, "v1")
    assert list((device.root / "downloads").iterdir()) == []


def test_a_bundle_that_is_not_onnx_is_refused(device, releases):
    install_v1(device, releases)
    updater, host = device.boot()
    run(updater.apply(assignment(releases["v9"])))
    status = updater.status()
    assert status["state"] == um.FAILED and status["failed_version"] == "v9"
    assert "is not an ONNX model" in status["error"]
    answers(host, "v1")


def test_a_bundle_longer_than_its_signed_length_is_refused(device, releases):
    install_v1(device, releases)
    rel = releases["v2"]
    device.trust.signed[rel.target_path] = (len(rel.data) - 512, rel.sha256, {"model": MODEL, "version": "v2"})
    updater, host = device.boot()
    run(updater.apply(assignment(rel, length=len(rel.data) - 512)))
    status = updater.status()
    assert status["state"] == um.FAILED and "larger than its signed length" in status["error"]
    answers(host, "v1")
    assert list((device.root / "downloads").iterdir()) == []


def test_a_bundle_ref_that_disagrees_with_the_signed_target_is_refused(device, releases):
    install_v1(device, releases)
    updater, host = device.boot()
    run(updater.apply(assignment(releases["v2"], sha256="0" * 64)))
    status = updater.status()
    assert status["state"] == um.FAILED and "differs from the signed" in status["error"]
    assert device.served.requests.count(f"/bundles/{releases['v2'].target_path}") == 0
    answers(host, "v1")


def test_a_signed_bundle_of_another_version_is_refused(device, releases):
    install_v1(device, releases)
    rel = releases["v3"]
    updater, host = device.boot()
    # The controller points "v2" at v3's signed target: the signed custom fields give it away.
    run(updater.apply(assignment(releases["v2"], url=f"/bundles/{rel.target_path}", sha256=rel.sha256,
                                 length=len(rel.data), target_path=rel.target_path)))
    status = updater.status()
    assert status["state"] == um.FAILED and "not 'v2'" in status["error"]
    answers(host, "v1")


@pytest.mark.parametrize(("custom", "check", "words"), [
    ({"model": None}, "model", "carries no model"),
    ({"version": None}, "version", "carries no version"),
    ({"hardware": ["jetson-orin", "coral"]}, "hardware", "not this device's 'cpu'"),
    ({"release": "7"}, "release", "not a non-negative integer"),
])
def test_assignment_checks_refuse_what_the_signed_target_does_not_allow(device, releases, custom, check, words):
    install_v1(device, releases)
    device.trust.sign_custom(releases["v2"], **custom)
    updater, host = device.boot()
    run(updater.apply(assignment(releases["v2"])))
    status = updater.status()
    assert status["state"] == um.FAILED and words in status["error"], status
    assert device.events[-1]["state"] == um.FAILED and words in device.events[-1]["reason"]
    assert device.served.requests.count(f"/bundles/{releases['v2'].target_path}") == 0
    answers(host, "v1")
    # A non-transient refusal: not retried before the backoff, whatever the controller says.
    assert updater.next_retry_in() is not None and updater.next_retry_in() > 0


def test_a_release_below_the_signed_minimum_is_refused(device, releases):
    install_v1(device, releases)
    device.trust.min_releases[MODEL] = 3
    updater, host = device.boot()
    run(updater.apply(assignment(releases["v2"])))
    status = updater.status()
    assert status["state"] == um.FAILED
    assert "release 2 is below the signed minimum release 3" in status["error"]
    answers(host, "v1")
    # A release at the minimum goes through.
    run(updater.apply(assignment(releases["v3"])))
    answers(host, "v3")


def test_a_cached_previous_version_below_the_signed_minimum_is_not_rolled_back_to(device, releases):
    """A broken-into controller sends the device back to v1, still cached on disk, after the release
    keys raised the minimum: the slot is re-checked against the signed metadata and refused."""
    install_v1(device, releases)
    updater, host = device.boot()
    run(updater.recover())
    run(updater.apply(assignment(releases["v2"])))
    answers(host, "v2")
    device.trust.min_releases[MODEL] = 2
    run(updater.apply(assignment(releases["v1"])))
    status = updater.status()
    assert status["state"] == um.FAILED
    assert "release 1 is below the signed minimum release 2" in status["error"]
    answers(host, "v2")
    assert updater.record.serving_version == "v2"


def test_a_cached_slot_whose_target_is_no_longer_signed_is_not_used(device, releases):
    install_v1(device, releases)
    updater, host = device.boot()
    run(updater.recover())
    run(updater.apply(assignment(releases["v2"])))
    del device.trust.signed[releases["v1"].target_path]
    run(updater.apply(assignment(releases["v1"])))
    assert updater.status()["state"] == um.FAILED
    assert "no release-signed target" in updater.status()["error"]
    answers(host, "v2")


def test_a_device_whose_hardware_is_listed_accepts_the_bundle(device, releases):
    device.trust.sign_custom(releases["v1"], hardware=["cpu", "jetson-orin"])
    install_v1(device, releases)


# -- start-up ----------------------------------------------------------------------------------------


def test_a_corrupt_serving_slot_falls_back_to_previous_at_start(device, releases):
    install_v1(device, releases)
    updater, _ = device.boot()
    run(updater.recover())
    run(updater.apply(assignment(releases["v2"])))
    # A file that still loads fine (another version's weights): only re-hashing can tell.
    model_file = device.root / "models" / MODEL / "versions" / "v2" / "model.onnx"
    model_file.write_bytes(classifier(3, channels=4))

    updater, host = device.boot()
    run(updater.recover())
    answers(host, "v1")
    assert updater.record.serving_version == "v1" and updater.record.previous_version == ""
    assert any("cannot be used after restart" in e["reason"] for e in device.events)
    assert not ModelStore(device.root).has_version(MODEL, "v2")
    # The desired state still says v2: it is downloaded again rather than served corrupt.
    run(updater.apply(assignment(releases["v2"])))
    answers(host, "v2")


def test_a_corrupt_state_file_is_reported_and_the_desired_state_rebuilds(device, releases):
    install_v1(device, releases)
    (device.root / "models" / MODEL / "state.json").write_text("{not json")
    updater, host = device.boot()
    run(updater.recover())
    assert "corrupt" in updater.status()["error"]
    assert (device.root / "models" / MODEL / "state.json.corrupt").read_text() == "{not json"
    run(updater.apply(assignment(releases["v1"])))
    assert device.points == [L, C, CS]  # from the cached, verified slot: no download
    answers(host, "v1")


def test_not_enough_disk_fails_before_downloading(device, releases, monkeypatch):
    install_v1(device, releases)
    updater, host = device.boot()
    monkeypatch.setattr(ModelStore, "free_bytes", lambda self: 1000)
    run(updater.apply(assignment(releases["v2"])))
    status = updater.status()
    assert status["state"] == um.FAILED and "free" in status["error"]
    assert device.served.requests.count(f"/bundles/{releases['v2'].target_path}") == 0
    answers(host, "v1")


def test_a_server_outage_fails_then_the_retry_after_backoff_succeeds(device, releases):
    install_v1(device, releases)
    path = f"/bundles/{releases['v2'].target_path}"
    data = device.served.files.pop(path)
    updater, host = device.boot()
    run(updater.apply(assignment(releases["v2"])))
    status = updater.status()
    assert status["state"] == um.FAILED and "HTTP 404" in status["error"]
    assert updater.next_retry_in() == um.retry_delay_s(1)
    answers(host, "v1")
    device.served.files[path] = data
    device.clock.now += um.retry_delay_s(1)
    assert updater.next_retry_in() == 0.0
    run(updater.apply(assignment(releases["v2"])))
    answers(host, "v2")
    assert updater.next_retry_in() is None
