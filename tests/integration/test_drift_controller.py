"""The controller's drift view over a real app and a real SQLite file.

Given devices in two label groups reporting serving windows through the telemetry store,
when two devices of one group see shifted inputs,
then `GET /api/v1/drift` marks exactly those devices, their group and not the other group as
drifting, with scores recomputed from merged counts, and ignores old windows and thin samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fleet.controller import devices as devices_svc
from fleet.controller import drift as drift_svc
from fleet.controller.access import admin_headers
from fleet.controller.app import create_app
from fleet.controller.context import ControllerContext, build_context
from fleet.controller.db import session_scope
from fleet.controller.models import Device
from fleet.controller.settings import ControllerSettings
from fleet.core import drift as core_drift
from fleet.core.profile import FeatureSpec, build_feature

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

GROUPS = {"cam-00": "a", "cam-01": "a", "cam-02": "a", "cam-03": "b", "cam-04": "b", "cam-05": "b"}
SHIFTED = {"cam-04", "cam-05"}
FEATURE = build_feature(FeatureSpec("input:input:c0", "input", "numeric", "input", "channel_mean", index=0),
                        np.random.default_rng(0).standard_normal(5000))


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ControllerContext]:
    context = build_context(ControllerSettings(data_dir=tmp_path / "controller"))
    with session_scope(context.session_factory) as session:
        for device_id, site in GROUPS.items():
            session.add(Device(id=device_id, labels={"site": site}, secret_hash="-"))
    yield context
    context.close()


def _window(values: np.ndarray, version: str = "v1", feature: dict[str, Any] | None = None) -> dict[str, Any]:
    monitor = core_drift.FeatureMonitor(feature or FEATURE)
    monitor.add(values)
    return {"model": "cls", "version": version, "role": "serving", "requests": int(values.size),
            "drift": [monitor.emit()], "profile_source": "reference"}


def _report(ctx: ControllerContext, device_id: str, seq: int, windows: list[dict[str, Any]],
            end: datetime | None = None) -> None:
    end_ms = int((end or datetime.now(UTC)).timestamp() * 1000)
    with session_scope(ctx.session_factory) as session:
        devices_svc.store_telemetry(session, device_id, [
            {"seq": seq, "window_start_ms": end_ms - 10_000, "window_end_ms": end_ms, "windows": windows}])


def _fleet_reports(ctx: ControllerContext) -> None:
    rng = np.random.default_rng(1)
    for seq in range(3):  # three windows of 100 requests per device
        for device_id in GROUPS:
            shift = 2.0 if device_id in SHIFTED else 0.0
            _report(ctx, device_id, seq, [_window(rng.standard_normal(100) + shift)])


def test_shifted_devices_and_their_group_are_drifting_and_nothing_else(ctx: ControllerContext) -> None:
    _fleet_reports(ctx)
    with TestClient(create_app(ctx), headers=admin_headers(ctx)) as client:
        response = client.get("/api/v1/drift", params={"model": "cls", "group_by": "site"})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["psi_threshold"] == 0.2 and data["min_samples"] == 200 and data["group_by"] == "site"

    devices = {d["device_id"]: d for d in data["devices"]}
    assert {d for d, e in devices.items() if e["drifting"]} == SHIFTED
    assert all(e["samples"] == 300 and e["windows"] == 3 and e["eligible"] for e in devices.values())
    assert devices["cam-04"]["top_feature"] == "input:input:c0" and devices["cam-04"]["max_psi"] > 1.0
    assert devices["cam-00"]["max_psi"] < 0.2 and devices["cam-04"]["group"] == "b"

    groups = {g["group"]: g for g in data["groups"]}
    assert groups["b"]["drifting"] and not groups["a"]["drifting"]
    assert groups["b"]["drifting_devices"] == ["cam-04", "cam-05"] and groups["a"]["drifting_devices"] == []
    merged = groups["b"]["features"][0]
    assert merged["samples"] == 900 and sum(merged["counts"]) == 900  # counts added, not scores averaged
    expected = core_drift.psi(merged["reference"], merged["counts"])
    assert merged["psi"] == pytest.approx(expected)

    (version,) = data["versions"]
    assert version["devices"] == sorted(GROUPS) and version["drifting_devices"] == ["cam-04", "cam-05"]
    assert version["profile_source"] == "reference"


def test_old_windows_and_thin_samples_do_not_count(ctx: ControllerContext) -> None:
    rng = np.random.default_rng(2)
    old = datetime.now(UTC) - timedelta(hours=1)
    _report(ctx, "cam-04", 0, [_window(rng.standard_normal(500) + 3.0)], end=old)
    _report(ctx, "cam-05", 0, [_window(rng.standard_normal(50) + 3.0)])  # under min_samples
    with session_scope(ctx.session_factory) as session:
        report = drift_svc.drift_report(session, drift_svc.DriftPolicy())
        assert [d["device_id"] for d in report["devices"]] == ["cam-05"]
        thin = report["devices"][0]
        assert thin["max_psi"] > 1.0 and not thin["eligible"] and not thin["drifting"]
        wide = drift_svc.drift_report(session, drift_svc.DriftPolicy(since_s=7200, min_samples=20))
        assert {d["device_id"] for d in wide["devices"] if d["drifting"]} == {"cam-04", "cam-05"}
        assert drift_svc.drifting_models(session, "cam-05", drift_svc.DriftPolicy(min_samples=20)) == [
            {"model": "cls", "version": "v1", "max_psi": thin["max_psi"], "top_feature": "input:input:c0"}]


def test_features_on_different_bins_are_combined_by_weighted_mean(ctx: ControllerContext) -> None:
    rng = np.random.default_rng(3)
    # Another device's learned profile with other bins (and so another reference vector).
    other = {**FEATURE, "edges": [0.0], "proportions": [0.5, 0.5]}
    _report(ctx, "cam-00", 0, [_window(rng.standard_normal(300))])
    _report(ctx, "cam-01", 0, [_window(rng.standard_normal(300) * 3, feature=other)])
    with session_scope(ctx.session_factory) as session:
        (version,) = drift_svc.drift_report(session)["versions"]
    (feature,) = version["features"]
    assert feature["combined"] == "mean" and feature["samples"] == 600 and feature["psi"] < 0.2
    assert not version["drifting"]


def test_bad_queries_are_refused_with_a_clear_message(ctx: ControllerContext) -> None:
    with TestClient(create_app(ctx), headers=admin_headers(ctx)) as client:
        response = client.get("/api/v1/drift", params={"version": "v1"})
        assert response.status_code == 400 and "model" in response.json()["message"]
        assert client.get("/api/v1/drift", params={"since_s": -1}).status_code == 422
        empty = client.get("/api/v1/drift").json()
        assert empty["devices"] == [] and empty["groups"] == [] and empty["versions"] == []
