"""Drift of the serving model's live inputs and outputs, measured on the device off the request path.

The rules this module enforces:

- **Serving never waits for drift.** The request path only hands references to the request's
  tensors to `DriftTracker.observe`, which puts them on a bounded queue with `put_nowait`; when
  the queue is full the request is simply not monitored (counted in `dropped`). Feature
  extraction (channel means, scores) and binning run on one low-priority worker thread.
- **One profile per serving model.** With a reference profile in the signed manifest the
  windows carry `profile_source="reference"`. Without one, the tracker learns a profile from the
  first `learn_samples` requests (`"learning"`, no drift entries yet), then persists it
  atomically as `<profile_dir>/<model>@<version>.json` and reports `"learned"` from then on, also
  after a restart. A malformed manifest profile is logged and treated as absent: drift is
  evidence, not a reason to stop serving.
- **Memory is bounded and stated.** Per model: the monitor's arrays (24 bytes per bin, at most
  `MAX_FEATURES` = 64 features of at most 65 bins: under 100 KB, ~1 KB per typical 16-bin
  feature); while learning, a reservoir of at most `learn_samples` float64 values per feature
  (16 KB per feature at the default 2,000; at most 1 MB per model); the queue holds at most
  `queue_size` requests' tensors by reference (the same arrays the response was built from).
  Only the serving version of each model has state: a new serving version replaces the old
  version's state.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fleet.agent.atomic import CorruptStateError, read_json, write_json_atomic
from fleet.agent.background import BackgroundWorker
from fleet.agent.runtime import LoadedModel
from fleet.core.errors import FleetError
from fleet.core.profile import FeatureSpec, ProfileMonitor, build_profile, extract, plan_features, validate_profile

log = logging.getLogger(__name__)

DEFAULT_LEARN_SAMPLES = 2000
DEFAULT_QUEUE_SIZE = 32
# Same niceness as the shadow worker: drift is evidence, serving comes first.
DRIFT_NICE = 10

SOURCE_REFERENCE = "reference"
SOURCE_LEARNED = "learned"
SOURCE_LEARNING = "learning"

_Observed = tuple[LoadedModel, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]


class ProfileLearner:
    """Learns a profile from the first `learn_samples` requests: a fixed-size reservoir per feature."""

    def __init__(self, specs: Sequence[FeatureSpec], learn_samples: int = DEFAULT_LEARN_SAMPLES,
                 seed: int = 0) -> None:
        if learn_samples < 1:
            raise ValueError("learn_samples must be positive")
        self.specs = list(specs)
        self.learn_samples = learn_samples
        self.requests = 0
        self._rng = np.random.default_rng(seed)
        self._buffers = {s.name: np.empty(learn_samples, dtype=np.float64) for s in self.specs}
        self._seen = dict.fromkeys(self._buffers, 0)

    @property
    def done(self) -> bool:
        return self.requests >= self.learn_samples

    def add_values(self, values: Mapping[str, np.ndarray]) -> None:
        self.requests += 1
        for name, vals in values.items():
            buf = self._buffers.get(name)
            if buf is None:
                continue
            v = np.asarray(vals, dtype=np.float64).ravel()
            v = v[np.isfinite(v)]
            seen, cap = self._seen[name], buf.size
            # Algorithm R: the first `cap` values fill the buffer, each later value i replaces a
            # random slot with probability cap / (i + 1), so the buffer stays a uniform sample.
            room = max(0, min(cap - seen, v.size))
            buf[seen:seen + room] = v[:room]
            rest = v[room:]
            if rest.size:
                index = np.arange(seen + room, seen + v.size)
                slots = self._rng.integers(0, index + 1)
                keep = slots < cap
                buf[slots[keep]] = rest[keep]
            self._seen[name] = seen + v.size

    def profile(self) -> dict[str, Any]:
        values = {n: b[: min(self._seen[n], b.size)] for n, b in self._buffers.items() if self._seen[n]}
        return build_profile(self.specs, values, samples=self.requests, source=SOURCE_LEARNED)

    def memory_bytes(self) -> int:
        return sum(b.nbytes for b in self._buffers.values())


class _ModelDrift:
    """The drift state of one model's serving version."""

    def __init__(self, version: str, source: str, monitor: ProfileMonitor | None,
                 learner: ProfileLearner | None) -> None:
        self.version = version
        self.source = source
        self.monitor = monitor
        self.learner = learner


