"""A rollout's evidence as pictures: one self-contained HTML page with inline SVG charts.

Rules this module enforces:

- the page depends on nothing outside itself: no scripts, no stylesheets, fonts or images to
  fetch; every chart is inline SVG, so the file can be mailed, archived or opened offline;
- everything shown comes from the stored evidence: the latency distributions are the merged
  histograms of the rollout's shadow windows (candidate vs the serving model on the same
  requests), agreement over time is per time bucket of those windows, drift per group comes
  from `fleet.controller.drift.drift_report` (the page says "no drift data" when there is none);
- every text from the database is HTML-escaped: labels, reasons and model names are user input.

`collect(session, name)` reads the database (also served as JSON by
`GET /api/v1/rollouts/{name}/timeseries`); `render_html(data)` is pure and never touches it.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet.controller.models import ModelVersion, TelemetryWindow
from fleet.controller.rollouts import rollout_detail
from fleet.core.agreement import AgreementSums
from fleet.core.gate import paired_latency_keys
from fleet.core.histogram import LatencyHistogram

# Agreement over time is shown in at most this many time buckets, so the page stays small for
# rollouts of any length.
TIME_BUCKETS = 30
# Latency distributions are drawn over this many log-spaced bins between the 0.5% and 99.5% quantiles.
LATENCY_BINS = 40
WIDTH, HEIGHT, PAD = 640, 220, 40


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def collect(session: Session, name: str, *, group_by: str | None = None) -> dict[str, Any]:
    """The rollout's detail, merged latency histograms, agreement per time bucket and drift per group."""
    detail = rollout_detail(session, name)
    model, version = detail["model"], detail["version"]
    created = detail.get("created_at")
    since = datetime.fromisoformat(created) if isinstance(created, str) else None
    query = select(TelemetryWindow).where(TelemetryWindow.model == model, TelemetryWindow.version == version,
                                          TelemetryWindow.role == "shadow")
    if since is not None:
        query = query.where(TelemetryWindow.window_end >= since)
    candidate, serving = LatencyHistogram(), LatencyHistogram()
    points: list[tuple[datetime, str, int, list[dict[str, Any]]]] = []
    for window in session.scalars(query.order_by(TelemetryWindow.window_end)):
        payload = window.payload or {}
        # The same measure the gate judges: on-CPU time of the paired runs where the agent reports it.
        for key, target in zip(paired_latency_keys(payload), (candidate, serving), strict=True):
            if payload.get(key):
                try:
                    target.merge(LatencyHistogram.from_dict(payload[key]))
                except ValueError:
                    continue  # one malformed histogram must not hide the rest of the report
        end = window.window_end if window.window_end.tzinfo else window.window_end.replace(tzinfo=UTC)
        points.append((end, window.device_id, int(window.requests or 0), list(payload.get("agreement") or [])))
    task = str(detail.get("task") or "")
    if not task:
        task = session.scalar(select(ModelVersion.task).where(ModelVersion.name == model,
                                                              ModelVersion.version == version)) or "generic"
    return {
        "rollout": {k: detail.get(k) for k in ("name", "model", "version", "phase", "message", "steps",
                                               "step_index", "created_at", "gate")},
        "task": task,
        "decisions": [d for d in detail.get("decisions", []) if d.get("kind") in ("gate", "rollback", "pause")],
        "latency": {"candidate": candidate.to_dict(), "serving": serving.to_dict()},
        "agreement_over_time": _timeline(points, task),
        "drift": _drift(session, model, group_by or _group_key(session, detail)),
    }


def _group_key(session: Session, detail: Mapping[str, Any]) -> str | None:
    """The label key to show drift by: the gate's `group_by`, else the first key the gate analysed."""
    gate = detail.get("gate") or {}
    if isinstance(gate, Mapping) and gate.get("group_by") not in (None, "", "-"):
        return str(gate["group_by"])
    for decision in reversed(detail.get("decisions") or []):
        groups = (decision.get("metrics") or {}).get("groups") if isinstance(decision.get("metrics"), dict) else None
        if groups:
            return str(groups[0]).split("=", 1)[0]
    return None


