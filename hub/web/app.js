// edgefleet fleet page: reads and acts through the hub's admin API with the token the operator
// gives (kept in this tab's sessionStorage, sent as a Bearer header, never put in a URL).
// Everything from the API is set as text (textContent), never as HTML. Views re-render every
// REFRESH_MS from fresh data, so the page follows the fleet without a reload.
"use strict";

const REFRESH_MS = 2000;
const TOKEN_KEY = "edgefleet-token";
const state = { me: null, filters: { text: "", status: "", version: "" }, timer: null, busy: false, diff: {} };

// -- small DOM helpers -----------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "on") { for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn); }
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function pill(text, kind) { return el("span", { class: `pill ${kind || text}` }, text); }
function link(href, text) { return el("a", { href }, text); }
function fmt(x, digits = 3) { return x === null || x === undefined ? "—" : (typeof x === "number" ? +x.toFixed(digits) : x); }
function panel(title, ...body) { return el("section", { class: "panel" }, title ? el("h2", {}, title) : null, ...body); }
function table(head, rows, attrs) {
  return el("table", attrs || {}, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c) => el("td", {}, c))))));
}

// -- charts (SVG) ------------------------------------------------------------------------------

const COLORS = ["#2f6fde", "#d98b00", "#1f9d55", "#c9372c", "#7b4fd6", "#0e9aa7", "#9aa4b5"];

// Grouped bars: labels on x, one bar per series per label. series: [{name, values, color}]
function barChart(labels, series, opts = {}) {
  const w = opts.width || 520, h = opts.height || 170, pad = 26;
  const max = Math.max(1e-12, ...series.flatMap((s) => s.values));
  const n = Math.max(1, labels.length), group = (w - pad) / n, bw = Math.max(1, (group - 2) / series.length);
  const out = svg("svg", { width: w, height: h + 18, viewBox: `0 0 ${w} ${h + 18}`, class: "chart", role: "img",
    "aria-label": opts.label || "bar chart" });
  out.append(svg("line", { x1: pad, y1: h, x2: w, y2: h, stroke: "#d8dde6" }));
  out.append(svg("text", { x: 0, y: 10 }, fmt(max, 3)));
  series.forEach((s, si) => s.values.forEach((v, i) => {
    const bh = (v / max) * (h - 14);
    out.append(svg("rect", { x: pad + i * group + si * bw, y: h - bh, width: Math.max(1, bw - 1), height: bh,
      fill: s.color || COLORS[si % COLORS.length] }, svg("title", {}, `${s.name} ${labels[i]}: ${fmt(v, 4)}`)));
  }));
  const every = Math.ceil(n / 8);
  labels.forEach((l, i) => { if (i % every === 0) out.append(svg("text", { x: pad + i * group, y: h + 13 }, l)); });
  return el("div", {}, out, legend(series));
}

// Lines over an index axis: series [{name, values}] (null gaps allowed), xlabels optional
function lineChart(series, opts = {}) {
  const w = opts.width || 520, h = opts.height || 150, pad = 30;
  const all = series.flatMap((s) => s.values.filter((v) => v !== null && v !== undefined));
  const max = Math.max(opts.min_max || 1e-12, ...all), n = Math.max(2, ...series.map((s) => s.values.length));
  const x = (i) => pad + (i / (n - 1)) * (w - pad - 4), y = (v) => h - (v / max) * (h - 12);
  const out = svg("svg", { width: w, height: h + 18, viewBox: `0 0 ${w} ${h + 18}`, class: "chart", role: "img",
    "aria-label": opts.label || "line chart" });
  out.append(svg("line", { x1: pad, y1: h, x2: w, y2: h, stroke: "#d8dde6" }));
  out.append(svg("text", { x: 0, y: 10 }, fmt(max, 3)));
  for (const t of opts.thresholds || []) {
    if (t.value <= max) out.append(svg("line", { x1: pad, y1: y(t.value), x2: w, y2: y(t.value), stroke: t.color, "stroke-dasharray": "4 3" }));
  }
  series.forEach((s, si) => {
    const pts = s.values.map((v, i) => (v === null || v === undefined ? null : `${x(i)},${y(v)}`)).filter(Boolean);
    if (pts.length) out.append(svg("polyline", { points: pts.join(" "), fill: "none", stroke: s.color || COLORS[si % COLORS.length], "stroke-width": 1.6 }));
  });
  if (opts.xlabels && opts.xlabels.length) {
    out.append(svg("text", { x: pad, y: h + 13 }, opts.xlabels[0]));
    out.append(svg("text", { x: w - 120, y: h + 13 }, opts.xlabels[opts.xlabels.length - 1]));
  }
  return el("div", {}, out, legend(series));
}

