"""Protobuf <-> plain dicts, in one place.

Inside each process, desired state, actual state and telemetry travel as plain dicts with the
proto's field names (docs/ARCHITECTURE.md lists the shapes); only this module knows both forms.
`json_format` is not used for the hot shapes because it turns int64 into strings and drops
unset messages, which would make the dicts differ from what the rest of the code expects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fleet.proto.fleet.v1 import fleet_pb2 as pb

_BUNDLE_FIELDS = ("version", "url", "sha256", "length", "target_path")
_STATUS_FIELDS = (
    "target_version", "target_role", "state", "error", "failed_version", "attempt", "updated_at_ms",
    "bytes_done", "bytes_total",
)
_AGREEMENT_FIELDS = (
    "output", "samples", "cosine_sum", "cosine_min", "mean_abs_diff_sum", "max_abs_diff", "top1_agree",
    "top1_samples",
)
_HARDWARE_SCALARS = ("hardware_class", "arch", "cpu_count", "memory_bytes", "os")


# -- hardware -------------------------------------------------------------------------------

def hardware_to_pb(hw: Mapping[str, Any]) -> pb.HardwareProfile:
    msg = pb.HardwareProfile(**{k: hw[k] for k in _HARDWARE_SCALARS if hw.get(k) is not None})
    msg.accelerators.extend(hw.get("accelerators", []))
    msg.execution_providers.extend(hw.get("execution_providers", []))
    return msg


def hardware_from_pb(msg: pb.HardwareProfile) -> dict[str, Any]:
    out: dict[str, Any] = {k: getattr(msg, k) for k in _HARDWARE_SCALARS}
    out["accelerators"] = list(msg.accelerators)
    out["execution_providers"] = list(msg.execution_providers)
    return out


# -- desired state --------------------------------------------------------------------------

def _bundle_to_pb(ref: Mapping[str, Any] | None, into: pb.BundleRef) -> None:
    if ref:
        into.CopyFrom(pb.BundleRef(**{k: ref[k] for k in _BUNDLE_FIELDS if ref.get(k) is not None}))


def _bundle_from_pb(msg: pb.ModelAssignment, field: str) -> dict[str, Any] | None:
    if not msg.HasField(field):
        return None
    ref = getattr(msg, field)
    return {k: getattr(ref, k) for k in _BUNDLE_FIELDS}


def desired_to_pb(desired: Mapping[str, Any]) -> pb.DesiredState:
    msg = pb.DesiredState(
        generation=int(desired.get("generation", 0)),
        telemetry_interval_ms=int(desired.get("telemetry_interval_ms", 0)),
    )
    for model in desired.get("models", []):
        item = msg.models.add(
            model=model["model"],
            shadow_sample_rate=float(model.get("shadow_sample_rate") or 0.0),
            rollout=model.get("rollout") or "",
        )
        _bundle_to_pb(model.get("serving"), item.serving)
        _bundle_to_pb(model.get("shadow"), item.shadow)
    return msg


def desired_from_pb(msg: pb.DesiredState) -> dict[str, Any]:
    return {
        "generation": msg.generation,
        "telemetry_interval_ms": msg.telemetry_interval_ms,
        "models": [
            {
                "model": m.model,
                "serving": _bundle_from_pb(m, "serving"),
                "shadow": _bundle_from_pb(m, "shadow"),
                "shadow_sample_rate": m.shadow_sample_rate,
                "rollout": m.rollout,
            }
            for m in msg.models
        ],
    }


# -- actual state ---------------------------------------------------------------------------

def actual_to_pb(actual: Mapping[str, Any], into: pb.ActualState | None = None) -> pb.ActualState:
    msg = into if into is not None else pb.ActualState()
    msg.desired_generation = int(actual.get("desired_generation", 0))
    for model in actual.get("models", []):
        item = msg.models.add(model=model["model"])
        for slot in model.get("slots", []):
            s = item.slots.add(
                role=slot.get("role", ""),
                version=slot.get("version", ""),
                sha256=slot.get("sha256", ""),
                loaded=bool(slot.get("loaded", False)),
            )
            s.execution_providers.extend(slot.get("execution_providers", []))
        update = model.get("update") or {}
        item.update.CopyFrom(pb.UpdateStatus(**{k: update[k] for k in _STATUS_FIELDS if update.get(k) is not None}))
    return msg


def actual_from_pb(msg: pb.ActualState) -> dict[str, Any]:
    return {
        "desired_generation": msg.desired_generation,
        "models": [
            {
                "model": m.model,
                "slots": [
                    {
                        "role": s.role,
                        "version": s.version,
                        "sha256": s.sha256,
                        "loaded": s.loaded,
                        "execution_providers": list(s.execution_providers),
                    }
                    for s in m.slots
                ],
                "update": {k: getattr(m.update, k) for k in _STATUS_FIELDS},
            }
            for m in msg.models
        ],
    }


# -- telemetry ------------------------------------------------------------------------------

def histogram_to_pb(hist: Mapping[str, Any] | None, into: pb.LatencyHistogram) -> None:
    if not hist:
        return
    into.relative_accuracy = float(hist.get("relative_accuracy", 0.0))
    for key, n in dict(hist.get("buckets", {})).items():
        into.buckets[int(key)] = int(n)
    into.zero_count = int(hist.get("zero_count", 0))
    into.count = int(hist.get("count", 0))
    into.sum = float(hist.get("sum", 0.0))
    into.min = float(hist.get("min", 0.0))
    into.max = float(hist.get("max", 0.0))


def histogram_from_pb(msg: pb.LatencyHistogram) -> dict[str, Any]:
    return {
        "relative_accuracy": msg.relative_accuracy,
        "buckets": {str(k): v for k, v in sorted(msg.buckets.items())},
        "zero_count": msg.zero_count,
        "count": msg.count,
        "sum": msg.sum,
        "min": msg.min,
        "max": msg.max,
    }


def window_to_pb(window: Mapping[str, Any], into: pb.ModelWindow) -> None:
    into.model = window["model"]
    into.version = window["version"]
    into.role = window["role"]
    into.compared_to = window.get("compared_to") or ""
    into.requests = int(window.get("requests", 0))
    into.errors = int(window.get("errors", 0))
    into.mirrored = int(window.get("mirrored", 0))
    into.shadow_dropped = int(window.get("shadow_dropped", 0))
    histogram_to_pb(window.get("latency_ms"), into.latency_ms)
    histogram_to_pb(window.get("paired_serving_latency_ms"), into.paired_serving_latency_ms)
    histogram_to_pb(window.get("cpu_ms"), into.cpu_ms)
    histogram_to_pb(window.get("paired_serving_cpu_ms"), into.paired_serving_cpu_ms)
    for agreement in window.get("agreement", []):
        item = into.agreement.add(**{k: agreement[k] for k in _AGREEMENT_FIELDS if k in agreement})
        for key, value in (agreement.get("sums") or {}).items():
            item.sums[key] = float(value)
        for key, value in (agreement.get("confusion") or {}).items():
            item.confusion[key] = int(value)
    for drift in window.get("drift") or []:
        into.drift.add(
            feature=drift["feature"], kind=drift.get("kind", ""), type=drift.get("type", ""),
            counts=[int(c) for c in drift.get("counts", [])],
            reference=[float(r) for r in drift.get("reference", [])],
            samples=int(drift.get("samples", 0)),
            psi=float(drift.get("psi", 0.0)), ks=float(drift.get("ks", 0.0)), js=float(drift.get("js", 0.0)),
        )
    into.profile_source = window.get("profile_source") or ""


def window_from_pb(msg: pb.ModelWindow) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": msg.model,
        "version": msg.version,
        "role": msg.role,
        "compared_to": msg.compared_to,
        "requests": msg.requests,
        "errors": msg.errors,
        "mirrored": msg.mirrored,
        "shadow_dropped": msg.shadow_dropped,
        "latency_ms": histogram_from_pb(msg.latency_ms) if msg.HasField("latency_ms") else None,
        "paired_serving_latency_ms": (
            histogram_from_pb(msg.paired_serving_latency_ms) if msg.HasField("paired_serving_latency_ms") else None
        ),
        "cpu_ms": histogram_from_pb(msg.cpu_ms) if msg.HasField("cpu_ms") else None,
        "paired_serving_cpu_ms": (
            histogram_from_pb(msg.paired_serving_cpu_ms) if msg.HasField("paired_serving_cpu_ms") else None
        ),
        "agreement": [
            {**{k: getattr(a, k) for k in _AGREEMENT_FIELDS}, "sums": dict(a.sums), "confusion": dict(a.confusion)}
            for a in msg.agreement
        ],
        "drift": [
            {"feature": d.feature, "kind": d.kind, "type": d.type, "counts": list(d.counts),
             "reference": list(d.reference), "samples": d.samples, "psi": d.psi, "ks": d.ks, "js": d.js}
            for d in msg.drift
        ],
        "profile_source": msg.profile_source,
    }
    return out


def batch_to_pb(batch: Mapping[str, Any], into: pb.TelemetryBatch) -> None:
    into.seq = int(batch["seq"])
    into.window_start_ms = int(batch.get("window_start_ms", 0))
    into.window_end_ms = int(batch.get("window_end_ms", 0))
    for window in batch.get("windows", []):
        window_to_pb(window, into.windows.add())
    for event in batch.get("events", []):
        into.events.add(
            model=event.get("model", ""),
            version=event.get("version", ""),
            role=event.get("role", ""),
            state=event.get("state", ""),
            reason=event.get("reason", ""),
            at_ms=int(event.get("at_ms", 0)),
        )


def batch_from_pb(msg: pb.TelemetryBatch) -> dict[str, Any]:
    return {
        "seq": msg.seq,
        "window_start_ms": msg.window_start_ms,
        "window_end_ms": msg.window_end_ms,
        "windows": [window_from_pb(w) for w in msg.windows],
        "events": [
            {"model": e.model, "version": e.version, "role": e.role, "state": e.state, "reason": e.reason,
             "at_ms": e.at_ms}
            for e in msg.events
        ],
    }


def report_to_pb(
    device_id: str, batches: list[Mapping[str, Any]], actual: Mapping[str, Any] | None
) -> pb.TelemetryReport:
    msg = pb.TelemetryReport(device_id=device_id)
    for batch in batches:
        batch_to_pb(batch, msg.batches.add())
    if actual is not None:
        actual_to_pb(actual, msg.state)
    return msg
