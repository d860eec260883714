"""The web dashboard in a real headless Chromium, over a real controller and two real agents.

Given a controller, two agents (one with a label full of markup) and a model deployed as v1,
when an operator opens the dashboard, starts a canary rollout of v2 and watches its page,
then the overview lists exactly the devices and versions the API has, the rollout page follows
the rollout live to its end and draws its gate metrics, cohorts and evidence (latency distributions,
agreement over time, drift per group, as in the rollout's /timeseries JSON), "Download report" saves
the HTML report fetched with the token, the device page shows its
slots and update events, API strings are shown as text (never parsed as HTML), and the browser
logs no errors. The page asks for an API token first (a viewer token is enough), keeps it in
sessionStorage (never in a URL) and sends it as a bearer header; a refused token brings the
prompt back with the controller's reason. Screenshots are kept in `test-artifacts/dashboard/`.

Chromium is Debian's package (`scripts/install_browser.sh`), driven by Playwright through its
executable path: no browser is ever downloaded.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet.core import synthetic_models as sm
from fleet.core.histogram import LatencyHistogram

from .conftest import FleetWorld

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = os.environ.get("FLEET_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
GATE = ["--min-samples", "60", "--deadline", "90s", "--sample-rate", "1.0"]
# Markup in a label value: the page must show it as these characters, not as an element.
MARKUP_LABEL = "<i>x</i><script>boom()</script>"


class Browser:
    """One page in headless Chromium that records every console error and uncaught exception."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda msg: self.errors.append(f"console.{msg.type}: {msg.text}")
                if msg.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def attrs(self, selector: str, name: str) -> list[str]:
        return [str(v) for v in self.page.eval_on_selector_all(
            selector, "(els, name) => els.map((e) => e.getAttribute(name))", name)]


