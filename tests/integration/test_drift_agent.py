"""Drift on the device: a real ModelHost with real ONNX Runtime sessions.

Given a served model with a reference profile (or none),
when requests are answered,
then the serving window carries per-feature drift and its profile source; without a profile one
is learnt from the first requests, persisted, and reused after a restart; a full drift queue
drops monitoring, never a request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet.agent.drift import DriftTracker
from fleet.agent.inference import ModelHost
from fleet.agent.runtime import LoadedModel, load_model
from fleet.core import profile as prof
from fleet.core import synthetic_models as sm

pytestmark = pytest.mark.timeout(120)
CPU = ["CPUExecutionProvider"]


def _load(folder: Path, profile: dict[str, Any] | None = None, version: str = "v1") -> LoadedModel:
    blob = sm.classifier(1)
    path = folder / f"cls-{version}.onnx"
    path.write_bytes(blob)
    manifest = sm.manifest_for(blob, name="cls", version=version, task="classification")
    if profile is not None:
        manifest = dataclasses.replace(manifest, profile=profile)
    return load_model(path, manifest, CPU)


def _serve(host: ModelHost, n: int, shift: float = 0.0, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)

    async def run() -> None:
        for _ in range(n):
            x = (rng.standard_normal((1, 3, 32, 32)) + shift).astype(np.float32)
            await host.infer("cls", {"input": x})

    asyncio.run(run())
    assert host.drift.wait_idle(10)


def _serving_window(host: ModelHost) -> dict[str, Any]:
    (window,) = [w for w in host.drain_windows() if w["role"] == "serving"]
    return window


def _reference(folder: Path) -> dict[str, Any]:
    loaded = _load(folder, version="ref")
    rng = np.random.default_rng(42)
    requests = []
    for _ in range(400):
        x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
        requests.append(({"input": x}, loaded.run({"input": x})))
    return prof.profile_from_requests(loaded.manifest, requests)


def test_reference_profile_drift_is_low_in_distribution_and_high_after_a_shift(tmp_path: Path) -> None:
    host = ModelHost(workers=1, drift_queue_size=10_000)
    try:
        host.set_serving("cls", _load(tmp_path, _reference(tmp_path)))
        _serve(host, 300, seed=1)
        window = _serving_window(host)
        assert window["profile_source"] == "reference"
        drift = {d["feature"]: d for d in window["drift"]}
        assert set(drift) == {"input:input:c0", "input:input:c1", "input:input:c2",
                              "output:probabilities:max_score", "output:probabilities:class"}
        assert drift["input:input:c0"]["samples"] == 300
        assert max(d["psi"] for d in drift.values()) < 0.2

        _serve(host, 300, shift=2.0, seed=2)
        shifted = {d["feature"]: d for d in _serving_window(host)["drift"]}
        assert min(shifted[f"input:input:c{k}"]["psi"] for k in range(3)) > 1.0
        assert shifted["input:input:c0"]["samples"] == 300  # counts were reset between windows
    finally:
        host.close()


def test_without_a_profile_one_is_learnt_persisted_and_reused(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    host = ModelHost(workers=1, profile_dir=profiles, drift_learn_samples=100, drift_queue_size=10_000)
    try:
        host.set_serving("cls", _load(tmp_path))
        _serve(host, 60, seed=1)
        learning = _serving_window(host)
        assert learning["profile_source"] == "learning" and learning["drift"] == []
        _serve(host, 140, seed=2)
        learned = _serving_window(host)
        assert learned["profile_source"] == "learned"
        assert {d["samples"] for d in learned["drift"] if d["kind"] == "input"} == {100}
        assert (profiles / "cls@v1.json").is_file()
    finally:
        host.close()

    restarted = ModelHost(workers=1, profile_dir=profiles, drift_learn_samples=100, drift_queue_size=10_000)
    try:
        restarted.set_serving("cls", _load(tmp_path))
        _serve(restarted, 20, seed=3)
        window = _serving_window(restarted)
        assert window["profile_source"] == "learned"  # no second learning phase
        assert {d["samples"] for d in window["drift"] if d["kind"] == "input"} == {20}
    finally:
        restarted.close()


def test_a_new_serving_version_replaces_the_old_state(tmp_path: Path) -> None:
    host = ModelHost(workers=1, drift_learn_samples=10_000, drift_queue_size=10_000)
    try:
        host.set_serving("cls", _load(tmp_path, version="v1"))
        _serve(host, 5)
        host.drain_windows()
        host.set_serving("cls", _load(tmp_path, _reference(tmp_path), version="v2"))
        _serve(host, 5)
        window = _serving_window(host)
        assert window["version"] == "v2" and window["profile_source"] == "reference"
        assert host.drift.drain("cls", "v1") == ([], "")
    finally:
        host.close()


def test_a_full_queue_drops_monitoring_without_blocking(tmp_path: Path) -> None:
    tracker = DriftTracker(queue_size=1)
    release = threading.Event()
    entered = threading.Event()
    original = tracker._ingest

    def stuck(*args: Any) -> None:
        entered.set()
        release.wait(10)
        original(*args)

    tracker._ingest = stuck  # type: ignore[method-assign]
    loaded = _load(tmp_path)
    x = {"input": np.zeros((1, 3, 32, 32), np.float32)}
    try:
        assert tracker.observe(loaded, x, {})
        assert entered.wait(5)  # the worker holds the first item
        assert tracker.observe(loaded, x, {})  # fills the queue
        assert not tracker.observe(loaded, x, {})  # dropped at once, never waited for
        assert tracker.dropped == 1
    finally:
        release.set()
        tracker.close()