// One horizontal bar split into parts: [{name, value}]
function stackBar(parts, opts = {}) {
  const w = opts.width || 520, h = 18, total = parts.reduce((a, p) => a + p.value, 0) || 1;
  const out = svg("svg", { width: w, height: h, viewBox: `0 0 ${w} ${h}`, class: "chart", role: "img", "aria-label": opts.label || "bar" });
  let x0 = 0;
  parts.forEach((p, i) => {
    const pw = (p.value / total) * w;
    out.append(svg("rect", { x: x0, y: 0, width: pw, height: h, fill: p.color || COLORS[i % COLORS.length] },
      svg("title", {}, `${p.name}: ${p.value}`)));
    x0 += pw;
  });
  return el("div", {}, out, legend(parts.map((p, i) => ({ name: `${p.name} (${p.value})`, color: p.color || COLORS[i % COLORS.length] }))));
}

function legend(series) {
  return el("div", { class: "legend" }, series.map((s, i) => el("span", {},
    el("span", { class: "swatch", "data-color": s.color || COLORS[i % COLORS.length] }), s.name)));
}

function paintSwatches(root) {  // CSSOM, not style attributes: the CSP allows it
  root.querySelectorAll(".swatch[data-color]").forEach((n) => { n.style.background = n.getAttribute("data-color"); });
}

// -- the API -------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, opts = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const res = await fetch(path, { ...opts, headers: { ...(opts.headers || {}), Authorization: `Bearer ${token}` } });
  const body = await res.json().catch(() => ({}));
  if (res.status === 401) { logout(body.error || "the token was refused"); throw new ApiError(401, body.error); }
  if (!res.ok) throw new ApiError(res.status, body.error || `HTTP ${res.status}`);
  return body;
}

async function statusAll() {  // every page of GET /api/v1/status
  let after = "", out = null;
  for (;;) {
    const page = await api(`/api/v1/status?limit=5000&after=${encodeURIComponent(after)}`);
    if (out === null) out = page; else out.devices.push(...page.devices);
    if (!page.next) return out;
    after = page.next;
  }
}

// -- login ---------------------------------------------------------------------------------------

function logout(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.me = null;
  document.getElementById("login").hidden = false;
  document.getElementById("view").replaceChildren();
  document.getElementById("logout").hidden = true;
  document.getElementById("who").textContent = "";
  document.getElementById("login-error").textContent = message || "";
}

async function login(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    state.me = await api("/api/v1/whoami");
  } catch (e) {
    if (e.status !== 401) logout(e.message);
    return;
  }
  document.getElementById("login").hidden = true;
  document.getElementById("logout").hidden = false;
  document.getElementById("who").textContent = `${state.me.name} (${state.me.role}) · fleet ${state.me.fleet}`;
  render();
}

// -- views ---------------------------------------------------------------------------------------

const ACTIVE = ["running", "paused"];

