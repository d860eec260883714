"""Prometheus metrics of the agent, served on the device's local metrics port.

The inference host hands out its counters as telemetry windows (deltas, drained every few
seconds); `AgentMetrics.observe_windows` folds each drained window into running totals, so the
exposition is cumulative as Prometheus expects while the host keeps only one window in memory.
Latency is kept as the same mergeable log-bucket histogram the controller uses and converted to
Prometheus buckets at scrape time, so memory stays bounded however long the agent runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from fleet.core.histogram import LatencyHistogram

# Bucket bounds (ms) of the exposed inference latency histogram.
LATENCY_BUCKETS_MS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0)
UPDATE_STATES = ("Idle", "Downloading", "Verifying", "Staging", "Loading", "Shadowing", "Committing",
                 "RollingBack", "Failed")

_Key = tuple[str, str, str]  # model, version, role


class AgentMetrics(Collector):
    def __init__(self, updates: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None) -> None:
        """`updates` returns, per model, its update status dict (for the update-state gauge)."""
        self._lock = threading.Lock()
        self._latency: dict[_Key, LatencyHistogram] = {}
        self._requests: dict[_Key, int] = {}
        self._errors: dict[_Key, int] = {}
        self._mirrored: dict[str, int] = {}
        self._dropped: dict[str, int] = {}
        self._updates = updates
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def observe_windows(self, windows: Iterable[Mapping[str, Any]]) -> None:
        with self._lock:
            for window in windows:
                key = (str(window["model"]), str(window["version"]), str(window["role"]))
                self._requests[key] = self._requests.get(key, 0) + int(window.get("requests", 0))
                self._errors[key] = self._errors.get(key, 0) + int(window.get("errors", 0))
                model = key[0]
                self._mirrored[model] = self._mirrored.get(model, 0) + int(window.get("mirrored", 0))
                self._dropped[model] = self._dropped.get(model, 0) + int(window.get("shadow_dropped", 0))
                raw = window.get("latency_ms")
                if raw:
                    hist = LatencyHistogram.from_dict(raw)
                    if key in self._latency:
                        self._latency[key].merge(hist)
                    else:
                        self._latency[key] = hist

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            latency = {k: h.copy() for k, h in self._latency.items()}
            requests, errors = dict(self._requests), dict(self._errors)
            mirrored, dropped = dict(self._mirrored), dict(self._dropped)
        family = HistogramMetricFamily("fleet_agent_inference_latency_ms",
                                       "Inference latency per model version and slot role (ms).",
                                       labels=["model", "version", "role"])
        for (model, version, role), hist in sorted(latency.items()):
            family.add_metric([model, version, role], _buckets(hist), sum_value=hist.sum)
        yield family
        total = CounterMetricFamily("fleet_agent_inference_requests", "Inference requests per model version and role.",
                                    labels=["model", "version", "role"])
        failed = CounterMetricFamily("fleet_agent_inference_errors", "Inference errors per model version and role.",
                                     labels=["model", "version", "role"])
        for key in sorted(requests):
            total.add_metric(list(key), requests[key])
            failed.add_metric(list(key), errors.get(key, 0))
        yield total
        yield failed
        mirror = CounterMetricFamily("fleet_agent_shadow_mirrored", "Requests mirrored to the shadow model.",
                                     labels=["model"])
        drop = CounterMetricFamily("fleet_agent_shadow_dropped",
                                   "Mirror requests dropped because the shadow queue was full.", labels=["model"])
        for model in sorted(mirrored):
            mirror.add_metric([model], mirrored[model])
            drop.add_metric([model], dropped.get(model, 0))
        yield mirror
        yield drop
        state = GaugeMetricFamily("fleet_agent_update_state", "1 for the update state each model is in.",
                                  labels=["model", "state"])
        for model, status in sorted((self._updates() if self._updates else {}).items()):
            current = str(status.get("state") or "Idle")
            for name in UPDATE_STATES:
                state.add_metric([model, name], 1.0 if name == current else 0.0)
        yield state


def _buckets(hist: LatencyHistogram) -> list[tuple[str, float]]:
    """Cumulative counts at the exposed bounds, from the log-bucket histogram (each of its
    buckets is attributed to its upper edge, so counts are exact to the histogram's accuracy)."""
    gamma = (1 + hist.relative_accuracy) / (1 - hist.relative_accuracy)
    edges = sorted((gamma**index, n) for index, n in hist.buckets.items())
    out: list[tuple[str, float]] = []
    seen, i = hist.zero_count, 0
    for bound in LATENCY_BUCKETS_MS:
        while i < len(edges) and edges[i][0] <= bound:
            seen += edges[i][1]
            i += 1
        out.append((f"{bound:g}", float(seen)))
    out.append(("+Inf", float(hist.count)))
    return out