class DriftTracker:
    """Per-model drift of the serving version, fed from a bounded queue by a worker thread."""

    def __init__(self, *, profile_dir: Path | None = None, learn_samples: int = DEFAULT_LEARN_SAMPLES,
                 queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self.profile_dir = Path(profile_dir) if profile_dir is not None else None
        self.learn_samples = learn_samples
        self.dropped = 0
        self._states: dict[str, _ModelDrift] = {}
        self._lock = threading.Lock()
        self._worker: BackgroundWorker[_Observed] = BackgroundWorker(
            lambda item: self._ingest(*item), name="fleet-drift", maxsize=queue_size, nice=DRIFT_NICE)

    # -- the request path ----------------------------------------------------------------------

    def observe(self, loaded: LoadedModel, inputs: Mapping[str, np.ndarray],
                outputs: Mapping[str, np.ndarray]) -> bool:
        """Hand one served request over for monitoring; False when it was dropped (queue full)."""
        if self._worker.offer((loaded, inputs, outputs)):
            return True
        self.dropped += 1
        return False

    # -- the worker ---------------------------------------------------------------------------

    def _ingest(self, loaded: LoadedModel, inputs: Mapping[str, np.ndarray],
                outputs: Mapping[str, np.ndarray]) -> None:
        state = self._state_for(loaded)
        specs = state.monitor.specs if state.monitor is not None else state.learner.specs if state.learner else []
        if not specs:
            return
        values = extract(specs, inputs, outputs)  # outside the lock: the costly part
        learned: dict[str, Any] | None = None
        with self._lock:
            if state.monitor is not None:
                state.monitor.add_values(values)
            elif state.learner is not None:
                state.learner.add_values(values)
                if state.learner.done:
                    learned = state.learner.profile()
                    state.monitor = ProfileMonitor(learned)
                    state.learner = None
                    state.source = SOURCE_LEARNED
        if learned is not None:
            log.info("learned a drift profile for %s from %d requests", loaded.manifest.ref, learned["samples"])
            self._persist(loaded.name, loaded.version, learned)

    def _state_for(self, loaded: LoadedModel) -> _ModelDrift:
        with self._lock:
            state = self._states.get(loaded.name)
            if state is not None and state.version == loaded.version:
                return state
        state = self._new_state(loaded)
        with self._lock:
            # A new serving version replaces the old one's state: memory stays one state per model.
            self._states[loaded.name] = state
        return state

    def _new_state(self, loaded: LoadedModel) -> _ModelDrift:
        manifest = loaded.manifest
        if manifest.profile:
            try:
                monitor = ProfileMonitor(manifest.profile)
                return _ModelDrift(manifest.version, str(manifest.profile.get("source") or SOURCE_REFERENCE),
                                   monitor, None)
            except (FleetError, KeyError, TypeError, ValueError) as exc:
                log.warning("%s: the manifest's drift profile is unusable (%s); learning one from traffic",
                            manifest.ref, exc)
        stored = self._load(loaded.name, loaded.version)
        if stored is not None:
            return _ModelDrift(manifest.version, SOURCE_LEARNED, ProfileMonitor(stored), None)
        return _ModelDrift(manifest.version, SOURCE_LEARNING, None,
                           ProfileLearner(plan_features(manifest), self.learn_samples))

    # -- learned profiles on disk ----------------------------------------------------------------

    def _path(self, model: str, version: str) -> Path | None:
        # Model names and versions are validated to safe file-name characters by the manifest.
        return self.profile_dir / f"{model}@{version}.json" if self.profile_dir is not None else None

    def _persist(self, model: str, version: str, profile: dict[str, Any]) -> None:
        path = self._path(model, version)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {"model": model, "version": version, "profile": profile})
        except OSError as exc:
            log.warning("cannot store the learned drift profile of %s:%s in %s: %s", model, version, path, exc)

    def _load(self, model: str, version: str) -> dict[str, Any] | None:
        path = self._path(model, version)
        if path is None:
            return None
        try:
            stored = read_json(path)
            if stored is None:
                return None
            profile = validate_profile(stored.get("profile"))
            return profile if profile.get("features") else None
        except (CorruptStateError, FleetError, AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring the stored drift profile %s (%s); learning again", path, exc)
            return None

    # -- telemetry ------------------------------------------------------------------------------

    def drain(self, model: str, version: str) -> tuple[list[dict[str, Any]], str]:
        """(this window's `drift` list, `profile_source`) of `model`'s serving `version`; counts reset."""
        with self._lock:
            state = self._states.get(model)
            if state is None or state.version != version:
                return [], ""
            drift = state.monitor.emit() if state.monitor is not None else []
            return drift, state.source

    def memory_bytes(self) -> int:
        """Bytes held in monitor and learner arrays (the queue's requests are not counted)."""
        with self._lock:
            total = 0
            for state in self._states.values():
                total += state.monitor.memory_bytes() if state.monitor is not None else 0
                total += state.learner.memory_bytes() if state.learner is not None else 0
            return total

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Block until every queued request has been ingested (tests, shutdown)."""
        return self._worker.wait_idle(timeout)

    def close(self) -> None:
        self._worker.close()


__all__ = ["DEFAULT_LEARN_SAMPLES", "DriftTracker", "ProfileLearner"]
