"""The fleet's drift: serving windows' per-feature counts merged per device, label group and version.

Rules this module enforces:

- **Scores are recomputed from merged counts.** Devices send counts on the bins of the model's
  profile (`FeatureDrift`); windows of one device, of a label group or of a whole version are
  merged by adding counts, and PSI / KS / JS are computed again on the sums
  (`fleet.core.drift.merge_drift`), never averaged from per-window scores. Counts are added when
  their reference proportions are equal: with a shared reference profile the bins are the same;
  with learned profiles (each device its own quantile edges) equal proportions mean each bin
  holds the same share of its own device's baseline, so the sum tests "every device still matches
  its own baseline", which is the question. Counts whose references differ are scored apart and
  combined as a sample-weighted mean of the scores; such a feature says `"combined": "mean"`.
- **Drifting is a rule, not a feeling.** An entry (a device, group or version) is *drifting* when
  some feature with at least `min_samples` samples has PSI >= `psi_threshold` (defaults 200 and
  0.2, the settings `drift_min_samples` and `drift_psi_threshold`). An entry with no feature at
  `min_samples` is not eligible and never drifting.
- Only serving windows count (drift describes the traffic a model really answers) and only those
  whose window ended within the last `since_s` seconds (default `drift_window_s`, 10 minutes).

Entry shape: `{"model", "version", "samples", "requests", "windows", "profile_source", "features":
[{"feature", "kind", "type", "samples", "psi", "ks", "js", ...}], "max_psi", "max_ks", "max_js",
"top_feature", "eligible", "drifting"}` plus `device_id`/`labels`/`group` for devices, `group`,
`devices`, `drifting_devices` for groups and `devices`, `drifting_devices` for versions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet.controller.models import Device, TelemetryWindow
from fleet.core.drift import merge_drift
from fleet.core.errors import InvalidInputError

DEFAULT_PSI_THRESHOLD = 0.2
DEFAULT_MIN_SAMPLES = 200
DEFAULT_WINDOW_S = 600.0
MAX_WINDOW_S = 7 * 24 * 3600.0
NO_GROUP = "(none)"


@dataclass(frozen=True)
class DriftPolicy:
    psi_threshold: float = DEFAULT_PSI_THRESHOLD
    min_samples: int = DEFAULT_MIN_SAMPLES
    since_s: float = DEFAULT_WINDOW_S

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> DriftPolicy:
        """The policy from controller settings (fields `drift_psi_threshold`, `drift_min_samples`,
        `drift_window_s` when present), with non-None `overrides` on top."""
        values: dict[str, Any] = {
            "psi_threshold": float(getattr(settings, "drift_psi_threshold", DEFAULT_PSI_THRESHOLD)),
            "min_samples": int(getattr(settings, "drift_min_samples", DEFAULT_MIN_SAMPLES)),
            "since_s": float(getattr(settings, "drift_window_s", DEFAULT_WINDOW_S)),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        policy = cls(**values)
        if not 0 < policy.since_s <= MAX_WINDOW_S:
            raise InvalidInputError(f"since_s must be within (0, {MAX_WINDOW_S:.0f}], got {policy.since_s}")
        if policy.psi_threshold <= 0 or policy.min_samples < 1:
            raise InvalidInputError("psi_threshold must be positive and min_samples at least 1")
        return policy


def _ref_key(entry: Mapping[str, Any]) -> tuple[float, ...]:
    # Rounded so that the same profile sent through float64 JSON and protobuf doubles matches.
    return tuple(round(float(r), 9) for r in entry.get("reference", []))


@dataclass
class _FeatureAcc:
    """One feature's counts, kept apart per set of bins."""

    parts: dict[tuple[float, ...], list[Mapping[str, Any]]] = field(default_factory=dict)

    def add(self, entry: Mapping[str, Any]) -> None:
        if not entry.get("counts") or len(entry.get("counts", [])) != len(entry.get("reference", [])):
            return  # a malformed entry cannot be merged; the rest of the window still counts
        self.parts.setdefault(_ref_key(entry), []).append(entry)

    def result(self, detail: bool) -> dict[str, Any] | None:
        merged = [m for m in (merge_drift(p) for p in self.parts.values()) if m is not None]
        if not merged:
            return None
        if len(merged) == 1:
            out = merged[0]
        else:
            total = sum(m["samples"] for m in merged)
            out = {k: merged[0][k] for k in ("feature", "kind", "type")}
            out["samples"] = total
            for score in ("psi", "ks", "js"):
                out[score] = (sum(m[score] * m["samples"] for m in merged) / total) if total else 0.0
            out["combined"] = "mean"
        if not detail:
            out.pop("counts", None)
            out.pop("reference", None)
        return out


