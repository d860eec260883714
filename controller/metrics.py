"""Prometheus metrics of the controller.

Two kinds, kept apart on purpose:

- request metrics (REST and gRPC rates, errors, durations) are counted as requests happen, by
  an ASGI middleware and a gRPC server interceptor;
- fleet state (devices by state and group, rollouts by phase and step, gate verdicts and the
  latest gate numbers, latency quantiles per model version) is read from the database when
  Prometheus scrapes, by a custom collector. The database is the truth, so every replica reports
  the same fleet, nothing is double-counted after a restart, and no engine code has to remember
  to bump a counter.

Names follow Prometheus conventions: `fleet_` prefix, base units in the name (`_seconds`,
`_ms` where the domain speaks milliseconds), `_total` for counters.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet.controller.drift import DriftPolicy, drift_report
from fleet.controller.models import Decision, Device, Rollout, TelemetryWindow
from fleet.core.histogram import LatencyHistogram
from fleet.core.rollout import Phase

# Latency quantiles per model version are computed over this recent span of telemetry.
LATENCY_WINDOW = timedelta(minutes=5)
QUANTILES = (0.5, 0.95, 0.99)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class FleetStateCollector(Collector):
    """Reads the fleet's state from the database at scrape time."""

    def __init__(self, session_factory: sessionmaker[Session], group_label: str = "site",
                 drift_policy: DriftPolicy | None = None) -> None:
        self.session_factory = session_factory
        self.group_label = group_label
        self.drift_policy = drift_policy or DriftPolicy()

    def collect(self) -> Iterator[Metric]:
        with self.session_factory() as session:
            yield from self._devices(session)
            yield from self._rollouts(session)
            yield from self._gates(session)
            yield from self._latency(session)
            yield from self._drift(session)

    def _drift(self, session: Session) -> Iterator[Metric]:
        report = drift_report(session, self.drift_policy, group_by=self.group_label)
        psi = GaugeMetricFamily("fleet_drift_psi", "Largest PSI over monitored features of the serving model, "
                                "per model version and label group, over the recent drift window.",
                                labels=["model", "version", "group"])
        drifting = GaugeMetricFamily("fleet_drifting_devices", "Devices whose serving model is drifting.",
                                     labels=["model", "version"])
        for entry in report.get("groups", []):
            psi.add_metric([entry["model"], entry["version"], str(entry["group"])], float(entry["max_psi"]))
        for entry in report.get("versions", []):
            psi.add_metric([entry["model"], entry["version"], ""], float(entry["max_psi"]))
        counts: Counter[tuple[str, str]] = Counter(
            (d["model"], d["version"]) for d in report.get("devices", []) if d.get("drifting"))
        for (model, version), n in sorted(counts.items()):
            drifting.add_metric([model, version], n)
        yield psi
        yield drifting

    def _devices(self, session: Session) -> Iterator[Metric]:
        by_state: Counter[tuple[str, str]] = Counter()
        updates: Counter[tuple[str, str]] = Counter()
        for device in session.scalars(select(Device)):
            state = "decommissioned" if device.decommissioned else ("connected" if device.connected else "offline")
            group = str((device.labels or {}).get(self.group_label, ""))
            by_state[(state, group)] += 1
            for model in (device.actual or {}).get("models", []):
                update = model.get("update") or {}
                updates[(str(model.get("model", "")), str(update.get("state") or "Idle"))] += 1
        devices = GaugeMetricFamily("fleet_devices", "Devices by connection state and label group.",
                                    labels=["state", "group"])
        for (state, group), n in sorted(by_state.items()):
            devices.add_metric([state, group], n)
        yield devices
        states = GaugeMetricFamily("fleet_device_updates", "Devices by the update state of each model.",
                                   labels=["model", "state"])
        for (model, state), n in sorted(updates.items()):
            states.add_metric([model, state], n)
        yield states

    def _rollouts(self, session: Session) -> Iterator[Metric]:
        phases = GaugeMetricFamily("fleet_rollouts", "Rollouts by phase.", labels=["phase"])
        query = select(Rollout.phase, func.count()).group_by(Rollout.phase)
        counts: dict[str, int] = dict(session.execute(query).all())
        for phase in Phase:
            phases.add_metric([phase.value], counts.get(phase.value, 0))
        yield phases
        step = GaugeMetricFamily("fleet_rollout_step", "Current step (1-based) of each unfinished rollout.",
                                 labels=["rollout", "model", "version", "step_phase"])
        share = GaugeMetricFamily("fleet_rollout_step_fraction", "Cohort share of the current step (0-1).",
                                  labels=["rollout", "model", "version"])
        active = session.scalars(select(Rollout).where(Rollout.phase.in_([Phase.PENDING.value,
                                                                          Phase.PROGRESSING.value,
                                                                          Phase.PAUSED.value])))
        for rollout in active:
            step.add_metric([rollout.id, rollout.model, rollout.version, rollout.step_phase], rollout.step_index + 1)
            steps = list(rollout.steps or [])
            if rollout.step_index < len(steps):
                share.add_metric([rollout.id, rollout.model, rollout.version], float(steps[rollout.step_index]))
        yield step
        yield share

    def _gates(self, session: Session) -> Iterator[Metric]:
        verdicts = CounterMetricFamily("fleet_gate_verdicts", "Gate decisions recorded, by verdict.",
                                       labels=["verdict"])
        rows = session.execute(
            select(Decision.verdict, func.count()).where(Decision.kind == "gate").group_by(Decision.verdict)
        ).all()
        for verdict, n in rows:
            verdicts.add_metric([verdict or "none"], n)
        yield verdicts
        value = GaugeMetricFamily("fleet_gate_metric_value", "Latest judged value of each gate metric.",
                                  labels=["rollout", "metric"])
        threshold = GaugeMetricFamily("fleet_gate_metric_threshold", "Threshold of each gate metric.",
                                      labels=["rollout", "metric"])
        active = session.scalars(select(Rollout.id).where(Rollout.phase.in_([Phase.PROGRESSING.value,
                                                                             Phase.PAUSED.value])))
        for rollout_id in list(active):
            latest = session.scalars(
                select(Decision).where(Decision.rollout_id == rollout_id, Decision.kind == "gate")
                .order_by(Decision.at.desc(), Decision.id.desc()).limit(1)
            ).first()
            for row in ((latest.metrics or {}).get("metrics", []) if latest else []):
                if isinstance(row.get("value"), int | float):
                    value.add_metric([rollout_id, str(row.get("metric"))], float(row["value"]))
                if isinstance(row.get("threshold"), int | float):
                    threshold.add_metric([rollout_id, str(row.get("metric"))], float(row["threshold"]))
        yield value
        yield threshold

    def _latency(self, session: Session) -> Iterator[Metric]:
        since = datetime.now(timezone.utc) - LATENCY_WINDOW
        merged: dict[tuple[str, str, str], LatencyHistogram] = {}
        windows = session.execute(
            select(TelemetryWindow.model, TelemetryWindow.version, TelemetryWindow.role, TelemetryWindow.payload)
            .where(TelemetryWindow.window_start >= since)
        )
        for model, version, role, payload in windows:
            raw = (payload or {}).get("latency_ms")
            if not raw:
                continue
            try:
                hist = LatencyHistogram.from_dict(raw)
            except ValueError:
                continue
            key = (model, version, role)
            if key in merged:
                merged[key].merge(hist)
            else:
                merged[key] = hist
        family = GaugeMetricFamily("fleet_model_latency_ms",
                                   "Inference latency quantiles per model version and role, last 5 minutes.",
                                   labels=["model", "version", "role", "quantile"])
        requests = GaugeMetricFamily("fleet_model_latency_samples", "Requests behind fleet_model_latency_ms.",
                                     labels=["model", "version", "role"])
        for (model, version, role), hist in sorted(merged.items()):
            for q in QUANTILES:
                family.add_metric([model, version, role, f"{q:g}"], hist.quantile(q))
            requests.add_metric([model, version, role], hist.count)
        yield family
        yield requests