async function viewFleet() {
  const [st, ro, audit] = await Promise.all([statusAll(), api("/api/v1/rollouts"), api("/api/v1/audit?limit=200")]);
  const devs = st.devices;
  const by = (f) => devs.reduce((m, d) => { const k = f(d); m[k] = (m[k] || 0) + 1; return m; }, {});
  const statuses = by((d) => d.status);
  const cards = el("div", { class: "cards" },
    [["devices", st.total], ["online", statuses.online || 0], ["offline", statuses.offline || 0],
     ["never seen", statuses["never seen"] || 0], ["running rollouts", ro.rollouts.filter((r) => ACTIVE.includes(r.state)).length]]
      .map(([l, n]) => el("div", { class: "card", "data-card": l }, el("div", { class: "n" }, n), el("div", { class: "l" }, l))));
  const models = [...new Set(devs.flatMap((d) => Object.keys(d.models)))].sort();
  const versionBars = models.map((m) => {
    const counts = by((d) => d.models[m] || "none");
    return el("div", {}, el("div", { class: "muted" }, m), stackBar(Object.entries(counts).sort().map(([v, n]) => ({ name: v, value: n })), { label: `versions of ${m}` }));
  });
  const f = state.filters;
  const text = el("input", { placeholder: "filter: device, profile, group", value: f.text, "aria-label": "filter" });
  text.addEventListener("input", () => { f.text = text.value; render(); });
  const sel = el("select", { "aria-label": "status" }, ["", "online", "offline", "never seen"].map((s) => el("option", { value: s, selected: s === f.status }, s || "any status")));
  sel.addEventListener("change", () => { f.status = sel.value; render(); });
  const versions = [...new Set(devs.flatMap((d) => Object.entries(d.models).map(([m, v]) => `${m} ${v}`)))].sort();
  const vsel = el("select", { "aria-label": "version" }, ["", ...versions].map((v) => el("option", { value: v, selected: v === f.version }, v || "any version")));
  vsel.addEventListener("change", () => { f.version = vsel.value; render(); });
  const shown = devs.filter((d) => (!f.status || d.status === f.status)
    && (!f.version || Object.entries(d.models).some(([m, v]) => `${m} ${v}` === f.version))
    && (!f.text || [d.device, d.profile, d.group || ""].some((x) => x.includes(f.text))));
  const countTable = (label, counts) => table([label, "devices"], Object.entries(counts).sort().map(([k, n]) => [k, n]));
  const rows = shown.slice(0, 500).map((d) => [
    link(`#/device/${encodeURIComponent(d.device)}`, d.device), pill(d.status, d.status === "never seen" ? "" : d.status),
    d.profile, d.group || "—",
    Object.entries(d.models).map(([m, v]) => `${m} ${v}`).join(", ") || "—",
    Object.entries(d.desired).filter(([m, v]) => d.models[m] !== v).map(([m, v]) => el("span", { class: "diff" }, `→ ${m} ${v}`)),
    d.last_telemetry ? d.last_telemetry.window_end : "—",
  ]);
  const alerts = audit.entries.filter((e) => /^(drift_|rollout_|keyring)/.test(e.action)).slice(-10).reverse();
  return [
    el("h1", {}, `Fleet ${st.fleet}`), cards,
    el("div", { class: "grid2" },
      panel("Versions in the fleet", versionBars.length ? versionBars : el("p", { class: "muted" }, "no device reports a model yet"),
        el("div", { class: "grid2" }, countTable("profile", by((d) => d.profile)), countTable("group", by((d) => d.group || "—")))),
      panel("Recent alerts", alerts.length ? table(["time", "action", "by", "what"], alerts.map((e) => [
        new Date(e.time * 1000).toISOString().slice(0, 19) + "Z", pill(e.action, /rollback|alarm/.test(e.action) ? "alarm" : "warn"),
        e.actor, summary(e.details)])) : el("p", { class: "muted" }, "none"))),
    panel(`Devices (${shown.length} of ${devs.length}${shown.length > 500 ? ", first 500 shown" : ""})`,
      el("div", { class: "filters" }, text, sel, vsel),
      table(["device", "status", "profile", "group", "runs", "should run", "last window"], rows, { id: "devices" })),
  ];
}

