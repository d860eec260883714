"""The rollout report page: self-contained (no scripts, no external assets), escaped, and showing the data."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

import numpy as np

from fleet.controller.report import render_html
from fleet.core.histogram import LatencyHistogram


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[str] = []
        self.text: list[str] = []
        self.stack: list[str] = []
        self.unclosed_errors = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for key, value in attrs:
            if key in ("src", "href") or (value and ("http://" in value or "https://" in value) and key != "xmlns"):
                self.urls.append(f"{key}={value}")
        if tag not in ("meta", "rect", "circle", "line", "path", "polyline", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if self.stack and self.stack[-1] == tag:
            self.stack.pop()
        elif tag not in ("rect", "circle", "line", "path", "polyline"):
            self.unclosed_errors += 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> Page:
    parser = Page()
    parser.feed(page)
    parser.close()
    return parser


def hist(median: float, n: int, seed: int) -> dict[str, Any]:
    h = LatencyHistogram()
    h.record_many(median * np.random.default_rng(seed).lognormal(0.0, 0.1, n))
    return h.to_dict()


DATA: dict[str, Any] = {
    "rollout": {"name": "det-v2", "model": "det", "version": "v2", "phase": "RolledBack", "steps": [0.1, 1.0],
                "step_index": 0, "message": "gate failed <b>on</b> group hw=slowbox", "gate": {"min_agreement": 0.9},
                "created_at": "2024-01-01T00:00:00+00:00"},
    "task": "classification",
    "decisions": [{"at": "2024-01-01T00:01:00", "kind": "gate", "verdict": "Fail", "step_index": 0,
                   "reason": "latency on group hw=slowbox: candidate +12%", "metrics": {"metrics": [
                       {"metric": "latency", "group": "hw=slowbox", "value": 0.12, "threshold": 0.05,
                        "comparison": "<=", "ok": False, "verdict": "Fail", "test": "Mann-Whitney U",
                        "p_value": 1e-9, "samples": 1000,
                        "worst_devices": [{"device": "cam-07", "value": 1.13}]},
                       {"metric": "agreement[probs]", "group": None, "value": 0.99, "threshold": 0.9,
                        "comparison": ">=", "ok": True, "verdict": "Pass", "test": "Wilson",
                        "interval": [0.98, 0.995], "samples": 2000}]}}],
    "latency": {"candidate": hist(22.0, 500, 1), "serving": hist(20.0, 500, 2)},
    "agreement_over_time": [{"start": 0.0 + i, "requests": 100, "devices": 3,
                             "agreement": {"probs": {"value": 0.99 - 0.01 * i, "samples": 100, "what": "top-1"}}}
                            for i in range(5)],
    "drift": {"psi_threshold": 0.2, "group_by": "hw", "versions": [],
              "groups": [{"group": "jetson", "version": "v1", "max_psi": 0.03, "drifting": False},
                         {"group": "slowbox", "version": "v1", "max_psi": 0.41, "drifting": True}]},
}


def test_page_is_self_contained_well_formed_and_has_three_charts() -> None:
    page = render_html(DATA)
    parsed = parse(page)
    assert "script" not in parsed.tags and "link" not in parsed.tags and "img" not in parsed.tags
    assert parsed.urls == []  # nothing to fetch: only the SVG namespace names a URL
    assert parsed.tags.count("svg") == 3 and parsed.unclosed_errors == 0 and parsed.stack == []
    text = " ".join(parsed.text)
    assert "serving p50" in text and "candidate p50" in text
    assert "slowbox (v1)" in text and "drifting" in text
    assert "cam-07 (1.13)" in text and "p=1e-09" in text and "[0.98, 0.995]" in text


def test_database_text_is_escaped() -> None:
    page = render_html(DATA)
    assert "<b>on</b>" not in page and "&lt;b&gt;on&lt;/b&gt;" in page


def test_missing_evidence_says_so_instead_of_drawing() -> None:
    empty = {"rollout": {"name": "x", "model": "m", "version": "v"}, "task": "generic", "decisions": [],
             "latency": {"candidate": LatencyHistogram().to_dict(), "serving": LatencyHistogram().to_dict()},
             "agreement_over_time": [], "drift": None}
    page = render_html(empty)
    assert "no paired latency data yet" in page and "no agreement data yet" in page
    assert "no drift data" in page and "no gate decision yet" in page
    assert parse(page).tags.count("svg") == 0


def test_latency_curves_put_the_slower_candidate_to_the_right() -> None:
    page = render_html(DATA)
    start = page.index("<svg")
    svg = page[start:page.index("</svg>", start)]
    paths = svg.split("<path d=\"")[1:]
    assert len(paths) == 2  # serving, candidate

    def peak_x(path: str) -> float:
        points = [p.split(",") for p in path.split('"', maxsplit=1)[0].replace("M", "").replace("L", "").split()]
        xs, ys = [float(x) for x, _ in points], [float(y) for _, y in points]
        return xs[ys.index(min(ys))]  # the top of the curve: smallest y

    assert peak_x(paths[1]) > peak_x(paths[0])