def _timeline(points: Sequence[tuple[datetime, str, int, list[dict[str, Any]]]], task: str) -> list[dict[str, Any]]:
    if not points:
        return []
    start, end = points[0][0], points[-1][0]
    span = max((end - start).total_seconds(), 1.0)
    width = span / TIME_BUCKETS
    buckets: dict[int, tuple[dict[str, AgreementSums], list[int], set[str]]] = {}
    for at, device_id, requests, agreement in points:
        index = min(int((at - start).total_seconds() / width), TIME_BUCKETS - 1)
        sums, counts, devices = buckets.setdefault(index, ({}, [0], set()))
        counts[0] += requests
        devices.add(device_id)
        for item in agreement:
            sums.setdefault(str(item.get("output", "")), AgreementSums()).add(item)
    out = []
    for index in sorted(buckets):
        sums, counts, devices = buckets[index]
        scores = {}
        for output, acc in sorted(sums.items()):
            value, samples, what = acc.score(task)
            scores[output] = {"value": None if math.isnan(value) else round(value, 6), "samples": samples,
                              "what": what}
        out.append({"start": (start.timestamp() + index * width), "requests": counts[0],
                    "devices": len(devices), "agreement": scores})
    return out


def _drift(session: Session, model: str, group_by: str | None) -> dict[str, Any] | None:
    try:
        from fleet.controller.drift import drift_report
    except ImportError:  # drift aggregation not installed in this build: the page says so
        return None
    # Every group label, the whole rollout span: drift matters for the versions being compared.
    report = drift_report(session, model=model, group_by=group_by)
    report["group_by"] = group_by or ""
    if not (report.get("groups") or report.get("versions")):
        return None
    return report


# -- rendering (pure) -----------------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _svg(body: str, title: str, width: int = WIDTH, height: int = HEIGHT) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}"><title>{_e(title)}</title>'
            f'<rect width="{width}" height="{height}" fill="#fff" stroke="#ccc"/>{body}</svg>')


def _bins(hist: LatencyHistogram, edges: Sequence[float]) -> list[float]:
    """Share of the histogram's values in each [edges[i], edges[i+1]) interval (bucket midpoints)."""
    from fleet.core.stats import bucket_values

    values, counts = bucket_values(hist)
    total = float(counts.sum()) or 1.0
    shares = [0.0] * (len(edges) - 1)
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        for i in range(len(edges) - 1):
            if value < edges[i + 1] or i == len(edges) - 2:
                shares[i] += count / total
                break
    return shares


def latency_chart(latency: Mapping[str, Any]) -> str:
    """Overlaid latency distributions (log-spaced bins): serving in grey, candidate in orange."""
    cand = LatencyHistogram.from_dict(latency.get("candidate") or {})
    serv = LatencyHistogram.from_dict(latency.get("serving") or {})
    if not cand.count or not serv.count:
        return "<p class='empty'>no paired latency data yet</p>"
    low = max(min(cand.quantile(0.005), serv.quantile(0.005)), 1e-3)
    high = max(cand.quantile(0.995), serv.quantile(0.995), low * 1.01)
    ratio = (high / low) ** (1.0 / LATENCY_BINS)
    edges = [low * ratio**i for i in range(LATENCY_BINS + 1)]
    series = [("serving", _bins(serv, edges), "#888"), ("candidate", _bins(cand, edges), "#e67e22")]
    peak = max(max(s) for _, s, _ in series) or 1.0
    plot_w, plot_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD
    parts = []
    for label, shares, colour in series:
        path = []
        for i, share in enumerate(shares):
            x0 = PAD + plot_w * i / LATENCY_BINS
            x1 = PAD + plot_w * (i + 1) / LATENCY_BINS
            y = PAD + plot_h * (1 - share / peak)
            path.append(f"{'M' if i == 0 else 'L'}{x0:.1f},{y:.1f} L{x1:.1f},{y:.1f}")
        parts.append(f'<path d="{" ".join(path)}" fill="none" stroke="{colour}" stroke-width="2">'
                     f"<title>{_e(label)}</title></path>")
    for i in (0, LATENCY_BINS // 2, LATENCY_BINS):
        x = PAD + plot_w * i / LATENCY_BINS
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT - 12}" font-size="11" text-anchor="middle">'
                     f"{edges[i]:.3g} ms</text>")
    parts.append(f'<text x="{PAD}" y="20" font-size="12" fill="#888">serving p50 {serv.quantile(0.5):.3g} ms, '
                 f'p95 {serv.quantile(0.95):.3g} ms (n={serv.count})</text>')
    parts.append(f'<text x="{PAD + plot_w // 2}" y="20" font-size="12" fill="#e67e22">candidate p50 '
                 f"{cand.quantile(0.5):.3g} ms, p95 {cand.quantile(0.95):.3g} ms (n={cand.count})</text>")
    return _svg("".join(parts), "latency distribution, serving vs candidate")