class ControllerMetrics:
    """The controller's registry and its request instruments."""

    def __init__(self, session_factory: sessionmaker[Session], group_label: str = "site",
                 drift_policy: DriftPolicy | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FleetStateCollector(session_factory, group_label, drift_policy))
        self.http_requests = PromCounter("fleet_http_requests", "REST requests by method, route and status code.",
                                         ["method", "route", "code"], registry=self.registry)
        self.http_duration = Histogram("fleet_http_request_duration_seconds", "REST request duration.",
                                       ["method", "route"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.grpc_requests = PromCounter("fleet_grpc_requests", "Agent gRPC calls by method and status code.",
                                         ["method", "code"], registry=self.registry)
        self.grpc_duration = Histogram("fleet_grpc_request_duration_seconds",
                                       "Agent gRPC call duration (streams: until they end).",
                                       ["method"], buckets=DURATION_BUCKETS, registry=self.registry)

    def asgi_middleware(self, app: ASGIApp) -> ASGIApp:
        return _HttpMetricsMiddleware(app, self)

    def grpc_interceptor(self) -> grpc.aio.ServerInterceptor:
        return _GrpcMetricsInterceptor(self)


class _HttpMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: ControllerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = scope.get("route")
            # The route template, never the raw path: ids in paths would explode the label space.
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.http_requests.labels(method, template, str(status["code"])).inc()
            self.metrics.http_duration.labels(method, template).observe(time.perf_counter() - start)


class _GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: ControllerMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = str(handler_call_details.method).rsplit("/", 1)[-1]
        metrics = self.metrics

        def record(context: Any, start: float, failed: BaseException | None) -> None:
            code = context.code() if hasattr(context, "code") else None
            if code is None:
                code = grpc.StatusCode.UNKNOWN if failed is not None else grpc.StatusCode.OK
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            metrics.grpc_requests.labels(method, name).inc()
            metrics.grpc_duration.labels(method).observe(time.perf_counter() - start)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                start, failed = time.perf_counter(), None
                try:
                    return await inner(request, context)
                except BaseException as exc:
                    failed = exc
                    raise
                finally:
                    record(context, start, failed)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            async def stream(request_iterator: Any, context: Any) -> Any:
                start, failed = time.perf_counter(), None
                try:
                    async for item in inner_stream(request_iterator, context):
                        yield item
                except BaseException as exc:
                    failed = exc
                    raise
                finally:
                    record(context, start, failed)

            return grpc.stream_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler
