/*
 * edge-fleet dashboard: a read-only view of the controller's REST API (/api/v1), polled every 2 s.
 *
 * Rules this script keeps:
 * - every string from the API reaches the page as a text node or an attribute value set with
 *   setAttribute: no innerHTML, no HTML strings, so a device label cannot inject markup;
 * - links carry only ids passed through encodeURIComponent;
 * - optional endpoints (drift, rollout report/timeseries) are used only when the controller's
 *   OpenAPI document lists them, so an older controller gets no 404s and no console errors;
 * - downloads (the rollout report, its JSON) are fetched with the bearer header like every other
 *   call and saved from a blob: URL, which is revoked once the download has started;
 * - the page is redrawn only when the fetched JSON changed, so a steady page keeps its text
 *   selection and scroll position between polls;
 * - the API token is asked for in a form, kept in sessionStorage (this tab only, never in a URL)
 *   and sent as `Authorization: Bearer`; no data is fetched without one, a refused token brings
 *   the form back with the controller's reason, and a too-weak role is shown in the banner.
 */
(() => {
  "use strict";

  const POLL_MS = 2000;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const ACTIVE_PHASES = new Set(["Pending", "Progressing", "Paused"]);
  const API = "/api/v1";
  const enc = encodeURIComponent;

  const view = document.getElementById("view");
  const counts = document.getElementById("counts");
  const crumbs = document.getElementById("crumbs");
  const banner = document.getElementById("banner");
  const live = document.getElementById("live");
  const loginForm = document.getElementById("login");
  const loginError = document.getElementById("login-error");
  const tokenInput = document.getElementById("token");
  const signout = document.getElementById("signout");
  const TOKEN_KEY = "fleet.apiToken";

  // -- DOM helpers: text only ----------------------------------------------------------------

  function append(node, children) {
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      if (Array.isArray(child)) append(node, child);
      else if (child instanceof Node) node.appendChild(child);
      else node.appendChild(document.createTextNode(String(child)));
    }
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      node.setAttribute(key, value === true ? "" : String(value));
    }
  }

  /** An HTML element; `attrs` are set as attributes, children become nodes (strings as text). */
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    return append(node, children);
  }

  /** An SVG element, same contract as h(). */
  function s(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    return append(node, children);
  }

  function link(hash, text, attrs) {
    return h("a", Object.assign({ href: hash }, attrs || {}), text);
  }

  const deviceHref = (id) => "#/devices/" + enc(id);
  const rolloutHref = (name) => "#/rollouts/" + enc(name);

  function badge(text, cls, attrs) {
    return h("span", Object.assign({ class: "badge " + (cls || "") }, attrs || {}), text);
  }

  function phaseBadge(phase) {
    // Phases are a fixed enum; anything else still shows, unstyled.
    return badge(phase || "?", "phase-" + String(phase).replace(/[^A-Za-z]/g, ""), { "data-testid": "phase" });
  }

  function table(headers, rows, emptyText, attrs) {
    if (!rows.length) return h("p", { class: "empty" }, emptyText);
    return h("table", attrs || {},
      h("thead", {}, h("tr", {}, headers.map((x) => (Array.isArray(x) ? h("th", { class: x[1] }, x[0]) : h("th", {}, x))))),
      h("tbody", {}, rows));
  }

  function panel(title, extra, ...children) {
    return h("section", { class: "panel" }, h("h2", {}, title, extra ? h("small", {}, extra) : null), children);
  }

  function fmtTime(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    return d.toLocaleString(undefined, { hour12: false });
  }

  function fmtNum(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "—";
    const n = Number(v);
    if (Number.isInteger(n) && Math.abs(n) >= 1) return String(n);
    return n.toPrecision(digits || 3).replace(/\.?0+(e|$)/, "$1");
  }

  function fmtPct(fraction) {
    return Math.round(Number(fraction) * 1000) / 10 + "%";
  }

  /** A label or hardware value as text: lists joined, objects as JSON, empty as "none". */
  function fmtValue(v) {
    if (Array.isArray(v)) return v.length ? v.map(fmtValue).join(", ") : "none";
    if (v !== null && typeof v === "object") return JSON.stringify(v);
    return String(v);
  }

  function labelChips(labels) {
    const entries = Object.entries(labels || {});
    if (!entries.length) return h("span", { class: "muted" }, "—");
    return entries.map(([k, v]) => h("span", { class: "chip" }, k + "=" + fmtValue(v)));
  }

  // -- API ---------------------------------------------------------------------------------------

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function storedToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (_ignored) {
      return ""; // storage disabled: ask again on each load
    }
  }

  let memoryToken = "";

  function currentToken() {
    return storedToken() || memoryToken;
  }

  function saveToken(token) {
    memoryToken = token;
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (_ignored) {
      // storage disabled: the token lives in this page only
    }
  }

  /** A successful response to GET `path` (bearer token unless `options.public`); HttpError otherwise. */
  async function apiGet(path, options) {
    const headers = { Accept: (options && options.accept) || "application/json" };
    const token = options && options.public ? "" : currentToken();
    if (token) headers.Authorization = "Bearer " + token;
    const response = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      try {
        const body = await response.json();
        if (body && body.message) message = body.message;
      } catch (_ignored) {
        // not JSON: keep the status line
      }
      throw new HttpError(response.status, message);
    }
    return response;
  }

  async function getJSON(path, options) {
    return (await apiGet(path, options)).json();
  }

  // Optional endpoints, discovered once from the OpenAPI document. null = not known yet.
  let capabilities = null;

  async function loadCapabilities() {
    if (capabilities !== null) return capabilities;
    try {
      const doc = await getJSON("/openapi.json", { public: true });
      const paths = new Set(Object.keys(doc.paths || {}));
      capabilities = {
        drift: paths.has(API + "/drift"),
        report: paths.has(API + "/rollouts/{name}/report"),
        timeseries: paths.has(API + "/rollouts/{name}/timeseries"),
      };
    } catch (_err) {
      // No OpenAPI document (disabled by a proxy?): try drift and cope with its 404.
      capabilities = { drift: true, report: false, timeseries: false };
    }
    return capabilities;
  }

  /** The drift report, or null when this controller has none. */
  async function getDrift() {
    const caps = await loadCapabilities();
    if (!caps.drift) return null;
    try {
      return await getJSON(API + "/drift");
    } catch (err) {
      if (err instanceof HttpError && (err.status === 404 || err.status === 405)) {
        caps.drift = false;
        return null;
      }
      throw err;
    }
  }

  async function fleetData() {
    const [devices, models, rollouts, drift] = await Promise.all([
      getJSON(API + "/devices"), getJSON(API + "/models"), getJSON(API + "/rollouts"), getDrift(),
    ]);
    return { devices, models, rollouts, drift };
  }

  /** device id -> [{model, version, max_psi, top_feature}] of the models drifting on it. */
  function driftingByDevice(drift) {
    const out = new Map();
    if (!drift) return out;
    for (const entry of drift.devices || []) {
      if (!entry.drifting) continue;
      if (!out.has(entry.device_id)) out.set(entry.device_id, []);
      out.get(entry.device_id).push(entry);
    }
    return out;
  }

  // -- header ------------------------------------------------------------------------------------

  function renderCounts(fleet) {
    const devices = fleet.devices;
    const connected = devices.filter((d) => d.connected).length;
    const versions = fleet.models.reduce((n, m) => n + (m.versions || []).length, 0);
    const active = fleet.rollouts.filter((r) => ACTIVE_PHASES.has(r.phase)).length;
    const drifting = driftingByDevice(fleet.drift).size;
    const item = (id, value, text, alert) =>
      h("li", { "data-testid": "count-" + id, class: alert ? "alert" : null }, h("b", {}, String(value)), " " + text);
    counts.replaceChildren(
      item("devices", devices.length, "devices"),
      item("connected", connected, "connected", connected < devices.length),
      item("models", fleet.models.length, "models"),
      item("versions", versions, "versions"),
      item("rollouts", active, "active rollouts"),
      fleet.drift ? item("drifting", drifting, "drifting", drifting > 0) : null,
    );
  }

  function setCrumbs(...parts) {
    crumbs.replaceChildren(...parts.flatMap((p, i) => (i ? [" / ", p] : [p])));
  }

  // -- overview ----------------------------------------------------------------------------------

  function servingChips(device) {
    const chips = [];
    for (const m of device.models || []) {
      if (m.serving) chips.push(h("span", { class: "chip", "data-testid": "serving" }, m.model + ":" + m.serving));
      if (m.shadow) chips.push(h("span", { class: "chip shadow", title: "shadow" }, m.model + ":" + m.shadow + " (shadow)"));
    }
    return chips.length ? chips : h("span", { class: "muted" }, "none");
  }

  function updateStates(device) {
    const busy = (device.models || []).filter((m) => m.update_state && m.update_state !== "Idle");
    if (!busy.length) return badge("Idle", "", { "data-testid": "update-state" });
    return busy.map((m) => {
      const cls = m.update_state === "Failed" ? "fail" : m.update_state === "RollingBack" ? "warn" : "info";
      const target = (m.update && m.update.target_version) || "";
      return badge(m.model + ": " + m.update_state + (target ? " → " + target : ""), cls, { "data-testid": "update-state" });
    });
  }

  function driftBadge(entries, driftKnown) {
    if (!driftKnown) return h("span", { class: "muted", title: "this controller reports no drift" }, "n/a");
    if (!entries || !entries.length) return h("span", { class: "muted" }, "—");
    const title = entries.map((e) => e.model + ":" + e.version + " PSI " + fmtNum(e.max_psi) + " (" + e.top_feature + ")").join("\n");
    return badge("drifting", "drift", { title, "data-testid": "drifting" });
  }

  function devicesPanel(fleet) {
    const drifting = driftingByDevice(fleet.drift);
    const rows = fleet.devices.map((d) => h("tr", { "data-testid": "device-row", "data-device": d.id },
      h("td", {}, link(deviceHref(d.id), d.id, { class: "mono" })),
      h("td", {}, labelChips(d.labels)),
      h("td", {}, d.connected ? badge("connected", "ok") : badge("offline", "fail"),
        d.decommissioned ? [" ", badge("decommissioned", "")] : null),
      h("td", { "data-testid": "device-versions" }, servingChips(d)),
      h("td", {}, updateStates(d)),
      h("td", {}, driftBadge(drifting.get(d.id), Boolean(fleet.drift))),
      h("td", { class: "muted" }, fmtTime(d.last_seen_at))));
    return panel("Devices", fleet.devices.length + " enrolled",
      table(["Device", "Labels", "Connection", "Serving", "Update", "Drift", "Last seen"], rows,
        "No devices have enrolled yet. Create a token with `fleet tokens create` and start `fleet agent run`.",
        { "data-testid": "devices" }));
  }

  function modelsPanel(fleet) {
    // How many devices serve each model:version, so the registry view shows what is live.
    const serving = new Map();
    for (const d of fleet.devices) {
      for (const m of d.models || []) {
        if (!m.serving) continue;
        const key = m.model + ":" + m.serving;
        serving.set(key, (serving.get(key) || 0) + 1);
      }
    }
    const rows = [];
    for (const model of fleet.models) {
      const aliasesOf = new Map();
      for (const [alias, version] of Object.entries(model.aliases || {})) {
        if (!aliasesOf.has(version)) aliasesOf.set(version, []);
        aliasesOf.get(version).push(alias);
      }
      for (const v of model.versions || []) {
        const n = serving.get(model.name + ":" + v.version) || 0;
        rows.push(h("tr", { "data-testid": "version-row", "data-model": model.name, "data-version": v.version },
          h("td", {}, h("b", {}, model.name)),
          h("td", { class: "mono" }, v.version),
          h("td", {}, (aliasesOf.get(v.version) || []).map((a) => h("span", { class: "chip alias" }, a)),
            v.version === model.latest ? h("span", { class: "chip" }, "latest") : null),
          h("td", {}, v.task),
          h("td", { class: "num" }, String(v.release)),
          h("td", { class: "num", "data-testid": "version-serving" }, String(n)),
          h("td", { class: "mono muted", title: v.sha256 }, String(v.sha256).slice(0, 12)),
          h("td", { class: "muted" }, fmtTime(v.created_at))));
      }
    }
    return panel("Models and versions", fleet.models.length + " models",
      table(["Model", "Version", "Aliases", "Task", ["Release", "num"], ["Devices serving", "num"], "SHA-256", "Pushed"],
        rows, "No models yet. Push one with `fleet models push NAME:VERSION model.onnx`.", { "data-testid": "versions" }));
  }

  function groupsPanel(fleet) {
    const drifting = driftingByDevice(fleet.drift);
    const groups = new Map();
    for (const d of fleet.devices) {
      for (const [k, v] of Object.entries(d.labels || {})) {
        const key = k + "=" + String(v);
        const g = groups.get(key) || { devices: 0, connected: 0, drifting: 0 };
        g.devices += 1;
        if (d.connected) g.connected += 1;
        if (drifting.has(d.id)) g.drifting += 1;
        groups.set(key, g);
      }
    }
    const rows = [...groups.entries()].sort((a, b) => a[0].localeCompare(b[0])).map(([key, g]) =>
      h("tr", { "data-testid": "group-row" },
        h("td", {}, h("span", { class: "chip" }, key)),
        h("td", { class: "num" }, String(g.devices)),
        h("td", { class: "num" }, String(g.connected)),
        h("td", { class: "num" }, fleet.drift ? (g.drifting ? badge(String(g.drifting), "drift") : "0") : "n/a")));
    return panel("Groups", "by device label",
      table(["Label", ["Devices", "num"], ["Connected", "num"], ["Drifting", "num"]], rows, "No device labels."));
  }

  function driftPanel(fleet) {
    if (!fleet.drift) {
      return panel("Drift", null, h("p", { class: "empty" }, "This controller does not report drift."));
    }
    const rows = (fleet.drift.versions || []).map((v) => h("tr", { "data-testid": "drift-row" },
      h("td", {}, v.model + ":" + v.version),
      h("td", { class: "num" }, String((v.devices || []).length)),
      h("td", {}, (v.drifting_devices || []).length
        ? (v.drifting_devices || []).map((id) => link(deviceHref(id), id, { class: "chip mono" }))
        : h("span", { class: "muted" }, "none")),
      h("td", { class: "num" }, fmtNum(v.max_psi)),
      h("td", {}, v.top_feature || "—"),
      h("td", { class: "num" }, String(v.samples || 0))));
    return panel("Drift", "PSI threshold " + fmtNum(fleet.drift.psi_threshold) + ", last " + fmtNum(fleet.drift.since_s) + " s",
      table(["Serving version", ["Devices", "num"], "Drifting devices", ["Max PSI", "num"], "Top feature", ["Samples", "num"]],
        rows, "No drift measured in the window yet."));
  }

  function rolloutsPanel(fleet) {
    const rows = fleet.rollouts.map((r) => {
      const devices = r.devices || {};
      return h("tr", { "data-testid": "rollout-row", "data-rollout": r.name },
        h("td", {}, link(rolloutHref(r.name), r.name, { class: "mono" })),
        h("td", {}, r.model + ":" + r.version),
        h("td", {}, phaseBadge(r.phase)),
        h("td", {}, "step " + r.step + "/" + (r.steps || []).length,
          r.step_weight !== null && r.step_weight !== undefined ? " (" + fmtPct(r.step_weight) + ")" : "",
          r.step_phase ? h("span", { class: "muted" }, " · " + r.step_phase) : null),
        h("td", { class: "num" }, String(devices.total || 0)),
        h("td", { class: "muted" }, r.message || ""),
        h("td", { class: "muted" }, fmtTime(r.created_at)));
    });
    return panel("Rollouts", fleet.rollouts.filter((r) => ACTIVE_PHASES.has(r.phase)).length + " active",
      table(["Rollout", "Target", "Phase", "Step", ["Devices", "num"], "Message", "Started"], rows,
        "No rollouts yet. Start one with `fleet rollout NAME:VERSION --canary 10%`.", { "data-testid": "rollouts" }));
  }

  async function overview() {
    const fleet = await fleetData();
    return {
      data: fleet,
      render: () => {
        renderCounts(fleet);
        setCrumbs("Fleet overview");
        return h("div", {},
          rolloutsPanel(fleet),
          devicesPanel(fleet),
          modelsPanel(fleet),
          h("div", { class: "grid" }, groupsPanel(fleet), driftPanel(fleet)));
      },
    };
  }

  // -- rollout detail ----------------------------------------------------------------------------

  const SEGMENTS = [
    ["confirmed", "confirmed serving"],
    ["serving", "told to serve"],
    ["shadowing", "shadowing"],
    ["pending", "pending"],
    ["failed", "failed"],
    ["rolled_back", "rolled back"],
  ];

  /** One stacked bar per step cohort: how far its devices got, against the planned size. */
  function cohortChart(cohorts) {
    const width = 720;
    const rowH = 34;
    const left = 150;
    const right = 150;
    const barW = width - left - right;
    const svg = s("svg", { class: "chart", viewBox: "0 0 " + width + " " + (cohorts.length * rowH + 6),
      width, height: cohorts.length * rowH + 6, role: "img", "aria-label": "Cohort progress per step",
      "data-testid": "cohort-chart" });
    cohorts.forEach((c, i) => {
      const y = i * rowH + 4;
      const capacity = Math.max(c.planned || 0, c.assigned || 0, 1);
      // "serving" counts confirmed devices too; the bar shows them apart.
      const values = {
        confirmed: c.confirmed || 0,
        serving: Math.max(0, (c.serving || 0) - (c.confirmed || 0)),
        shadowing: c.shadowing || 0,
        pending: c.pending || 0,
        failed: c.failed || 0,
        rolled_back: c.rolled_back || 0,
      };
      const g = s("g", { "data-testid": "cohort", "data-step": c.step });
      g.appendChild(s("text", { x: 0, y: y + 17 }, "Step " + c.step + " · " + fmtPct(c.fraction)));
      g.appendChild(s("rect", { class: "track", x: left, y: y + 4, width: barW, height: 18, rx: 3 }));
      let x = left;
      for (const [key, label] of SEGMENTS) {
        const n = values[key];
        if (!n) continue;
        const w = (n / capacity) * barW;
        g.appendChild(s("rect", { class: "seg-" + key, x, y: y + 4, width: Math.max(w, 1), height: 18 },
          s("title", {}, label + ": " + n)));
        x += w;
      }
      g.appendChild(s("text", { x: left + barW + 10, y: y + 17, class: "dim" },
        (c.confirmed || 0) + "/" + (c.planned || 0) + " confirmed" + (c.failed ? ", " + c.failed + " failed" : "")));
      svg.appendChild(g);
    });
    return h("div", {}, svg,
      h("div", { class: "legend" }, SEGMENTS.map(([key, label]) => h("span", { class: "seg-" + key }, label))));
  }

  /** The scale a gate metric's bar is drawn on: 0..1 for shares and ratios, else 0..max*1.25. */
  function metricScale(row) {
    const v = typeof row.value === "number" ? Math.max(row.value, 0) : 0;
    const t = typeof row.threshold === "number" ? Math.max(row.threshold, 0) : 0;
    if (row.metric !== "samples" && v <= 1 && t <= 1) return 1;
    return Math.max(v, t, 1e-9) * 1.25;
  }

  function verdictClass(ok) {
    return ok === true ? "bar-ok" : ok === false ? "bar-fail" : "bar-none";
  }

  /** Each gate metric as a bar (its value) against a tick (its threshold): green ok, red fail, grey not judged. */
  function gateChart(metrics) {
    const width = 720;
    const rowH = 40;
    const left = 190;
    const right = 170;
    const barW = width - left - right;
    const svg = s("svg", { class: "chart", viewBox: "0 0 " + width + " " + (metrics.length * rowH + 8),
      width, height: metrics.length * rowH + 8, role: "img", "aria-label": "Gate metrics against thresholds",
      "data-testid": "gate-chart" });
    metrics.forEach((row, i) => {
      const y = i * rowH + 6;
      const scale = metricScale(row);
      const verdict = row.ok === true ? "ok" : row.ok === false ? "fail" : "not judged";
      const name = row.metric + (row.group ? " [" + row.group + "]" : "");
      const g = s("g", { "data-testid": "gate-metric", "data-metric": row.metric, "data-verdict": verdict },
        s("title", {}, row.detail || name));
      g.appendChild(s("text", { x: 0, y: y + 20 }, name));
      g.appendChild(s("rect", { class: "track", x: left, y: y + 8, width: barW, height: 16, rx: 3 }));
      if (typeof row.value === "number") {
        // The axis starts at 0: a negative value (a candidate faster than the baseline) is a stub.
        const w = Math.min(Math.max(row.value, 0) / scale, 1) * barW;
        g.appendChild(s("rect", { class: verdictClass(row.ok), x: left, y: y + 8, width: Math.max(w, 2), height: 16, rx: 3 }));
      }
      if (typeof row.threshold === "number") {
        const tx = left + Math.min(Math.max(row.threshold, 0) / scale, 1) * barW;
        g.appendChild(s("line", { class: "threshold", x1: tx, x2: tx, y1: y + 3, y2: y + 29 }));
        g.appendChild(s("text", { x: tx, y: y + 2, class: "dim", "text-anchor": "middle", "font-size": 10 },
          (row.comparison || "") + " " + fmtNum(row.threshold)));
      }
      g.appendChild(s("text", { x: left + barW + 10, y: y + 20 },
        (typeof row.value === "number" ? fmtNum(row.value) : "no data") + "  ",
        s("tspan", { class: "dim" }, verdict + (row.samples !== undefined ? " · n=" + row.samples : ""))));
      svg.appendChild(g);
    });
    return h("div", {}, svg, h("div", { class: "legend" },
      h("span", { class: "bar-ok" }, "passes"), h("span", { class: "bar-fail" }, "fails"),
      h("span", { class: "bar-none" }, "not judged yet"), h("span", {}, "| tick = threshold")));
  }

  // -- rollout evidence: latency distributions, agreement over time, drift per group -------------
  //
  // The same evidence as the HTML report (`fleet rollout report`), drawn from the rollout's
  // /timeseries JSON: merged latency histograms of the shadow windows, agreement per time bucket
  // and drift per device label group.

  const CHART_W = 720;
  // Latency distributions are drawn over this many log-spaced bins between the 0.5% and 99.5% quantiles.
  const LATENCY_BINS = 40;
  const SERIES_CLASSES = 5;
  // Drift grouping picked on a rollout page (rollout name -> device label key); absent: the controller's choice.
  const driftGroupBy = new Map();

  function timeseriesPath(name) {
    const key = driftGroupBy.get(name);
    return API + "/rollouts/" + enc(name) + "/timeseries" + (key ? "?group_by=" + enc(key) : "");
  }

  /** `{data}` with the rollout's time series, `{error}` when it could not be read, null when unsupported. */
  async function getTimeseries(name) {
    const caps = await loadCapabilities();
    if (!caps.timeseries) return null;
    try {
      return { data: await getJSON(timeseriesPath(name)) };
    } catch (err) {
      if (err instanceof HttpError && err.status === 401) throw err;
      return { error: err && err.message ? err.message : String(err) };
    }
  }

  /** A latency histogram from its JSON (DDSketch buckets) as sorted [value, count] pairs and totals. */
  function histogram(raw) {
    const source = raw || {};
    const accuracy = Number(source.relative_accuracy) || 0.01;
    const gamma = (1 + accuracy) / (1 - accuracy);
    const bins = Object.entries(source.buckets || {})
      .map(([index, n]) => [Number(index), Number(n)])
      .filter(([index, n]) => Number.isFinite(index) && n > 0)
      .sort((a, b) => a[0] - b[0])
      .map(([index, n]) => [(2 * Math.pow(gamma, index)) / (gamma + 1), n]);
    const zero = Number(source.zero_count) || 0;
    if (zero > 0) bins.unshift([0, zero]);
    const count = bins.reduce((sum, bin) => sum + bin[1], 0);
    return { bins, count, min: Number(source.min) || 0, max: Number(source.max) || 0 };
  }

  /** The q-quantile as the controller computes it: the bucket's midpoint, clamped to the observed range. */
  function quantile(hist, q) {
    if (!hist.count) return NaN;
    const rank = q * (hist.count - 1);
    let seen = 0;
    for (const [value, n] of hist.bins) {
      seen += n;
      if (rank < seen) return value === 0 ? 0 : Math.min(Math.max(value, hist.min), hist.max);
    }
    return hist.max;
  }

  /** Share of the histogram's requests in each [edges[i], edges[i+1]) interval; the ends take what lies beyond. */
  function binShares(hist, edges) {
    const shares = new Array(edges.length - 1).fill(0);
    for (const [value, n] of hist.bins) {
      let i = 0;
      while (i < shares.length - 1 && value >= edges[i + 1]) i++;
      shares[i] += n / hist.count;
    }
    return shares;
  }

  /** Tick values for a log axis: 1-2-5 steps inside [low, high], powers of ten when that is too many. */
  function logTicks(low, high) {
    const ticks = [];
    for (let e = Math.floor(Math.log10(low)); e <= Math.ceil(Math.log10(high)); e++) {
      for (const m of [1, 2, 5]) {
        const v = Number((m * Math.pow(10, e)).toPrecision(6));
        if (v >= low && v <= high) ticks.push(v);
      }
    }
    if (ticks.length > 8) return ticks.filter((v) => String(v).replace(/[0.]/g, "") === "1");
    if (ticks.length < 2) return [low, Math.sqrt(low * high), high];
    return ticks;
  }

  function fmtClock(seconds) {
    return new Date(seconds * 1000).toLocaleTimeString(undefined, { hour12: false });
  }

  function shorten(text, max) {
    return text.length > max ? text.slice(0, max - 1) + "…" : text;
  }

  /** An <svg> with its accessible name (aria-label and <title>) and the plot's axes and axis titles. */
  function chartFrame(testid, label, height, box, xLabel, yLabel) {
    const svg = s("svg", { class: "chart evidence", viewBox: "0 0 " + CHART_W + " " + height, width: CHART_W,
      height, role: "img", "aria-label": label, "data-testid": testid }, s("title", {}, label));
    svg.appendChild(s("line", { class: "axis", x1: box.left, x2: box.right, y1: box.bottom, y2: box.bottom }));
    if (yLabel !== null) {
      svg.appendChild(s("line", { class: "axis", x1: box.left, x2: box.left, y1: box.top, y2: box.bottom }));
      const cy = (box.top + box.bottom) / 2;
      svg.appendChild(s("text", { class: "axis-label", x: 14, y: cy, "text-anchor": "middle",
        transform: "rotate(-90 14 " + cy + ")" }, yLabel));
    }
    svg.appendChild(s("text", { class: "axis-label", x: (box.left + box.right) / 2, y: height - 6,
      "text-anchor": "middle" }, xLabel));
    return svg;
  }

  function xTick(svg, box, x, text) {
    svg.appendChild(s("line", { class: "tick-mark", x1: x, x2: x, y1: box.bottom, y2: box.bottom + 5 }));
    // Labels at the plot's ends grow inwards, so the chart's edge never clips them.
    const anchor = x - box.left < 24 ? "start" : box.right - x < 24 ? "end" : "middle";
    svg.appendChild(s("text", { class: "tick", x, y: box.bottom + 18, "text-anchor": anchor }, text));
  }

  function yTick(svg, box, y, text) {
    svg.appendChild(s("line", { class: "grid-line", x1: box.left, x2: box.right, y1: y, y2: y }));
    svg.appendChild(s("text", { class: "tick", x: box.left - 6, y: y + 4, "text-anchor": "end" }, text));
  }

  function noEvidence(testid, text) {
    return h("p", { class: "empty", "data-testid": testid + "-empty" }, text);
  }

  /** Serving vs candidate latency on the same mirrored requests: two step lines, p50 and p95 marked. */
  function latencyChart(latency) {
    const series = [["serving", histogram(latency && latency.serving)],
      ["candidate", histogram(latency && latency.candidate)]];
    if (series.some(([, hist]) => !hist.count)) {
      return noEvidence("latency", "No paired latency data yet: the candidate has not shadowed any requests.");
    }
    const low = Math.max(Math.min(...series.map(([, hist]) => quantile(hist, 0.005))), 1e-3);
    const high = Math.max(...series.map(([, hist]) => quantile(hist, 0.995)), low * 1.01);
    const edges = [];
    for (let i = 0; i <= LATENCY_BINS; i++) edges.push(low * Math.pow(high / low, i / LATENCY_BINS));
    const drawn = series.map(([name, hist]) => ({ name, hist, shares: binShares(hist, edges),
      p50: quantile(hist, 0.5), p95: quantile(hist, 0.95) }));
    const peak = Math.max(...drawn.flatMap((d) => d.shares)) || 1;
    const height = 280;
    const box = { left: 64, right: CHART_W - 20, top: 14, bottom: height - 52 };
    const xOf = (v) => box.left + (box.right - box.left) * Math.min(Math.max(Math.log(v / low) / Math.log(high / low), 0), 1);
    const yOf = (share) => box.bottom - (box.bottom - box.top) * (share / peak);
    const svg = chartFrame("latency-chart", "Latency distribution per request, serving vs candidate", height, box,
      "latency per request, ms (log scale)", "share of requests");
    for (const fraction of [0, 0.5, 1]) yTick(svg, box, yOf(peak * fraction), fmtPct(peak * fraction));
    for (const v of logTicks(low, high)) xTick(svg, box, xOf(v), fmtNum(v) + " ms");
    for (const d of drawn) {
      const path = d.shares.map((share, i) => (i ? "L" : "M") + xOf(edges[i]).toFixed(1) + "," + yOf(share).toFixed(1) +
        " L" + xOf(edges[i + 1]).toFixed(1) + "," + yOf(share).toFixed(1)).join(" ");
      svg.appendChild(s("path", { class: "lat-line lat-" + d.name, d: path, "data-testid": "latency-series",
        "data-series": d.name, "data-count": d.hist.count }, s("title", {}, d.name + ": " + d.hist.count + " requests")));
      for (const [q, value] of [["p50", d.p50], ["p95", d.p95]]) {
        const x = xOf(Math.max(value, low));
        svg.appendChild(s("line", { class: "q-mark lat-" + d.name + " q-" + q, x1: x, x2: x, y1: box.top, y2: box.bottom,
          "data-testid": "latency-quantile", "data-series": d.name, "data-quantile": q, "data-value": value },
          s("title", {}, d.name + " " + q + " " + fmtNum(value) + " ms")));
      }
    }
    const legend = h("div", { class: "legend" }, drawn.map((d) =>
      h("span", { class: "lat-" + d.name, "data-testid": "latency-legend" },
        d.name + ": p50 " + fmtNum(d.p50) + " ms · p95 " + fmtNum(d.p95) + " ms · n=" + d.hist.count)),
      h("span", { class: "plain" }, "| solid mark = p50, dashed = p95"));
    return h("div", {}, svg, legend);
  }

  /** The gate's minimum agreement: from the rollout's gate policy, else from its latest agreement metric. */
  function minAgreement(ts, r) {
    for (const gate of [ts.rollout && ts.rollout.gate, r.gate]) {
      if (gate && typeof gate.min_agreement === "number") return gate.min_agreement;
    }
    const row = ((r.analysis && r.analysis.metrics) || []).find((m) =>
      String(m.metric).startsWith("agreement") && typeof m.threshold === "number");
    return row ? row.threshold : null;
  }

  /** Agreement per output over time (one line per output, a point per time bucket), the gate's minimum dashed. */
  function agreementChart(timeline, threshold) {
    const outputs = [...new Set(timeline.flatMap((p) => Object.keys(p.agreement || {})))].sort();
    const lines = outputs.map((output) => ({ output, points: timeline
      .map((p) => ({ start: Number(p.start), score: (p.agreement || {})[output] }))
      .filter((p) => p.score && typeof p.score.value === "number") }));
    const values = lines.flatMap((l) => l.points.map((p) => p.score.value));
    if (!values.length) {
      return noEvidence("agreement", "No agreement data yet: no shadow window has reported agreement.");
    }
    const low = Math.max(Math.min(Math.min(...values, threshold === null ? 1 : threshold, 1) - 0.02, 0.9), -1);
    const t0 = Number(timeline[0].start);
    const t1 = Number(timeline[timeline.length - 1].start);
    const height = 280;
    const box = { left: 64, right: CHART_W - 20, top: 14, bottom: height - 52 };
    const xOf = (t) => (t1 > t0 ? box.left + ((box.right - box.left) * (t - t0)) / (t1 - t0) : (box.left + box.right) / 2);
    const yOf = (v) => box.bottom - ((box.bottom - box.top) * (v - low)) / (1 - low);
    const svg = chartFrame("agreement-chart", "Agreement of candidate with serving model over time", height, box,
      "time (start of each of " + timeline.length + " buckets)", "agreement");
    for (let i = 0; i <= 4; i++) yTick(svg, box, yOf(low + ((1 - low) * i) / 4), fmtNum(low + ((1 - low) * i) / 4, 3));
    const times = t1 > t0 ? [t0, (t0 + t1) / 2, t1] : [t0];
    for (const t of times) xTick(svg, box, xOf(t), fmtClock(t));
    if (threshold !== null) {
      const y = yOf(threshold);
      svg.appendChild(s("line", { class: "threshold-line", x1: box.left, x2: box.right, y1: y, y2: y,
        "data-testid": "agreement-threshold", "data-value": threshold }, s("title", {}, "gate minimum " + threshold)));
      svg.appendChild(s("text", { class: "threshold-text", x: box.right - 4, y: y - 5, "text-anchor": "end" },
        "min_agreement " + fmtNum(threshold)));
    }
    lines.forEach((line, n) => {
      const cls = "series-" + (n % SERIES_CLASSES);
      const coords = line.points.map((p) => [xOf(p.start), yOf(p.score.value)]);
      if (!coords.length) return;
      const g = s("g", { class: cls, "data-testid": "agreement-series", "data-output": line.output });
      g.appendChild(s("polyline", { class: "agr-line", points: coords.map(([x, y]) => x.toFixed(1) + "," + y.toFixed(1)).join(" ") },
        s("title", {}, line.output)));
      line.points.forEach((p, i) => g.appendChild(s("circle", { class: "agr-point", cx: coords[i][0].toFixed(1),
        cy: coords[i][1].toFixed(1), r: 3.5, "data-testid": "agreement-point", "data-output": line.output, "data-start": p.start },
        s("title", {}, fmtClock(p.start) + " · " + line.output + ": " + fmtNum(p.score.value, 4) + " " +
          (p.score.what || "agreement") + " (n=" + p.score.samples + ")"))));
      svg.appendChild(g);
    });
    const legend = h("div", { class: "legend" }, lines.map((line, n) => {
      const what = line.points.length ? line.points[line.points.length - 1].score.what : "";
      return h("span", { class: "series-" + (n % SERIES_CLASSES) }, line.output + (what ? " (" + what + ")" : ""));
    }), threshold !== null ? h("span", { class: "threshold" }, "gate minimum " + fmtNum(threshold)) : null);
    return h("div", {}, svg, legend);
  }

  /** Max PSI per group (per version without groups) as bars against the threshold; drifting ones in red. */
  function driftChart(drift) {
    if (!drift) return noEvidence("drift", "No drift data yet: no serving window reported input statistics.");
    const grouped = (drift.groups || []).length > 0;
    const entries = grouped
      ? drift.groups.map((g) => ({ key: String(g.group), label: shorten(String(g.group), 26) + " · " + g.version, entry: g }))
      : (drift.versions || []).map((v) => ({ key: v.model + ":" + v.version, label: v.model + ":" + v.version, entry: v }));
    if (!entries.length) return noEvidence("drift", "No drift data yet: no serving window reported input statistics.");
    const threshold = typeof drift.psi_threshold === "number" ? drift.psi_threshold : null;
    const psiOf = (e) => (typeof e.entry.max_psi === "number" ? e.entry.max_psi : 0);
    const peak = Math.max((threshold || 0.1) * 1.5, ...entries.map(psiOf));
    const rowH = 26;
    const height = 14 + entries.length * rowH + 48;
    const box = { left: 230, right: CHART_W - 170, top: 10, bottom: 14 + entries.length * rowH };
    const xOf = (v) => box.left + ((box.right - box.left) * Math.min(Math.max(v, 0), peak)) / peak;
    const svg = chartFrame("drift-chart", "Drift per " + (grouped ? "group of " + drift.group_by : "version") +
      ": max PSI against the threshold", height, box, "max PSI over the input and output features", null);
    for (const v of [0, peak / 2, peak]) xTick(svg, box, xOf(v), fmtNum(v, 2));
    entries.forEach((e, i) => {
      const y = box.top + i * rowH;
      const psi = psiOf(e);
      const drifting = Boolean(e.entry.drifting);
      const eligible = e.entry.eligible !== false;
      const g = s("g", { class: drifting ? "drifting" : eligible ? "steady" : "ineligible", "data-testid": "drift-bar",
        "data-group": e.key, "data-version": e.entry.version, "data-drifting": String(drifting) });
      g.appendChild(s("title", {}, e.key + (grouped ? " · " + e.entry.version : "") + ": max PSI " + fmtNum(psi) + (e.entry.top_feature ? " (" + e.entry.top_feature + ")" : "") +
        ", " + (e.entry.samples || 0) + " samples" + (drifting ? ", drifting" : "")));
      g.appendChild(s("text", { class: "bar-label", x: box.left - 8, y: y + 16, "text-anchor": "end" }, shorten(e.label, 34)));
      g.appendChild(s("rect", { class: "track", x: box.left, y: y + 4, width: box.right - box.left, height: 16, rx: 2 }));
      g.appendChild(s("rect", { class: "drift-value", x: box.left, y: y + 4, width: Math.max(xOf(psi) - box.left, 1), height: 16, rx: 2 }));
      g.appendChild(s("text", { class: drifting ? "bar-note alert" : "bar-note", x: box.right + 8, y: y + 16 },
        eligible ? fmtNum(psi) + (drifting ? " drifting" : "")
          : "too few samples (" + (e.entry.samples || 0) + (drift.min_samples ? " of " + drift.min_samples : "") + ")"));
      svg.appendChild(g);
    });
    if (threshold !== null) {
      const x = xOf(threshold);
      svg.appendChild(s("line", { class: "threshold-line", x1: x, x2: x, y1: box.top, y2: box.bottom,
        "data-testid": "drift-threshold", "data-value": threshold }, s("title", {}, "PSI threshold " + threshold)));
    }
    const legend = h("div", { class: "legend" }, h("span", { class: "drift-steady" }, "below threshold"),
      h("span", { class: "drift-drifting" }, "drifting"), h("span", { class: "drift-ineligible" }, "too few samples"),
      threshold !== null ? h("span", { class: "threshold" }, "PSI threshold " + fmtNum(threshold)) : null);
    return h("div", {}, svg, legend);
  }

  /** A select of device label keys to group drift by; choosing one refetches the time series. */
  function driftGroupPicker(name, fleet, drift) {
    const keys = [...new Set(fleet.devices.flatMap((d) => Object.keys(d.labels || {})))].sort();
    const chosen = driftGroupBy.get(name) || "";
    const fallback = drift && drift.group_by && !chosen ? drift.group_by : "";
    const select = h("select", { "data-testid": "drift-group-by", "aria-label": "Group drift by device label" },
      h("option", { value: "", selected: !chosen }, fallback ? "default (" + fallback + ")" : "per version"),
      keys.map((k) => h("option", { value: k, selected: k === chosen }, k)));
    select.addEventListener("change", () => {
      if (select.value) driftGroupBy.set(name, select.value);
      else driftGroupBy.delete(name);
      lastKey = null;
      refresh();
    });
    return h("label", { class: "picker" }, "group by ", select);
  }

  function evidencePanels(r, fleet, ts) {
    if (!ts) return null; // this controller serves no time series
    if (ts.error) {
      return panel("Evidence", null, h("p", { class: "empty", "data-testid": "evidence-error" },
        "Cannot read this rollout's time series: " + ts.error));
    }
    const data = ts.data;
    const buckets = (data.agreement_over_time || []).length;
    return h("div", { class: "grid evidence-grid", "data-testid": "evidence" },
      panel("Latency, serving vs candidate", "paired shadow requests", latencyChart(data.latency)),
      panel("Agreement over time", buckets + " time bucket" + (buckets === 1 ? "" : "s"),
        agreementChart(data.agreement_over_time || [], minAgreement(data, r))),
      panel("Drift per group", driftGroupPicker(r.name, fleet, data.drift), driftChart(data.drift)));
  }

  // -- downloads: fetched with the bearer token, saved from a blob URL ----------------------------

  let downloadNote = "";

  function setDownloadNote(text) {
    downloadNote = text;
    const node = view.querySelector("[data-testid=download-note]");
    if (node) node.textContent = text;
  }

  /** GET `path` with the token and save the body as `filename` (a plain link would carry no bearer header). */
  async function download(button, path, accept, filename) {
    button.disabled = true;
    setDownloadNote("");
    try {
      const blob = await (await apiGet(path, { accept })).blob();
      const url = URL.createObjectURL(blob);
      const anchor = h("a", { href: url, download: filename, hidden: true });
      document.body.appendChild(anchor);
      anchor.click();
      anchor.remove();
      // The started download holds the blob; the URL only has to outlive the click.
      setTimeout(() => URL.revokeObjectURL(url), 1000);
    } catch (err) {
      if (err instanceof HttpError && err.status === 401) {
        askForToken("The controller refused this token: " + err.message);
        return;
      }
      setDownloadNote("Download failed: " + (err && err.message ? err.message : String(err)));
    } finally {
      button.disabled = false;
    }
  }

  function downloadButton(text, testid, path, accept, filename) {
    const button = h("button", { type: "button", class: "download", "data-testid": testid }, text);
    button.addEventListener("click", () => download(button, path, accept, filename));
    return button;
  }

  function rolloutDownloads(r, caps) {
    const base = "rollout-" + String(r.name).replace(/[^A-Za-z0-9._-]+/g, "_");
    const path = API + "/rollouts/" + enc(r.name);
    const key = driftGroupBy.get(r.name);
    return h("span", { class: "links" },
      caps.report ? downloadButton("Download report", "download-report",
        path + "/report" + (key ? "?group_by=" + enc(key) : ""), "text/html", base + "-report.html") : null,
      caps.timeseries ? downloadButton("Time series (JSON)", "download-timeseries", timeseriesPath(r.name),
        "application/json", base + "-timeseries.json") : null,
      downloadButton("Rollout (JSON)", "download-rollout", path, "application/json", base + ".json"),
      h("span", { class: "download-note", role: "status", "data-testid": "download-note" }, downloadNote));
  }

  function stepPills(r) {
    const finished = r.phase === "Completed";
    return h("ol", { class: "steps", "data-testid": "steps" }, (r.steps || []).map((fraction, i) => {
      const cls = finished || i < r.step_index ? "done" : i === r.step_index ? "current" : "";
      return h("li", { class: cls }, "Step " + (i + 1) + ": " + fmtPct(fraction));
    }));
  }

  function decisionsTimeline(decisions) {
    const items = decisions.slice().reverse().slice(0, 100).map((d) => h("li", { "data-testid": "decision" },
      h("span", { class: "when" }, fmtTime(d.at)),
      h("span", {}, badge(d.kind, ""), " ", d.verdict ? badge(d.verdict, "verdict-" + String(d.verdict).replace(/[^A-Za-z]/g, "")) : null),
      h("span", { class: "what" }, h("span", {}, d.reason || "—"),
        h("span", { class: "muted" }, "step " + (d.step_index + 1) + " · by " + (d.actor || "?")))));
    if (!items.length) return h("p", { class: "empty" }, "No decisions yet.");
    return h("ol", { class: "timeline", "data-testid": "decisions" }, items);
  }

  function rolloutDevicesTable(r) {
    const rows = (r.devices || []).map((d) => h("tr", { "data-testid": "rollout-device" },
      h("td", {}, link(deviceHref(d.device), d.device, { class: "mono" })),
      h("td", { class: "num" }, d.step_index === null || d.step_index === undefined ? "—" : String(d.step_index + 1)),
      h("td", {}, badge(d.state, d.state === "Failed" || d.state === "RolledBack" ? "fail" : d.confirmed ? "ok" : "")),
      h("td", { class: "mono" }, d.serving_version || "—"),
      h("td", { class: "mono" }, d.shadow_version || "—"),
      h("td", {}, d.update_state || "Idle", d.update_error ? h("div", { class: "muted" }, d.update_error) : null),
      h("td", {}, d.connected ? badge("connected", "ok") : badge("offline", "fail")),
      h("td", { class: "muted" }, d.reason || "")));
    return table(["Device", ["Step", "num"], "State", "Serving", "Shadow", "Update", "Connection", "Reason"], rows,
      "No devices match this rollout's selector.");
  }

  async function rolloutView(name) {
    const [fleet, r, caps, ts] = await Promise.all([fleetData(), getJSON(API + "/rollouts/" + enc(name)),
      loadCapabilities(), getTimeseries(name)]);
    return {
      data: { fleet, r, ts },
      render: () => {
        renderCounts(fleet);
        setCrumbs(link("#/", "Fleet"), "Rollout " + r.name);
        const links = rolloutDownloads(r, caps);
        const analysis = r.analysis;
        const gate = analysis && (analysis.metrics || []).length
          ? [h("p", { class: "muted" }, "Latest analysis, step " + (analysis.step_index + 1) + " at " + fmtTime(analysis.at) + ": ",
              analysis.verdict ? badge(analysis.verdict, "verdict-" + String(analysis.verdict).replace(/[^A-Za-z]/g, ""), { "data-testid": "analysis-verdict" }) : null,
              " ", analysis.reason || ""),
            gateChart(analysis.metrics)]
          : h("p", { class: "empty" }, "No gate analysis yet: the step's cohort is still installing or collecting samples.");
        return h("div", { "data-testid": "rollout", "data-rollout": r.name },
          h("h1", {}, h("span", { class: "mono" }, r.name), phaseBadge(r.phase),
            h("span", { class: "muted" }, r.model + ":" + r.version), links),
          r.message ? h("p", { class: "message", "data-testid": "rollout-message" }, r.message) : null,
          h("div", { class: "grid" },
            panel("Progress", "step " + r.step + " of " + (r.steps || []).length + (r.step_phase ? " · " + r.step_phase : ""),
              stepPills(r),
              (r.cohorts || []).length ? cohortChart(r.cohorts) : h("p", { class: "empty" }, "No cohorts."),
              h("p", { class: "muted" }, r.devices_total + " devices selected" +
                (r.devices_unassigned ? ", " + r.devices_unassigned + " not yet assigned" : ""))),
            panel("Settings", null, h("dl", { class: "kv" },
              h("dt", {}, "Selector"), h("dd", {}, labelChips(r.selector)),
              h("dt", {}, "Shadow sample rate"), h("dd", {}, fmtNum(r.shadow_sample_rate)),
              h("dt", {}, "Gate"), h("dd", { class: "mono" }, Object.keys(r.gate || {}).length
                ? Object.entries(r.gate).map(([k, v]) => h("div", {}, k + ": " + JSON.stringify(v))) : "defaults"),
              h("dt", {}, "Created"), h("dd", {}, fmtTime(r.created_at), r.created_by ? " by " + r.created_by : ""),
              h("dt", {}, "Finished"), h("dd", {}, fmtTime(r.finished_at))))),
          panel("Gate", "value vs threshold", gate),
          evidencePanels(r, fleet, ts),
          panel("Decisions", (r.decisions || []).length + " recorded", decisionsTimeline(r.decisions || [])),
          panel("Devices", r.devices_truncated ? "first " + (r.devices || []).length + " shown" : null, rolloutDevicesTable(r)));
      },
    };
  }

  // -- device detail -----------------------------------------------------------------------------

  function bytesProgress(update) {
    // Byte counts of a finished update are history, not progress.
    if (!update || !update.bytes_total || !update.state || update.state === "Idle") return null;
    const pct = Math.min(100, Math.round((100 * (update.bytes_done || 0)) / update.bytes_total));
    return h("span", { class: "muted" }, " " + pct + "% of " + fmtNum(update.bytes_total / 1024) + " KiB");
  }

  async function deviceView(id) {
    const [fleet, d] = await Promise.all([fleetData(), getJSON(API + "/devices/" + enc(id))]);
    return {
      data: { fleet, d },
      render: () => {
        renderCounts(fleet);
        setCrumbs(link("#/", "Fleet"), "Device " + d.id);
        const drifting = driftingByDevice(fleet.drift).get(d.id) || [];
        const models = (d.models || []).map((m) => h("tr", { "data-testid": "device-model", "data-model": m.model },
          h("td", {}, h("b", {}, m.model)),
          h("td", { class: "mono", "data-testid": "device-serving" }, m.serving || "—"),
          h("td", { class: "mono" }, m.shadow || "—"),
          h("td", { class: "mono" }, (m.desired_serving || "—") + (m.desired_shadow ? " / shadow " + m.desired_shadow : "")),
          h("td", {}, m.rollout ? link(rolloutHref(m.rollout), m.rollout, { class: "mono" }) : "—"),
          h("td", {}, badge(m.update_state || "Idle", m.update_state === "Failed" ? "fail" : m.update_state === "Idle" ? "" : "info"),
            (m.update && m.update.target_version && m.update_state !== "Idle") ? " → " + m.update.target_version : "",
            bytesProgress(m.update),
            (m.update && m.update.error) ? h("div", { class: "muted" }, m.update.error) : null)));
        const slots = [];
        for (const m of (d.actual && d.actual.models) || []) {
          for (const slot of m.slots || []) {
            slots.push(h("tr", { "data-testid": "slot" },
              h("td", {}, m.model), h("td", {}, slot.role), h("td", { class: "mono" }, slot.version || "—"),
              h("td", {}, slot.loaded ? badge("loaded", "ok") : badge("not loaded", "")),
              h("td", { class: "mono", title: slot.sha256 || "" }, String(slot.sha256 || "").slice(0, 12) || "—"),
              h("td", {}, (slot.execution_providers || []).join(", ") || "—")));
          }
        }
        const events = (d.events || []).map((e) => h("tr", { "data-testid": "event" },
          h("td", { class: "muted" }, fmtTime(e.at)), h("td", {}, e.model + ":" + e.version), h("td", {}, e.role),
          h("td", {}, badge(e.state, e.state === "Failed" || e.state === "RollingBack" ? "fail" : "")),
          h("td", { class: "muted" }, e.reason || "")));
        return h("div", { "data-testid": "device", "data-device": d.id },
          h("h1", {}, h("span", { class: "mono" }, d.id),
            d.connected ? badge("connected", "ok") : badge("offline", "fail"),
            d.decommissioned ? badge("decommissioned", "") : null,
            drifting.length ? driftBadge(drifting, true) : null),
          h("div", { class: "grid" },
            panel("Identity", null, h("dl", { class: "kv" },
              h("dt", {}, "Labels"), h("dd", {}, labelChips(d.labels)),
              h("dt", {}, "Hardware"), h("dd", {}, labelChips(d.hardware)),
              h("dt", {}, "Agent"), h("dd", { class: "mono" }, d.agent_version || "—"),
              h("dt", {}, "Enrolled"), h("dd", {}, fmtTime(d.enrolled_at)),
              h("dt", {}, "Last seen"), h("dd", {}, fmtTime(d.last_seen_at)),
              h("dt", {}, "Desired state"), h("dd", {}, "generation " + d.desired_generation + ", acknowledged " + d.acked_generation))),
            panel("Drift", null, !fleet.drift ? h("p", { class: "empty" }, "This controller does not report drift.")
              : drifting.length ? table(["Model", ["Max PSI", "num"], "Top feature"], drifting.map((e) =>
                h("tr", {}, h("td", {}, e.model + ":" + e.version), h("td", { class: "num" }, fmtNum(e.max_psi)), h("td", {}, e.top_feature || "—"))), "")
                : h("p", { class: "empty" }, "No model is drifting on this device."))),
          panel("Models", null, table(["Model", "Serving", "Shadow", "Desired", "Rollout", "Update"], models,
            "No models assigned.", { "data-testid": "device-models" })),
          panel("Slots", "as last reported by the agent", table(["Model", "Role", "Version", "Session", "SHA-256", "Execution providers"],
            slots, "The agent has reported no slots.")),
          panel("Recent update events", null, table(["At", "Version", "Role", "State", "Reason"], events, "No update events.",
            { "data-testid": "events" })));
      },
    };
  }

  // -- routing and polling -------------------------------------------------------------------------

  function route() {
    const hash = location.hash.replace(/^#\/?/, "");
    const [kind, ...rest] = hash.split("/");
    const arg = rest.length ? decodeURIComponent(rest.join("/")) : "";
    if (kind === "rollouts" && arg) return () => rolloutView(arg);
    if (kind === "devices" && arg) return () => deviceView(arg);
    return overview;
  }

  let generation = 0;
  let timer = null;
  let lastKey = null;

  function setLive(state, text) {
    live.dataset.state = state;
    live.textContent = text;
  }

  function askForToken(message) {
    clearTimeout(timer);
    saveToken("");
    lastKey = null;
    view.hidden = true;
    signout.hidden = true;
    banner.hidden = true;
    counts.replaceChildren();
    loginError.textContent = message || "";
    loginError.hidden = !message;
    loginForm.hidden = false;
    tokenInput.focus();
    setLive("error", "signed out");
  }

  loginForm.addEventListener("submit", (event) => {
    event.preventDefault(); // nothing is submitted anywhere: the token stays in this tab
    const token = tokenInput.value.trim();
    if (!token) return;
    tokenInput.value = "";
    saveToken(token);
    loginForm.hidden = true;
    view.hidden = false;
    signout.hidden = false;
    refresh();
  });

  signout.addEventListener("click", () => {
    generation++;
    askForToken("");
  });

  async function refresh() {
    const mine = ++generation;
    clearTimeout(timer);
    if (!currentToken()) {
      askForToken("");
      return;
    }
    loginForm.hidden = true;
    view.hidden = false;
    signout.hidden = false;
    try {
      const page = await route()();
      if (mine !== generation) return; // the user navigated meanwhile
      const key = location.hash + "\n" + JSON.stringify(page.data);
      if (key !== lastKey) {
        view.replaceChildren(page.render());
        lastKey = key;
      }
      banner.hidden = true;
      setLive("ok", "live · updated " + new Date().toLocaleTimeString(undefined, { hour12: false }));
    } catch (err) {
      if (mine !== generation) return;
      if (err instanceof HttpError && err.status === 401) {
        askForToken("The controller refused this token: " + err.message);
        return;
      }
      if (err instanceof HttpError && err.status === 403) {
        banner.textContent = "This token may not read this page: " + err.message;
        banner.hidden = false;
        setLive("error", "forbidden");
        return;
      }
      const notFound = err instanceof HttpError && err.status === 404;
      if (notFound) {
        lastKey = null;
        view.replaceChildren(h("section", { class: "panel" }, h("h2", {}, "Not found"), h("p", {}, err.message),
          h("p", {}, link("#/", "Back to the fleet overview"))));
      }
      banner.textContent = notFound ? "" : "Cannot reach the controller API: " + (err && err.message ? err.message : String(err)) + " (retrying)";
      banner.hidden = notFound;
      setLive("error", "retrying…");
    }
    if (mine === generation) timer = setTimeout(refresh, document.hidden ? POLL_MS * 5 : POLL_MS);
  }

  window.addEventListener("hashchange", () => {
    lastKey = null;
    window.scrollTo(0, 0);
    refresh();
  });
  refresh();
})();