def agreement_chart(timeline: Sequence[Mapping[str, Any]], threshold: float | None) -> str:
    """Agreement per output over time (one line per output), with the gate's threshold dashed."""
    outputs = sorted({o for point in timeline for o in (point.get("agreement") or {})})
    if not timeline or not outputs:
        return "<p class='empty'>no agreement data yet</p>"
    values = [v["value"] for p in timeline for v in (p.get("agreement") or {}).values() if v.get("value") is not None]
    low = min([*values, threshold if threshold is not None else 1.0, 1.0]) - 0.02
    low = max(min(low, 0.9), -1.0)
    plot_w, plot_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD
    count = len(timeline)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = PAD + (plot_w * i / (count - 1) if count > 1 else plot_w / 2)
        return x, PAD + plot_h * (1 - (v - low) / (1.0 - low))

    colours = ["#2980b9", "#27ae60", "#8e44ad", "#c0392b", "#16a085"]
    parts = []
    if threshold is not None:
        _, y = xy(0, threshold)
        parts.append(f'<line x1="{PAD}" x2="{WIDTH - PAD}" y1="{y:.1f}" y2="{y:.1f}" stroke="#c0392b" '
                     f'stroke-dasharray="4 3"><title>threshold {threshold:g}</title></line>')
    for n, output in enumerate(outputs):
        colour = colours[n % len(colours)]
        pts = [(i, p["agreement"][output]["value"]) for i, p in enumerate(timeline)
               if output in (p.get("agreement") or {}) and p["agreement"][output].get("value") is not None]
        coords = [xy(i, v) for i, v in pts]
        if coords:
            parts.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in coords)}" fill="none" '
                         f'stroke="{colour}" stroke-width="2"><title>{_e(output)}</title></polyline>')
            parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>' for x, y in coords)
        parts.append(f'<text x="{PAD + 120 * n}" y="20" font-size="12" fill="{colour}">{_e(output)}</text>')
    for v in (low, 1.0):
        _, y = xy(0, v)
        parts.append(f'<text x="{PAD - 4}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{v:.2f}</text>')
    return _svg("".join(parts), "agreement over time")


def drift_chart(drift: Mapping[str, Any] | None) -> str:
    """Max PSI per group (or per version without groups) as bars, drifting ones in red."""
    if not drift:
        return "<p class='empty'>no drift data</p>"
    entries = [(f"{g.get('group')} ({g.get('version')})", g) for g in drift.get("groups") or []]
    if not entries:
        entries = [(f"{v.get('model')}:{v.get('version')}", v) for v in drift.get("versions") or []]
    if not entries:
        return "<p class='empty'>no drift data</p>"
    threshold = float(drift.get("psi_threshold") or 0.2)
    peak = max([threshold * 1.5, *(float(e.get("max_psi") or 0.0) for _, e in entries)])
    bar_h, gap, label_w = 18, 6, 200
    height = PAD + len(entries) * (bar_h + gap) + 10
    plot_w = WIDTH - label_w - PAD
    parts = []
    for i, (label, entry) in enumerate(entries):
        psi = float(entry.get("max_psi") or 0.0)
        y = PAD + i * (bar_h + gap)
        colour = "#c0392b" if entry.get("drifting") else "#2980b9"
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" font-size="11" text-anchor="end">{_e(label)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{plot_w * psi / peak:.1f}" height="{bar_h}" '
                     f'fill="{colour}"><title>{_e(label)}: PSI {psi:.3g}</title></rect>')
        parts.append(f'<text x="{label_w + plot_w * psi / peak + 4:.1f}" y="{y + 13}" font-size="11">'
                     f"{psi:.3g}{' drifting' if entry.get('drifting') else ''}</text>")
    x = label_w + plot_w * threshold / peak
    parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{PAD - 8}" y2="{height - 6}" stroke="#c0392b" '
                 f'stroke-dasharray="4 3"><title>PSI threshold {threshold:g}</title></line>')
    parts.append(f'<text x="{label_w}" y="20" font-size="12">max PSI per '
                 f"{'group (' + _e(drift.get('group_by')) + ')' if drift.get('groups') else 'version'}"
                 f"; threshold {threshold:g}</text>")
    return _svg("".join(parts), "drift per group", height=height)


