"""The GitOps loop against an in-process double of the Kubernetes API, on a real controller database.

`FakeKube` implements the three calls of `fleet.controller.k8s.KubeApi` the way an API server
does: every write bumps a cluster-wide resourceVersion, spec writes bump `metadata.generation`,
status writes go through a merge patch and do not, watches replay the changes after a
resourceVersion and answer 410 Gone once it is compacted away, and any call can be made to fail.

Given a controller with devices serving det:v1 and det:v2 pushed, when ModelRollouts are
applied, changed and deleted while the loop runs on its thread, then the loop creates the
rollouts, writes their status back, follows them as the reconciler and operators move them, and
survives expired watches and API errors.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from fleet.controller import rollouts as ops
from fleet.controller.context import ControllerContext, build_context
from fleet.controller.engine import Reconciler
from fleet.controller.gitops import GitOpsLoop
from fleet.controller.k8s import GoneError, KubeApiError, WatchEvent
from fleet.controller.models import Assignment, Device, ModelVersion, Rollout
from fleet.controller.registry import bundle_key
from fleet.controller.settings import ControllerSettings


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch, as the API server applies `application/merge-patch+json`."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class FakeKube:
    """An in-process stand-in for the API server's ModelRollout endpoints."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self.version = 100
        self.compacted_before = 0  # watches from an older resourceVersion get 410 Gone
        self.compactions = 0
        self.cond = threading.Condition()
        self.fail: dict[str, list[Exception]] = {"list": [], "watch": [], "patch": []}
        self.calls: dict[str, int] = {"list": 0, "watch": 0, "patch": 0}

    # -- what kubectl / Argo CD would do -----------------------------------------------------------

    def _write(self, key: tuple[str, str], obj: dict[str, Any], kind: str) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.objects[key] = obj
        self.events.append((self.version, kind, copy.deepcopy(obj)))
        self.cond.notify_all()

    def apply(self, name: str, spec: dict[str, Any], namespace: str = "vision") -> None:
        with self.cond:
            key = (namespace, name)
            old = self.objects.get(key)
            if old is None:
                obj: dict[str, Any] = {"apiVersion": "fleet.edge-fleet.dev/v1alpha1", "kind": "ModelRollout",
                       "metadata": {"name": name, "namespace": namespace, "generation": 1}, "spec": spec}
                self._write(key, obj, "ADDED")
            elif old["spec"] != spec:
                obj = copy.deepcopy(old)
                obj["spec"] = copy.deepcopy(spec)
                obj["metadata"]["generation"] += 1
                self._write(key, obj, "MODIFIED")

    def delete(self, name: str, namespace: str = "vision") -> None:
        with self.cond:
            obj = self.objects.pop((namespace, name))
            self.version += 1
            self.events.append((self.version, "DELETED", obj))
            self.cond.notify_all()

    def compact(self) -> None:
        """Forget history, as etcd compaction does: open watches end with 410 Gone and must relist."""
        with self.cond:
            self.compacted_before = self.version
            self.compactions += 1
            self.cond.notify_all()

    def status(self, name: str, namespace: str = "vision") -> dict[str, Any]:
        with self.cond:
            return copy.deepcopy(self.objects[(namespace, name)].get("status") or {})

    def _call(self, what: str) -> None:
        self.calls[what] += 1
        if self.fail[what]:
            raise self.fail[what].pop(0)

    # -- KubeApi ----------------------------------------------------------------------------------

    def list_rollouts(self, namespace: str | None) -> tuple[list[dict[str, Any]], str]:
        with self.cond:
            self._call("list")
            items = [copy.deepcopy(o) for (ns, _), o in sorted(self.objects.items()) if namespace in (None, ns)]
            return items, str(self.version)

    def watch_rollouts(self, namespace: str | None, resource_version: str, timeout_s: float) -> Iterator[WatchEvent]:
        with self.cond:
            self._call("watch")
            if int(resource_version) < self.compacted_before:
                raise GoneError(f"too old resource version: {resource_version}")
            epoch = self.compactions
        return self._stream(namespace, int(resource_version), time.monotonic() + timeout_s, epoch)

    def _stream(self, namespace: str | None, after: int, deadline: float, epoch: int) -> Iterator[WatchEvent]:
        while True:
            with self.cond:
                if self.compactions != epoch:
                    raise GoneError("watch expired: too old resource version")
                pending = [(v, k, o) for v, k, o in self.events if v > after and namespace in (None, o["metadata"]
                                                                                              ["namespace"])]
                if not pending:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self.cond.wait(left)
                    continue
            for version, kind, obj in pending:
                after = version
                yield WatchEvent(kind, copy.deepcopy(obj))

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        with self.cond:
            self._call("patch")
            key = (namespace, name)
            if key not in self.objects:
                raise KubeApiError(f"modelrollouts {name!r} not found", 404)
            obj = copy.deepcopy(self.objects[key])
            obj["status"] = _merge(obj.get("status") or {}, status)
            self._write(key, obj, "MODIFIED")
            return copy.deepcopy(obj)