function summary(details) {
  if (!details || typeof details !== "object") return String(details ?? "");
  const parts = [];
  for (const k of ["model", "version", "from_version", "to_version", "rollout", "state", "reason"]) {
    if (details[k] !== undefined && details[k] !== null && details[k] !== "") parts.push(`${k}: ${typeof details[k] === "object" ? JSON.stringify(details[k]) : details[k]}`);
  }
  return parts.join(" · ").slice(0, 300);
}

async function viewDevice(id) {
  const [st, tel, ev] = await Promise.all([statusAll(), api(`/api/v1/devices/${encodeURIComponent(id)}/telemetry?limit=60`),
    api(`/api/v1/events?device=${encodeURIComponent(id)}&limit=50`)]);
  const d = st.devices.find((x) => x.device === id);
  if (!d) return [el("h1", {}, id), el("p", { class: "error" }, "no such device")];
  const models = [...new Set([...Object.keys(d.desired), ...Object.keys(d.models)])].sort();
  const refusals = ev.events.filter((e) => /refus|fail|error|rollback/.test(e.type));
  const why = (m) => {
    if (d.desired[m] === d.models[m]) return "runs what it should";
    const last = refusals.find((e) => e.model === m);
    if (last) return `${last.type}${last.reason ? ` (${last.reason})` : ""}: ${last.message || ""}`;
    if (d.status !== "online") return `the device is ${d.status}: it gets the desired state when it connects`;
    if (d.reported_seq !== d.desired_seq) return `updating: desired seq ${d.desired_seq}, last applied ${d.reported_seq ?? "none"}`;
    return "waiting for the device's report";
  };
  const wins = tel.windows;
  const lat = (k) => wins.map((w) => { const ms = Object.values(w.models); return ms.length ? Math.max(...ms.map((m) => m.latency[k] ?? 0)) : null; });
  const buckets = wins.find((w) => Object.keys(w.models).length);
  let hist = null;
  if (buckets) {
    const first = Object.values(buckets.models)[0].latency;
    const sum = first.counts.map(() => 0);
    wins.forEach((w) => Object.values(w.models).forEach((m) => m.latency.counts.forEach((c, i) => { sum[i] += c; })));
    hist = barChart([...first.buckets.map((b) => `≤${b}`), `>${first.buckets[first.buckets.length - 1]}`], [{ name: "requests per latency bucket (ms)", values: sum }], { label: "latency histogram" });
  }
  const sys = (k, scale = 1) => wins.map((w) => (w.system && w.system[k] !== undefined ? w.system[k] / scale : null));
  return [
    el("h1", {}, `Device ${id} `, pill(d.status, d.status === "never seen" ? "" : d.status)),
    el("p", { class: "muted" }, `profile ${d.profile} · group ${d.group || "—"} · desired seq ${d.desired_seq ?? "—"} · reported seq ${d.reported_seq ?? "—"} · status since ${d.status_at || "—"}`),
    panel("What it runs and what it should run", table(["model", "runs", "should run", "candidate", "why"], models.map((m) => [
      m, d.models[m] || "—", d.desired[m] || "—", d.candidates[m] ? `${d.candidates[m].version} (${d.candidates[m].mode})` : "—",
      el("span", { class: d.desired[m] === d.models[m] ? "muted" : "diff" }, why(m))]), { id: "runs" })),
    el("div", { class: "grid2" },
      panel(`Latency over the last ${wins.length} windows`, hist || el("p", { class: "muted" }, "no telemetry yet")),
      panel("p50 / p95 / p99 (ms) per window", lineChart([{ name: "p50", values: lat("p50") }, { name: "p95", values: lat("p95") }, { name: "p99", values: lat("p99") }],
        { xlabels: wins.map((w) => w.window_end.slice(11, 19)), label: "latency percentiles" })),
      panel("CPU (%)", lineChart([{ name: "process CPU %", values: sys("process_cpu_percent") }, { name: "system CPU %", values: sys("system_cpu_percent") }], { label: "cpu" })),
      panel("Memory (MiB)", lineChart([{ name: "agent RSS", values: sys("rss_bytes", 1048576) }], { label: "memory" }))),
    panel("Refusals and events", table(["time", "type", "reason", "model", "message"], ev.events.slice(0, 30).map((e) => [
      e.time, pill(e.type, /refus|fail|error|rollback/.test(e.type) ? "alarm" : "ok"), e.reason || "", e.model ? `${e.model} ${e.version || ""}` : "", e.message || ""]))),
  ];
}