def eventually(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """`check()`'s result once it stops raising AssertionError (the page redraws on its next poll)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# Records Content-Security-Policy violations in the page (Chromium also logs them as console errors).
WATCH_CSP = ("() => { window.cspViolations = []; document.addEventListener('securitypolicyviolation', "
             "(e) => window.cspViolations.push(e.violatedDirective + ' ' + e.blockedURI)); }")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'"
    )
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM}: run scripts/install_browser.sh as root "
                    "(or set FLEET_TEST_CHROMIUM to a Chromium binary)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = chromium.new_context(viewport={"width": 1360, "height": 900})
            context.set_default_timeout(20_000)
            yield Browser(context.new_page())
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def fleet(world: FleetWorld) -> FleetWorld:
    world.push("detector:v1", sm.classifier(1), task="classification")
    world.push("detector:v2", sm.classifier(2), task="classification")
    world.add_agents(1, labels={"site": "lab", "hw": "cpu"})
    world.add_agents(1, labels={"site": "depot", "note": MARKUP_LABEL}, first_index=1)
    world.fleet("rollout", "detector:v1", "--canary", "100%")
    assert world.wait_rollout("detector-v1")["phase"] == "Completed"
    return world


def test_the_controller_serves_the_page_and_its_assets_only(fleet: FleetWorld) -> None:
    url = fleet.cluster.url
    with httpx.Client(base_url=url, timeout=10) as http:
        root = http.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "/ui/"
        assert http.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
        page = http.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
        # Everything the page loads comes from the controller itself.
        assert not re.search(r"(src|href)=\"(https?:)?//", page.text), page.text
        script = http.get("/ui/app.js")
        assert script.headers["content-type"].startswith("text/javascript")
        assert "innerHTML" not in script.text.replace("no innerHTML", "")
        again = http.get("/ui/app.js", headers={"If-None-Match": script.headers["etag"]})
        assert again.status_code == 304
        for missing in ("/ui/nope.js", "/ui/..%2Fapp.py", "/ui/routes.py"):
            answer = http.get(missing)
            assert answer.status_code == 404 and answer.json()["error"] == "not_found", missing


def test_overview_rollout_and_device_pages(browser: Browser, fleet: FleetWorld) -> None:
    page = browser.page
    devices = fleet.json("devices", "ls")
    models = fleet.json("models", "ls")
    ids = sorted(d["id"] for d in devices)
    assert len(ids) == 2

    # When the operator opens the dashboard, it asks for a token before loading any data
    viewer = fleet.json("access", "create", "wall-screen", "--role", "viewer")["token"]
    page.goto(fleet.cluster.url + "/")
    page.wait_for_selector("[data-testid=login]")
    assert page.locator("[data-testid=device-row]").count() == 0
    assert page.url.endswith("/ui/")
    # And with a viewer token it shows the fleet; the token stays out of the URL, in this tab's storage
    page.fill("[data-testid=token-input]", viewer)
    page.click("[data-testid=token-submit]")
    page.wait_for_selector("[data-testid=device-row]")
    assert viewer not in page.url
    assert page.evaluate("() => sessionStorage.getItem('fleet.apiToken')") == viewer
    page.evaluate(WATCH_CSP)

    # Then it lists exactly the API's devices, with the versions each one serves
    assert sorted(browser.attrs("[data-testid=device-row]", "data-device")) == ids
    for device in devices:
        row = page.locator(f"[data-testid=device-row][data-device='{device['id']}']")
        expected = sorted(f"{m['model']}:{m['serving']}" for m in device["models"] if m["serving"])
        assert expected == ["detector:v1"]
        assert sorted(row.locator("[data-testid=serving]").all_inner_texts()) == expected
    assert page.inner_text("[data-testid=count-devices]").split()[0] == "2"
    # And every registered version, with its aliases and how many devices serve it
    shown = {(m, v) for m, v in zip(browser.attrs("[data-testid=version-row]", "data-model"),
                                    browser.attrs("[data-testid=version-row]", "data-version"), strict=True)}
    assert shown == {(m["name"], v["version"]) for m in models for v in m["versions"]}
    v1_row = page.locator("[data-testid=version-row][data-version=v1]")
    assert v1_row.locator("[data-testid=version-serving]").inner_text() == "2"
    # And a label full of markup is shown as text, not turned into elements
    assert f"note={MARKUP_LABEL}" in page.inner_text("[data-testid=devices]")
    assert page.locator("[data-testid=devices] i, [data-testid=devices] script").count() == 0
    browser.screenshot("overview-before-rollout")

    # When a canary rollout of v2 starts and the operator follows its link from the overview
    fleet.fleet("rollout", "detector:v2", "--canary", "50%", *GATE)
    page.click("[data-testid=rollout-row][data-rollout=detector-v2] a")
    page.wait_for_selector("[data-testid=rollout][data-rollout=detector-v2]")
    assert page.url.endswith("#/rollouts/detector-v2")
    first_phase = page.inner_text("h1 [data-testid=phase]")
    assert first_phase in ("Pending", "Progressing"), first_phase
    browser.screenshot("rollout-in-progress")

    # Then the page follows it live, without a reload, to its end
    page.wait_for_function(
        "() => ['Completed', 'RolledBack', 'Aborted', 'Paused'].includes("
        "document.querySelector('h1 [data-testid=phase]')?.textContent)", timeout=180_000, polling=500)
    # The page can be up to one poll behind the API: compare after one more refresh.
    page.wait_for_timeout(2500)
    rollout = fleet.rollout("detector-v2")
    assert rollout["phase"] == "Completed", rollout.get("message")
    assert page.inner_text("h1 [data-testid=phase]") == "Completed"

    # And it draws the latest gate metrics against their thresholds, with the API's verdicts
    metrics = rollout["analysis"]["metrics"]
    assert metrics, rollout["analysis"]
    assert browser.attrs("[data-testid=gate-metric]", "data-metric") == [m["metric"] for m in metrics]
    verdicts = {True: "ok", False: "fail", None: "not judged"}
    assert browser.attrs("[data-testid=gate-metric]", "data-verdict") == [verdicts[m["ok"]] for m in metrics]
    assert page.locator("[data-testid=gate-metric] line.threshold").count() == sum(
        1 for m in metrics if m["threshold"] is not None)
    assert page.inner_text("[data-testid=analysis-verdict]") == rollout["analysis"]["verdict"]
    # And one progress bar per step cohort, every planned device confirmed
    assert browser.attrs("[data-testid=cohort]", "data-step") == [str(c["step"]) for c in rollout["cohorts"]]
    assert page.locator(".seg-confirmed").count() >= 1
    assert page.locator("[data-testid=cohort-chart] .seg-pending").count() == 0
    # And the decisions timeline, newest first
    decisions = page.locator("[data-testid=decision]")
    assert decisions.count() == len(rollout["decisions"])
    assert rollout["decisions"][-1]["reason"] in decisions.first.inner_text()
    # And it draws the rollout's evidence inline, from the same time series the API serves
    paths = httpx.get(fleet.cluster.url + "/openapi.json", timeout=10).json()["paths"]
    assert {"/api/v1/rollouts/{name}/report", "/api/v1/rollouts/{name}/timeseries"} <= set(paths)
    evidence_is_drawn(browser, fleet, "detector-v2", rollout)
    browser.screenshot("rollout")

    # When the operator clicks "Download report", then the page fetches it with the token and saves the HTML report
    with page.expect_download() as saved:
        page.click("[data-testid=download-report]")
    report = saved.value
    assert report.url.startswith("blob:") and report.suggested_filename == "rollout-detector-v2-report.html"
    html = Path(str(report.path())).read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and html.count("<svg") == 3 and "rollout detector-v2" in html
    report.save_as(ARTIFACTS / "rollout-detector-v2-report.html")
    # And its blob URL is revoked once the download has started
    page.wait_for_function("(url) => window.revokedUrls && window.revokedUrls.includes(url)", arg=report.url,
                           timeout=10_000)
    # And the time series downloads as the API's JSON, grouped as the drift chart is
    with page.expect_download() as saved:
        page.click("[data-testid=download-timeseries]")
    series = json.loads(Path(str(saved.value.path())).read_text(encoding="utf-8"))
    assert series["rollout"]["name"] == "detector-v2" and series["drift"]["group_by"] == "note"
    assert page.inner_text("[data-testid=download-note]") == ""
    assert page.evaluate("() => window.cspViolations") == []

    # When the operator opens a device from the rollout's device list
    device_id = ids[1]
    page.click(f"[data-testid=rollout-device] a[href='#/devices/{device_id}']")
    page.wait_for_selector(f"[data-testid=device][data-device={device_id}]")

    # Then it shows what it serves, its slots and its recent update events, as the API has them
    detail = fleet.device(device_id)
    page.wait_for_function(
        "() => document.querySelector('[data-testid=device-serving]')?.textContent === 'v2'", timeout=30_000)
    slots = [(m["model"], s["role"], s["version"]) for m in detail["actual"]["models"] for s in m["slots"]]
    assert page.locator("[data-testid=slot]").count() == len(slots) >= 1
    assert page.locator("[data-testid=event]").count() >= 1
    assert any(e["version"] == "v2" for e in detail["events"])
    assert MARKUP_LABEL in page.inner_text("[data-testid=device]")
    assert page.locator("[data-testid=device] i, [data-testid=device] script").count() == 0
    browser.screenshot("device")

    # And back on the overview, the fleet now serves v2
    page.click("a.brand")
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=serving]')].map((e) => e.textContent).join() "
        "=== 'detector:v2,detector:v2'", timeout=30_000)
    assert page.locator("[data-testid=rollout-row][data-rollout=detector-v2] [data-testid=phase]").inner_text() \
        == "Completed"
    browser.screenshot("overview")

    # When the operator opens the first rollout, which put v1 on devices that served nothing
    page.click("[data-testid=rollout-row][data-rollout=detector-v1] a")
    page.wait_for_selector("[data-testid=rollout][data-rollout=detector-v1] [data-testid=evidence]")
    first = httpx.get(fleet.cluster.url + "/api/v1/rollouts/detector-v1/timeseries", headers=fleet.auth,
                      timeout=10).json()
    assert first["latency"]["candidate"]["count"] == 0 and first["agreement_over_time"] == []
    # Then its evidence panels say there is no latency or agreement data, and draw no empty chart
    assert "No paired latency data yet" in page.inner_text("[data-testid=latency-empty]")
    assert "No agreement data yet" in page.inner_text("[data-testid=agreement-empty]")
    assert page.locator("[data-testid=latency-chart], [data-testid=agreement-chart]").count() == 0

    # And nothing went wrong in the browser along the way
    assert browser.errors == []


def evidence_is_drawn(browser: Browser, fleet: FleetWorld, name: str, rollout: dict[str, Any]) -> None:
    """The rollout page's three evidence charts show what `/timeseries` holds, API strings as text."""
    page = browser.page
    url = f"{fleet.cluster.url}/api/v1/rollouts/{name}/timeseries"
    # Blob URLs the page revokes, for the download check that follows.
    page.evaluate("() => { window.revokedUrls = []; const revoke = URL.revokeObjectURL.bind(URL); "
                  "URL.revokeObjectURL = (u) => { window.revokedUrls.push(u); revoke(u); }; }")

    # Latency: one line per side, with p50 and p95 marked where the controller computes them
    page.wait_for_selector("[data-testid=latency-chart]")
    series = httpx.get(url, headers=fleet.auth, timeout=10).json()
    latency = page.locator("[data-testid=latency-chart]")
    assert latency.get_attribute("role") == "img" and latency.get_attribute("aria-label")
    assert (latency.locator("title").first.text_content() or "").startswith("Latency distribution")

    def latency_matches() -> None:
        data = httpx.get(url, headers=fleet.auth, timeout=10).json()["latency"]
        for side in ("serving", "candidate"):
            hist = LatencyHistogram.from_dict(data[side])
            assert hist.count > 0, side
            line = latency.locator(f"path[data-testid=latency-series][data-series={side}]")
            assert line.count() == 1 and line.get_attribute("data-count") == str(hist.count)
            assert len(re.findall(r"[ML]", line.get_attribute("d") or "")) >= 2 * 40
            for q, level in (("p50", 0.5), ("p95", 0.95)):
                mark = latency.locator(f"[data-testid=latency-quantile][data-series={side}][data-quantile={q}]")
                assert math.isclose(float(mark.get_attribute("data-value") or "nan"), hist.quantile(level),
                                    rel_tol=1e-9), (side, q)

    eventually(latency_matches)
    assert "ms" in (latency.text_content() or "") and "share of requests" in (latency.text_content() or "")

    # Agreement: a point per time bucket and output, and the gate's minimum as a line
    def agreement_matches() -> None:
        timeline = httpx.get(url, headers=fleet.auth, timeout=10).json()["agreement_over_time"]
        expected = sorted((str(p["start"]), output) for p in timeline
                          for output, score in p["agreement"].items() if score["value"] is not None)
        assert expected, timeline
        drawn = sorted(zip(browser.attrs("[data-testid=agreement-point]", "data-start"),
                           browser.attrs("[data-testid=agreement-point]", "data-output"), strict=True))
        assert [float(s) for s, _ in drawn] == [float(s) for s, _ in expected]
        assert [o for _, o in drawn] == [o for _, o in expected]

    eventually(agreement_matches)
    threshold = page.locator("[data-testid=agreement-chart] [data-testid=agreement-threshold]")
    assert float(threshold.get_attribute("data-value") or "nan") == rollout["gate"]["min_agreement"]

    # Drift: per version until a grouping is chosen, then a bar per group of that label
    drift = series["drift"]
    assert drift is not None
    assert browser.attrs("[data-testid=drift-bar]", "data-group") == (
        [g["group"] for g in drift["groups"]] if drift["groups"]
        else [f"{v['model']}:{v['version']}" for v in drift["versions"]])
    for key in ("site", "note"):
        page.select_option("[data-testid=drift-group-by]", key)

        def drift_matches(key: str = key) -> list[dict[str, Any]]:
            drift = httpx.get(url, params={"group_by": key}, headers=fleet.auth, timeout=10).json()["drift"]
            groups = drift["groups"]
            assert groups and drift["group_by"] == key
            assert browser.attrs("[data-testid=drift-bar]", "data-group") == [g["group"] for g in groups]
            assert browser.attrs("[data-testid=drift-bar]", "data-drifting") == [
                str(bool(g["drifting"])).lower() for g in groups]
            return groups

        groups = eventually(drift_matches)
        chart = page.locator("[data-testid=drift-chart]")
        assert chart.locator("[data-testid=drift-threshold]").count() == 1
        assert chart.locator("g.drifting").count() == sum(1 for g in groups if g["drifting"])
        assert chart.locator("[data-testid=drift-bar] rect.drift-value").count() == len(groups)
    # The label full of markup names a group: shown as its characters, never parsed
    assert MARKUP_LABEL in (page.locator("[data-testid=drift-chart]").text_content() or "")
    assert any(text.startswith(MARKUP_LABEL[:20])
               for text in page.locator("[data-testid=drift-bar] text.bar-label").all_text_contents())
    assert page.locator("[data-testid=evidence] i, [data-testid=evidence] script").count() == 0
    page.locator("[data-testid=evidence]").screenshot(path=str(ARTIFACTS / "rollout-evidence.png"))


def test_refused_token_brings_the_prompt_back(browser: Browser, fleet: FleetWorld) -> None:
    # Given a page in a fresh tab (its own sessionStorage), and a token an admin then revokes
    page = browser.page.context.new_page()
    try:
        made = fleet.json("access", "create", "short-lived", "--role", "viewer")
        page.goto(fleet.cluster.url + "/ui/")
        page.fill("[data-testid=token-input]", made["token"])
        page.click("[data-testid=token-submit]")
        page.wait_for_selector("[data-testid=device-row]")
        fleet.fleet("access", "revoke", made["id"])

        # When the page polls again, then it asks for a token and says why the old one was refused
        page.wait_for_selector("[data-testid=login]:not([hidden])", timeout=15_000)
        assert "revoked" in page.inner_text("[data-testid=login-error]")
        assert page.locator("[data-testid=device-row]").count() == 0 or not page.is_visible("#view")
        assert page.evaluate("() => sessionStorage.getItem('fleet.apiToken')") is None

        # And signing out forgets the token
        page.fill("[data-testid=token-input]", fleet.cluster.admin_token)
        page.click("[data-testid=token-submit]")
        page.wait_for_selector("[data-testid=device-row]")
        page.click("[data-testid=signout]")
        page.wait_for_selector("[data-testid=login]:not([hidden])")
        assert page.evaluate("() => sessionStorage.getItem('fleet.apiToken')") is None
    finally:
        page.close()
