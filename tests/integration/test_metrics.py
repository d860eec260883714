"""/metrics on the controller, parsed with prometheus_client's own parser.

Fleet state comes from the database at scrape time; request metrics count REST and gRPC calls
with route templates (never raw ids) and status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from fleet.controller.server import Controller

from .agent_client import AUTH, DeviceIdentity, run_with_controller, token


def families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def test_metrics_report_fleet_state_and_requests(tmp_path: Path) -> None:
    async def scenario(controller: Controller, target: str, url: str) -> None:
        tok = await token(url, uses=2)
        await DeviceIdentity(controller, "cam-1").enroll(tok, labels={"site": "north"})
        await DeviceIdentity(controller, "cam-2").enroll(tok, labels={"site": "south"})
        with contextlib.suppress(grpc.aio.AioRpcError):
            await DeviceIdentity(controller, "cam-3").enroll("made-up")
        async with httpx.AsyncClient(base_url=url, headers=AUTH) as client:
            assert (await client.get("/api/v1/devices/cam-1")).status_code == 200
            assert (await client.get("/api/v1/devices/nope")).status_code == 404
            response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        metrics = families(response.text)

        devices = {(labels["state"], labels["group"]): value for labels, value in metrics["fleet_devices"]}
        assert devices == {("offline", "north"): 1.0, ("offline", "south"): 1.0}
        phases = {labels["phase"]: value for labels, value in metrics["fleet_rollouts"]}
        assert set(phases) == {"Pending", "Progressing", "Paused", "Completed", "RolledBack", "Aborted"}
        assert sum(phases.values()) == 0

        http = {(labels["route"], labels["code"]): value for labels, value in metrics["fleet_http_requests_total"]}
        assert http[("/api/v1/devices/{device_id}", "200")] == 1.0
        assert http[("/api/v1/devices/{device_id}", "404")] == 1.0
        assert not any("cam-1" in route for route, _ in http), "raw ids must not become labels"
        calls = {(labels["method"], labels["code"]): value for labels, value in metrics["fleet_grpc_requests_total"]}
        assert calls[("Enroll", "OK")] == 2.0
        assert calls[("Enroll", "UNAUTHENTICATED")] == 1.0
        assert any(name == "fleet_http_request_duration_seconds_bucket" for name in metrics)

    run_with_controller(tmp_path, scenario)


def test_metrics_route_needs_no_database_writes(tmp_path: Path) -> None:
    async def scenario(controller: object, target: str, url: str) -> None:
        async with httpx.AsyncClient(base_url=url, headers=AUTH) as client:
            first = (await client.get("/metrics")).text
            second = (await client.get("/metrics")).text
        assert "fleet_devices" in first and "fleet_gate_verdicts_total" in second
        await asyncio.sleep(0)

    run_with_controller(tmp_path, scenario)  # type: ignore[arg-type]