async function viewRollouts() {
  const ro = await api("/api/v1/rollouts");
  return [el("h1", {}, "Rollouts"), panel(null, ro.rollouts.length ? table(["rollout", "model", "from → to", "state", "step", "cohort", "created"],
    ro.rollouts.map((r) => [link(`#/rollout/${encodeURIComponent(r.id)}`, r.id), r.model, `${r.from_version} → ${r.to_version}`,
      pill(r.state), `${r.step_number} of ${r.steps.length} (${r.percent} %)`, `${r.cohort_size} of ${r.target_count}`, r.created]), { id: "rollouts" })
    : el("p", { class: "muted" }, "no rollout yet"))];
}

async function act(action, id) {
  const body = JSON.stringify({ action, rollout: id, reason: `from the fleet page by ${state.me.name}` });
  try {
    await api("/api/v1/rollouts/action", { method: "POST", headers: { "Content-Type": "application/json" }, body });
    document.getElementById("action-result").textContent = `${action}: done`;
  } catch (e) {
    document.getElementById("action-result").textContent = `${action} refused: ${e.message}`;
  }
  render();
}

async function viewRollout(id) {
  const [ro, audit] = await Promise.all([api(`/api/v1/rollouts?id=${encodeURIComponent(id)}`), api("/api/v1/audit?limit=2000")]);
  const r = ro.rollouts[0];
  const steps = svg("svg", { width: 520, height: 26, viewBox: "0 0 520 26", role: "img", "aria-label": "steps", id: "steps", class: "chart" });
  r.steps.forEach((p, i) => {
    const done = i < r.step || r.state === "promoted", cur = i === r.step && ACTIVE.includes(r.state);
    steps.append(svg("rect", { x: i * (520 / r.steps.length), y: 2, width: 520 / r.steps.length - 4, height: 16,
      fill: done ? "#1f9d55" : cur ? "#d98b00" : "#d8dde6" }, svg("title", {}, `step ${i + 1}: ${p} %`)));
    steps.append(svg("text", { x: i * (520 / r.steps.length) + 4, y: 14, fill: "#1d2330" }, `${p} %`));
  });
  const d = r.decision;
  const buttons = [];
  if (state.me.can_operate && ACTIVE.includes(r.state)) {
    if (r.state === "running") buttons.push(el("button", { id: "pause", on: { click: () => act("pause", r.id) } }, "Pause"));
    if (r.state === "paused") buttons.push(el("button", { id: "resume", class: "primary", on: { click: () => act("resume", r.id) } }, "Resume"));
    buttons.push(el("button", { id: "promote", on: { click: () => act("promote", r.id) } }, "Promote now"));
    buttons.push(el("button", { id: "abort", class: "danger", on: { click: () => act("abort", r.id) } }, "Abort"));
  }
  const history = audit.entries.filter((e) => e.action.startsWith("rollout") && e.details && (e.details.rollout === r.id || e.details.id === r.id)).reverse();
  return [
    el("h1", {}, `Rollout ${r.id} `, pill(r.state)),
    el("p", { class: "muted" }, `${r.model} ${r.from_version} → ${r.to_version} · ${r.mode} · created ${r.created} · step started ${r.step_started}`),
    panel(`Step ${r.step_number} of ${r.steps.length}: ${r.percent} % of ${r.target_count} devices`, steps,
      el("div", { class: "actions" }, buttons), el("div", { id: "action-result", class: "muted" }),
      r.reason ? el("p", {}, "Reason: ", r.reason) : null),
    d ? panel(`Decision now: ${d.outcome}`, el("p", {}, d.reason),
      el("p", { class: "muted", id: "eta" }, d.eta_seconds === null || d.eta_seconds === undefined ? "time to decision: —" : `time to decision: about ${Math.round(d.eta_seconds)} s`),
      table(["gate", "value", "threshold", "passed", "conclusive", "evidence"], d.gates.map((g) => [
        g.name, fmt(g.value, 4), fmt(g.threshold, 4), pill(g.passed ? "passed" : "failed"), g.conclusive === false ? "no" : "yes", g.detail]), { id: "gates" }),
      el("pre", { class: "muted" }, JSON.stringify(d.evidence, null, 0))) : null,
    panel(`Cohort (${r.members.length})`, el("p", {}, r.members.map((m, i) => [i ? ", " : "", link(`#/device/${encodeURIComponent(m)}`, m)]))),
    panel("Decision history", history.length ? table(["time", "action", "by", "reason"], history.map((e) => [
      new Date(e.time * 1000).toISOString().slice(0, 19) + "Z", e.action, e.actor, (e.details.reason || "").slice(0, 300)]), { id: "history" })
      : el("p", { class: "muted" }, "no decision yet")),
  ];
}