DEVICES = [f"cam-{i:02d}" for i in range(4)]


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ControllerContext]:
    context = build_context(ControllerSettings(data_dir=tmp_path / "controller"))
    now = datetime.now(UTC)
    with context.session_factory() as s, s.begin():
        for version in ("v1", "v2", "v3"):
            s.add(ModelVersion(name="det", version=version, task="classification", release=1, manifest={},
                               bundle_key=bundle_key("det", version),
                               sha256=hashlib.sha256(version.encode()).hexdigest(), size=1000,
                               target_path=f"det/{version}/bundle.tar", created_at=now))
        for device_id in DEVICES:
            s.add(Device(id=device_id, labels={"site": "a"}, hardware={}, secret_hash="x", connected=True,
                         actual={"models": [{"model": "det", "update": {"state": "Idle"}, "slots": [
                             {"role": "serving", "version": "v1", "sha256": "", "loaded": True,
                              "execution_providers": ["CPUExecutionProvider"]}]}]},
                         desired={}, desired_generation=0))
        s.add(Assignment(model="det", version="v1", selector={}, rollout_id=None,
                         created_at=now - timedelta(hours=1)))
    try:
        yield context
    finally:
        context.close()


def wait_for(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except (KeyError, IndexError):
            result = None
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Running:
    def __init__(self, ctx: ControllerContext, kube: FakeKube, **kwargs: Any) -> None:
        self.leader = True
        self.loop = GitOpsLoop(ctx, lambda: kube, namespace=kwargs.pop("namespace", None), resync_s=0.2,
                               is_leader=lambda: self.leader, backoff_initial_s=0.05, backoff_max_s=0.2, **kwargs)
        self.stop = self.loop.start()

    def close(self) -> None:
        self.stop.set()
        assert self.loop.thread is not None
        self.loop.thread.join(5)
        assert not self.loop.thread.is_alive()


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube()


@pytest.fixture
def running(ctx: ControllerContext, kube: FakeKube) -> Iterator[Running]:
    r = Running(ctx, kube)
    try:
        yield r
    finally:
        r.close()


def _phase(kube: FakeKube, name: str) -> str:
    return str(kube.status(name).get("phase", ""))


def test_loop_creates_rollouts_writes_status_and_follows_them(
    ctx: ControllerContext, kube: FakeKube, running: Running
) -> None:
    kube.apply("det", {"model": "det", "version": "v2", "canary": "50%", "gate": {"minSamples": 100}})
    status = wait_for(lambda: kube.status("det").get("rollout") and kube.status("det"), "the rollout")
    assert (status["rollout"], status["phase"], status["observedGeneration"]) == ("gitops-vision-det", "Pending", 1)

    # The reconciler starts it; the next re-sync carries that into the status without any CR change.
    reconciler = Reconciler(ctx)
    reconciler.reconcile_once()
    wait_for(lambda: _phase(kube, "det") == "Progressing", "Progressing")
    assert kube.status("det")["stepPhase"] == "Shadow"
    # An operator promotes from the CLI: the status follows too.
    with ctx.session_factory() as s, s.begin():
        ops.promote_rollout(ctx, s, "gitops-vision-det")
    wait_for(lambda: kube.status("det")["stepPhase"] == "Serving", "Serving")
    assert kube.status("det")["lastDecision"]["kind"] == "gate"

    # Pause through Git, then resume.
    kube.apply("det", {"model": "det", "version": "v2", "canary": "50%", "gate": {"minSamples": 100},
                       "paused": True})
    wait_for(lambda: _phase(kube, "det") == "Paused" and kube.status("det")["observedGeneration"] == 2, "Paused")
    kube.apply("det", {"model": "det", "version": "v2", "canary": "50%", "gate": {"minSamples": 100}})
    wait_for(lambda: _phase(kube, "det") == "Progressing" and kube.status("det")["observedGeneration"] == 3,
             "resumed")

    # A steady state writes nothing: the loop's own status patches do not feed back into more patches.
    patches = running.loop.patches
    time.sleep(0.6)  # three re-syncs
    assert running.loop.patches == patches

    # Deleting the resource leaves its rollout running.
    kube.delete("det")
    time.sleep(0.3)
    with ctx.session_factory() as s:
        rollouts = [(r.id, r.phase) for r in s.scalars(select(Rollout))]
    assert rollouts == [("gitops-vision-det", "Progressing")]
    assert running.loop.reconcile_errors == 0


def test_watch_expiry_relists_and_api_errors_back_off(ctx: ControllerContext, kube: FakeKube) -> None:
    kube.fail["list"].append(KubeApiError("connection refused"))
    kube.fail["list"].append(KubeApiError("HTTP 500 internal error", 500))
    r = Running(ctx, kube)
    try:
        kube.apply("det", {"model": "det", "version": "v2"})
        wait_for(lambda: _phase(kube, "det") == "Pending", "status after two failed lists")
        assert r.loop.api_errors == 2 and kube.calls["list"] == 3

        # History is compacted: the next watch gets 410 Gone; the loop relists and carries on.
        lists = r.loop.lists
        kube.compact()
        wait_for(lambda: r.loop.lists == lists + 1, "a relist after 410 Gone")
        time.sleep(0.3)
        assert r.loop.lists == lists + 1  # one relist, then watching from the new list works
        assert r.loop.api_errors == 2  # 410 is not an error, just a relist
        kube.apply("other", {"model": "det", "version": "v3"})
        status = wait_for(lambda: kube.status("other").get("message") and kube.status("other"), "second resource")
        assert status["phase"] == "Pending" and "gitops-vision-det" in status["message"]

        # A failed status patch: backoff, relist, and the status is written on the retry.
        kube.fail["patch"].append(KubeApiError("HTTP 503 unavailable", 503))
        kube.apply("det", {"model": "det", "version": "v2", "paused": True})
        wait_for(lambda: _phase(kube, "det") == "Paused", "Paused after a failed patch")
        assert r.loop.api_errors == 3

        # A failing watch (on the next reconnect): backoff, relist, and changes still arrive.
        kube.fail["watch"].append(KubeApiError("HTTP 500", 500))
        wait_for(lambda: r.loop.api_errors == 4, "the failed watch")
        kube.apply("det", {"model": "det", "version": "v2"})
        wait_for(lambda: _phase(kube, "det") == "Pending", "resumed after a failed watch")
    finally:
        r.close()
    with ctx.session_factory() as s:
        assert [x.id for x in s.scalars(select(Rollout))] == ["gitops-vision-det"]


def test_only_the_leader_works(ctx: ControllerContext, kube: FakeKube) -> None:
    r = Running(ctx, kube)
    try:
        r.leader = False
        time.sleep(0.1)
        kube.apply("det", {"model": "det", "version": "v2"})
        time.sleep(0.5)
        assert kube.status("det") == {} and kube.calls["patch"] == 0
        with ctx.session_factory() as s:
            assert list(s.scalars(select(Rollout))) == []
        r.leader = True
        wait_for(lambda: _phase(kube, "det") == "Pending", "the new leader picks it up")
    finally:
        r.close()


def test_namespace_scope(ctx: ControllerContext, kube: FakeKube) -> None:
    r = Running(ctx, kube, namespace="team-a")
    try:
        kube.apply("det", {"model": "det", "version": "v2"}, namespace="team-b")
        kube.apply("det", {"model": "det", "version": "v2"}, namespace="team-a")
        wait_for(lambda: kube.status("det", "team-a").get("phase") == "Pending", "team-a's resource")
        time.sleep(0.3)
        assert kube.status("det", "team-b") == {}
    finally:
        r.close()