@dataclass
class _EntryAcc:
    features: dict[str, _FeatureAcc] = field(default_factory=dict)
    devices: set[str] = field(default_factory=set)
    sources: Counter[str] = field(default_factory=Counter)
    windows: int = 0
    requests: int = 0

    def add(self, device_id: str, requests: int, payload: Mapping[str, Any]) -> None:
        self.devices.add(device_id)
        self.windows += 1
        self.requests += requests
        if payload.get("profile_source"):
            self.sources[str(payload["profile_source"])] += 1
        for entry in payload.get("drift") or []:
            if isinstance(entry, Mapping) and entry.get("feature"):
                self.features.setdefault(str(entry["feature"]), _FeatureAcc()).add(entry)

    def result(self, policy: DriftPolicy, detail: bool) -> dict[str, Any]:
        features = [f for f in (acc.result(detail) for acc in self.features.values()) if f is not None]
        features.sort(key=lambda f: (-f["psi"], f["feature"]))
        eligible = [f for f in features if f["samples"] >= policy.min_samples]
        ranked = eligible or features
        top = ranked[0] if ranked else None
        return {
            "samples": max((f["samples"] for f in features), default=0),
            "requests": self.requests,
            "windows": self.windows,
            "profile_source": self.sources.most_common(1)[0][0] if self.sources else "",
            "features": features,
            "max_psi": max((f["psi"] for f in ranked), default=0.0),
            "max_ks": max((f["ks"] for f in ranked), default=0.0),
            "max_js": max((f["js"] for f in ranked), default=0.0),
            "top_feature": top["feature"] if top else "",
            "eligible": bool(eligible),
            "drifting": any(f["psi"] >= policy.psi_threshold for f in eligible),
        }


def _windows(session: Session, *, model: str | None, version: str | None, device_id: str | None,
             since: datetime) -> Iterable[tuple[str, str, str, int, dict[str, Any]]]:
    query = select(TelemetryWindow.device_id, TelemetryWindow.model, TelemetryWindow.version,
                   TelemetryWindow.requests, TelemetryWindow.payload).where(
        TelemetryWindow.role == "serving", TelemetryWindow.window_end >= since)
    if model:
        query = query.where(TelemetryWindow.model == model)
    if version:
        query = query.where(TelemetryWindow.version == version)
    if device_id:
        query = query.where(TelemetryWindow.device_id == device_id)
    for row in session.execute(query):
        yield row[0], row[1], row[2], int(row[3] or 0), dict(row[4] or {})


def drift_report(
    session: Session,
    policy: DriftPolicy | None = None,
    *,
    model: str | None = None,
    version: str | None = None,
    group_by: str | None = None,
    device_id: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """`{"devices", "groups", "versions", ...}` for serving windows in the policy's time window.

    `groups` is empty unless `group_by` names a device label; devices without that label form
    the group `"(none)"`.
    """
    policy = policy or DriftPolicy()
    if version and not model:
        raise InvalidInputError("give the model too when asking for a version (model=NAME&version=V)")
    now = now or datetime.now(UTC)
    since = now - timedelta(seconds=policy.since_s)
    per_device: dict[tuple[str, str, str], _EntryAcc] = {}
    per_version: dict[tuple[str, str], _EntryAcc] = {}
    rows = list(_windows(session, model=model, version=version, device_id=device_id, since=since))
    device_ids = sorted({r[0] for r in rows})
    labels: dict[str, dict[str, Any]] = {}
    if device_ids:
        for dev_id, dev_labels in session.execute(select(Device.id, Device.labels).where(Device.id.in_(device_ids))):
            labels[dev_id] = dict(dev_labels or {})
    per_group: dict[tuple[str, str, str], _EntryAcc] = {}
    for dev_id, mdl, ver, requests, payload in rows:
        per_device.setdefault((dev_id, mdl, ver), _EntryAcc()).add(dev_id, requests, payload)
        per_version.setdefault((mdl, ver), _EntryAcc()).add(dev_id, requests, payload)
        if group_by:
            group = str(labels.get(dev_id, {}).get(group_by, NO_GROUP))
            per_group.setdefault((group, mdl, ver), _EntryAcc()).add(dev_id, requests, payload)

    devices = []
    drifting_devices: dict[tuple[str, str], set[str]] = {}
    for (dev_id, mdl, ver), acc in sorted(per_device.items()):
        entry = {"device_id": dev_id, "model": mdl, "version": ver, "labels": labels.get(dev_id, {}),
                 **acc.result(policy, detail=False)}
        if group_by:
            entry["group"] = str(labels.get(dev_id, {}).get(group_by, NO_GROUP))
        if entry["drifting"]:
            drifting_devices.setdefault((mdl, ver), set()).add(dev_id)
        devices.append(entry)

    def summary(acc: _EntryAcc, mdl: str, ver: str) -> dict[str, Any]:
        return {"devices": sorted(acc.devices),
                "drifting_devices": sorted(acc.devices & drifting_devices.get((mdl, ver), set())),
                **acc.result(policy, detail=True)}

    groups = [{"group": group, "model": mdl, "version": ver, **summary(acc, mdl, ver)}
              for (group, mdl, ver), acc in sorted(per_group.items())]
    versions = [{"model": mdl, "version": ver, **summary(acc, mdl, ver)}
                for (mdl, ver), acc in sorted(per_version.items())]
    return {
        "since_s": policy.since_s,
        "psi_threshold": policy.psi_threshold,
        "min_samples": policy.min_samples,
        "group_by": group_by or "",
        "devices": devices,
        "groups": groups,
        "versions": versions,
    }


def drifting_models(session: Session, device_id: str, policy: DriftPolicy | None = None,
                    now: datetime | None = None) -> list[dict[str, Any]]:
    """The models drifting on one device, `[{"model", "version", "max_psi", "top_feature"}]`, for the
    device detail view."""
    report = drift_report(session, policy, device_id=device_id, now=now)
    return [{"model": d["model"], "version": d["version"], "max_psi": d["max_psi"], "top_feature": d["top_feature"]}
            for d in report["devices"] if d["device_id"] == device_id and d["drifting"]]


__all__ = ["DriftPolicy", "drift_report", "drifting_models"]