async function viewDrift(model) {
  const models = (await api("/api/v1/models")).models;
  const names = [...new Set(models.map((m) => m.name))].sort();
  model = model || names[0];
  const picker = el("select", { "aria-label": "model" }, names.map((n) => el("option", { value: n, selected: n === model }, n)));
  picker.addEventListener("change", () => { location.hash = `#/drift/${encodeURIComponent(picker.value)}`; });
  if (!model) return [el("h1", {}, "Drift"), el("p", { class: "muted" }, "no model published yet")];
  let v;
  try { v = await api(`/api/v1/drift/view?model=${encodeURIComponent(model)}`); } catch (e) {
    if (e.status === 404) return [el("h1", {}, "Drift "), picker, el("p", { class: "muted" }, e.message)];
    throw e;
  }
  const charts = v.features.map((f) => {
    // a category feature names its bins, and shows values never seen in training and missing ones as bars too
    const cat = Boolean(f.labels);
    const counts = cat ? [...f.live, f.above || 0, f.nan || 0] : f.live;
    const refShares = cat ? [...f.reference.map((x) => x * (1 - (f.missing || 0))), 0, f.missing || 0] : f.reference;
    const live = counts.reduce((a, b) => a + b, 0) || 1;
    const labels = cat ? [...f.labels, "unseen", "missing"] : f.edges.slice(0, -1).map((e) => fmt(e, 2));
    const s = f.score;
    const unseen = Object.entries(f.unseen || {}).map(([k, n]) => `${k} (${n})`).join(", ");
    const outside = cat
      ? (unseen ? `never seen in training: ${unseen}` : null)
      : (f.below || f.above || f.nan ? `below the reference range ${f.below}, above ${f.above}, NaN ${f.nan}` : null);
    const hist = v.history.map((h) => (h.features[f.name] ? h.features[f.name].psi : null));
    return el("div", { class: "panel feature", "data-feature": f.name },
      el("h2", {}, `${f.name} `, s ? pill(s.state) : null, s ? el("span", { class: "muted" }, ` PSI ${fmt(s.psi)} · JS ${fmt(s.js)} · ` +
        (s.p_value !== undefined ? `χ² p ${s.p_value < 1e-4 ? "< 0.0001" : fmt(s.p_value, 4)}` : `KS ${fmt(s.ks)}`)) : null),
      s && s.detail ? el("p", { class: "muted" }, s.detail) : null,
      barChart(labels, [{ name: "reference", values: refShares, color: "#9aa4b5" }, { name: "live", values: counts.map((c) => c / live), color: "#2f6fde" }],
        { label: `histogram of ${f.name}` }),
      lineChart([{ name: "PSI per bucket", values: hist }, { name: "JS", values: v.history.map((h) => (h.features[f.name] ? h.features[f.name].js : null)) },
        { name: "KS", values: v.history.map((h) => (h.features[f.name] ? h.features[f.name].ks : null)) }],
      { thresholds: [{ value: v.thresholds.warn, color: "#d98b00" }, { value: v.thresholds.alarm, color: "#c9372c" }], min_max: v.thresholds.alarm * 1.2,
        xlabels: v.history.map((h) => h.time.slice(11, 19)), label: `scores of ${f.name}` }),
      outside ? el("p", { class: "muted" }, outside) : null);
  });
  return [
    el("h1", {}, `Drift: ${v.model} ${v.version} `, pill(v.state || "ok")), picker,
    el("p", { class: "muted" }, `live: the fleet's newest ${v.window_seconds} s; thresholds warn ${v.thresholds.warn}, alarm ${v.thresholds.alarm} (PSI)`),
    el("div", { class: "grid3", id: "features" }, charts),
    panel("Devices that drift most", v.devices.length ? table(["device", "max PSI", "feature", "state"], v.devices.map((d) => [
      link(`#/device/${encodeURIComponent(d.device)}`, d.device), fmt(d.psi), d.feature, pill(d.state)])) : el("p", { class: "muted" }, "none")),
  ];
}

