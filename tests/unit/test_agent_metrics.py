"""The agent's /metrics: cumulative over drained windows, latency buckets exact to the histogram."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleet.agent.metrics import AgentMetrics
from fleet.core.histogram import LatencyHistogram


def window(version: str, role: str, values: list[float], errors: int = 0, dropped: int = 0) -> dict[str, object]:
    hist = LatencyHistogram()
    hist.record_many(values)
    return {"model": "det", "version": version, "role": role, "requests": len(values), "errors": errors,
            "mirrored": len(values) if role == "serving" else 0, "shadow_dropped": dropped,
            "latency_ms": hist.to_dict()}


def samples(metrics: AgentMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_windows_accumulate_and_buckets_are_cumulative() -> None:
    metrics = AgentMetrics(updates=lambda: {"det": {"state": "Shadowing"}})
    metrics.observe_windows([window("v1", "serving", [0.3, 0.7, 3.0], errors=1, dropped=2)])
    metrics.observe_windows([window("v1", "serving", [0.4, 40.0]), window("v2", "shadow", [0.6])])
    got = samples(metrics)
    serving = (("model", "det"), ("role", "serving"), ("version", "v1"))
    assert got[("fleet_agent_inference_requests_total", serving)] == 5
    assert got[("fleet_agent_inference_errors_total", serving)] == 1
    assert got[("fleet_agent_shadow_dropped_total", (("model", "det"),))] == 2
    bucket = lambda le: got[("fleet_agent_inference_latency_ms_bucket", tuple(sorted((*serving, ("le", le)))))]  # noqa: E731
    assert bucket("0.5") == 2 and bucket("1") == 3 and bucket("5") == 4 and bucket("50") == 5 and bucket("+Inf") == 5
    assert got[("fleet_agent_update_state", (("model", "det"), ("state", "Shadowing")))] == 1
    assert got[("fleet_agent_update_state", (("model", "det"), ("state", "Idle")))] == 0