def _decision_table(decisions: Sequence[Mapping[str, Any]]) -> str:
    out = []
    for d in decisions:
        out.append(f"<h3>{_e(d.get('at'))} &middot; step {int(d.get('step_index') or 0) + 1} &middot; "
                   f"{_e(d.get('kind'))} {_e(d.get('verdict') or '')}</h3><p>{_e(d.get('reason'))}</p>")
        metrics = d.get("metrics") or {}
        rows = metrics.get("metrics") if isinstance(metrics, Mapping) else None
        if not rows:
            continue
        out.append("<table><tr><th>metric</th><th>group</th><th>value</th><th>threshold</th><th>verdict</th>"
                   "<th>test</th><th>p / interval</th><th>samples</th><th>pulled most</th></tr>")
        for r in rows:
            stat = (f"p={_fmt(r.get('p_value'))}" if r.get("p_value") is not None else "") + (
                f" [{_fmt(r['interval'][0])}, {_fmt(r['interval'][1])}]" if r.get("interval") else "")
            worst = ", ".join(f"{w.get('device')} ({_fmt(w.get('value'))})" for w in r.get("worst_devices") or [])
            verdict = r.get("verdict") or ("-" if r.get("ok") is None else ("Pass" if r.get("ok") else "Fail"))
            out.append(f"<tr class='{_e(verdict).lower()}'><td>{_e(r.get('metric'))}</td><td>{_e(r.get('group') or '')}"
                       f"</td><td>{_e(_fmt(r.get('value')))}</td><td>{_e(r.get('comparison'))} "
                       f"{_e(_fmt(r.get('threshold')))}</td><td>{_e(verdict)}</td><td>{_e(r.get('test') or '')}</td>"
                       f"<td>{_e(stat)}</td><td>{_e(r.get('samples'))}</td><td>{_e(worst)}</td></tr>")
        out.append("</table>")
    return "".join(out) or "<p class='empty'>no gate decision yet</p>"


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 6px}
tr.fail td{background:#fdecea}tr.pass td{background:#eefaf0}.empty{color:#888;font-style:italic}
h2{margin-top:1.6em}"""


def render_html(data: Mapping[str, Any]) -> str:
    """The report page for `collect()`'s data: self-contained, no scripts, inline SVG."""
    rollout = data.get("rollout") or {}
    gate = rollout.get("gate") or {}
    threshold = gate.get("min_agreement") if isinstance(gate, Mapping) else None
    if threshold is None:
        from fleet.core.gate import GatePolicy

        threshold = GatePolicy().min_agreement
    title = f"rollout {rollout.get('name')}: {rollout.get('model')}:{rollout.get('version')}"
    return "".join([
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p>phase <b>{_e(rollout.get('phase'))}</b>, step {int(rollout.get('step_index') or 0) + 1} of "
        f"{len(rollout.get('steps') or [])}; task {_e(data.get('task'))}; created {_e(rollout.get('created_at'))}</p>",
        f"<p>{_e(rollout.get('message'))}</p>",
        "<h2>Latency, serving vs candidate (paired requests)</h2>", latency_chart(data.get("latency") or {}),
        "<h2>Agreement over time</h2>", agreement_chart(data.get("agreement_over_time") or [], float(threshold)),
        "<h2>Input and output drift per group</h2>", drift_chart(data.get("drift")),
        "<h2>Gate decisions</h2>", _decision_table(data.get("decisions") or []),
        "</body></html>",
    ])