async function viewModels() {
  const models = (await api("/api/v1/models")).models;
  const names = [...new Set(models.map((m) => m.name))].sort();
  return [el("h1", {}, "Models"), panel(null, table(["model", "versions", "newest"], names.map((n) => {
    const vs = models.filter((m) => m.name === n);
    return [link(`#/model/${encodeURIComponent(n)}`, n), vs.map((m) => m.version).join(", "), vs[vs.length - 1].created_at];
  }), { id: "models" }))];
}

async function viewModel(name) {
  const [models, st] = await Promise.all([api("/api/v1/models"), statusAll()]);
  const vs = models.models.filter((m) => m.name === name);
  if (!vs.length) return [el("h1", {}, name), el("p", { class: "error" }, "no such model")];
  const runs = (v) => st.devices.filter((d) => d.models[name] === v).length;
  const pick = state.diff[name] || [vs.length > 1 ? vs[vs.length - 2].version : vs[0].version, vs[vs.length - 1].version];
  const sel = (i) => {
    const s = el("select", { "aria-label": i ? "b" : "a" }, vs.map((m) => el("option", { value: m.version, selected: m.version === pick[i] }, m.version)));
    s.addEventListener("change", () => { pick[i] = s.value; state.diff[name] = pick; render(); });
    return s;
  };
  let diff = null;
  if (pick[0] !== pick[1]) {
    const dd = await api(`/api/v1/models/${encodeURIComponent(name)}/diff?a=${encodeURIComponent(pick[0])}&b=${encodeURIComponent(pick[1])}`);
    const show = (v) => (v === null || v === undefined ? "—" : typeof v === "object" ? JSON.stringify(v) : String(v));
    const rows = [["sha256", dd.sha256.a.slice(0, 16), dd.sha256.b.slice(0, 16), ""],
      ["signature", show(dd.signature.a.inputs.map((i) => `${i.name} ${i.dtype} ${JSON.stringify(i.shape)}`)),
        show(dd.signature.b.inputs.map((i) => `${i.name} ${i.dtype} ${JSON.stringify(i.shape)}`)), dd.signature.same ? "same" : "differs"]];
    for (const [k, m] of Object.entries(dd.metrics)) rows.push([`metric ${k}`, show(m.a), show(m.b), m.delta === null ? "" : `Δ ${fmt(m.delta, 4)}`]);
    for (const [k, l] of Object.entries(dd.lineage)) rows.push([k, show(l.a), show(l.b), ""]);
    const ref = dd.reference;
    if (ref.available) {
      rows.push(["training data, PSI of B against A", "", "", `max ${fmt(ref.max_psi)}`]);
      for (const f of ref.features) rows.push([`  ${f.feature}`, "", "", `PSI ${fmt(f.psi)}`]);
    } else rows.push(["training data", "", "", ref.reason]);
    diff = table(["", pick[0], pick[1], "difference"], rows, { id: "diff" });
  }
  const data = (l) => String(l.training_data_sha256 || l.data_digest || "").slice(0, 16) || "—";
  return [
    el("h1", {}, `Model ${name}`),
    panel("Versions and lineage", table(["version", "created", "sha256", "size", "runs on", "parent", "training data", "metrics",
      "source", "author", "tags"], vs.map((m) => {
      const l = m.lineage || {};
      return [m.version, m.created_at, m.sha256.slice(0, 12), m.size, `${runs(m.version)} devices`, l.parent || "—",
        `${data(l)}${l.training_rows ? ` (${l.training_rows} rows)` : ""}`,
        Object.keys(l.metrics || {}).length ? Object.entries(l.metrics).map(([k, v]) => `${k}=${v}`).join(", ") : "—",
        [l.source, l.converted_from].filter(Boolean).join(" · ") || "—", l.author || "—",
        Object.keys(l.tags || {}).length ? Object.entries(l.tags).map(([k, v]) => `${k}=${v}`).join(", ") : "—"];
    }), { id: "versions" })),
    panel("Side by side (models diff)", el("div", { class: "filters" }, sel(0), " vs ", sel(1)),
      diff || el("p", { class: "muted" }, "pick two different versions")),
  ];
}

async function viewAudit() {
  const [audit, verify] = await Promise.all([api("/api/v1/audit?limit=300"), api("/api/v1/audit/verify")]);
  return [
    el("h1", {}, "Audit log ", pill(verify.ok ? "chain verified" : "chain broken", verify.ok ? "ok" : "alarm")),
    verify.ok ? null : panel("Problems", el("pre", {}, verify.problems.join("\n"))),
    panel(`Newest ${audit.entries.length} entries`, table(["#", "time", "actor", "action", "details"], audit.entries.slice().reverse().map((e) => [
      e.id, new Date(e.time * 1000).toISOString().slice(0, 19) + "Z", e.actor, e.action, summary(e.details)]), { id: "audit" })),
  ];
}

// -- routing and refresh -------------------------------------------------------------------------

function route() {
  const [, name, arg] = (location.hash || "#/fleet").split("/").map((x) => decodeURIComponent(x || ""));
  return { name: name || "fleet", arg };
}

async function render() {
  if (!state.me || state.busy) return;
  state.busy = true;
  const { name, arg } = route();
  document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.getAttribute("href").startsWith(`#/${name.replace(/s?$/, "")}`)));
  const views = { fleet: viewFleet, device: viewDevice, rollouts: viewRollouts, rollout: viewRollout, drift: viewDrift,
    models: viewModels, model: viewModel, audit: viewAudit };
  const view = document.getElementById("view");
  try {
    const nodes = await (views[name] || viewFleet)(arg);
    const focused = document.activeElement && view.contains(document.activeElement) ? document.activeElement.getAttribute("aria-label") : null;
    const keep = document.getElementById("action-result") ? document.getElementById("action-result").textContent : "";
    const box = el("div", { "data-view": name }, nodes);
    paintSwatches(box);
    view.replaceChildren(box);
    if (keep && document.getElementById("action-result")) document.getElementById("action-result").textContent = keep;
    if (focused) { const n = view.querySelector(`[aria-label="${focused}"]`); if (n) { n.focus(); if (n.setSelectionRange && n.value) n.setSelectionRange(n.value.length, n.value.length); } }
    document.getElementById("updated").textContent = `updated ${new Date().toISOString().slice(11, 19)} UTC`;
  } catch (e) {
    if (e.status !== 401) view.replaceChildren(el("p", { class: "error" }, `could not load: ${e.message}`));
  } finally {
    state.busy = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = document.getElementById("token");
    const token = input.value.trim();
    input.value = "";
    if (token) login(token);
  });
  document.getElementById("logout").addEventListener("click", () => logout(""));
  window.addEventListener("hashchange", render);
  state.timer = setInterval(render, REFRESH_MS);
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) login(saved); else logout("");
});
