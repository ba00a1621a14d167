// torchloom dashboard: one page fed by Server-Sent Events (/api/stream); actions are POSTs
// to the Weaver's control entry point. No framework, no build step, no external URL.
"use strict";

const $ = (sel) => document.querySelector(sel);
const STATES = ["training", "joining", "healing", "paused", "straggler", "draining", "suspect", "hung", "failed", "exited"];
const CATEGORY = {
  failure: ["rank_failed", "rank_hung", "rank_suspect", "commit_failed"],
  recovery: ["healed", "rank_training", "rank_joining", "quorum_changed"],
  drain: ["rank_drained", "replica_drained"],
  config: ["config_set", "config_applied", "config_apply_late", "job_started"],
};
const MARKS = { config_set: "cfg", config_applied: "cfg", rank_failed: "fail", rank_hung: "fail",
  commit_failed: "fail", healed: "heal", rank_drained: "drain", replica_drained: "drain" };
const MARK_COLORS = { cfg: "#4aa3ff", fail: "#f85149", heal: "#3fb950", drain: "#db8b3a" };
const PALETTE = ["#4aa3ff", "#3fb950", "#e3b341", "#f778ba", "#a371f7", "#ff7b72", "#56d4dd", "#d2a8ff",
  "#ffa657", "#7ee787", "#79c0ff", "#ffdf5d"];

// ---- state ---------------------------------------------------------------------------------
const S = {
  job: new URLSearchParams(location.search).get("job") || null,
  jobs: [], header: null, config: null,
  ranks: new Map(),       // id -> row
  sparks: new Map(),      // id -> [[loss, step_time], ...]
  events: [], eventSeq: 0,
  series: { ts: [], columns: {} },
  selected: null,         // replica_id
  pendingVersion: null,   // the version this page applied last
  filter: "", search: "",
  dirty: new Set(),
};
const perf = (window.__loomPerf = { frames: 0, bytes: 0, paint_ms: [], snapshots: 0 });
let es = null;

function categoryOf(kind) {
  if (kind.startsWith("policy")) return "policy";
  for (const [cat, kinds] of Object.entries(CATEGORY)) if (kinds.includes(kind)) return cat;
  return "other";
}
const fmt = {
  num(v, d = 0) { return v == null ? "—" : Number(v).toLocaleString(undefined, { maximumFractionDigits: d, minimumFractionDigits: d }); },
  sig(v) { return v == null ? "—" : Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(3) : v.toPrecision(3); },
  pct(v) { return v == null ? "—" : (100 * v).toFixed(1) + " %"; },
  ms(v) { return v == null ? "—" : v >= 1 ? v.toFixed(2) + " s" : (1000 * v).toFixed(1) + " ms"; },
  age(v) { return v == null ? "—" : v < 10 ? v.toFixed(1) + " s" : Math.round(v) + " s"; },
  time(ts) { const d = new Date(ts * 1000); return d.toLocaleTimeString(undefined, { hour12: false }); },
};
function esc(s) { return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]); }

// ---- feed ----------------------------------------------------------------------------------
function connect() {
  if (es) es.close();
  const url = "/api/stream" + (S.job ? "?job=" + encodeURIComponent(S.job) : "");
  es = new EventSource(url);
  es.onopen = () => { $("#conn").textContent = "live"; $("#conn").className = "conn live"; };
  es.onerror = () => { $("#conn").textContent = "reconnecting…"; $("#conn").className = "conn down"; };
  es.onmessage = (msg) => {
    const t0 = performance.now();
    perf.frames += 1;
    perf.bytes += msg.data.length;
    const frame = JSON.parse(msg.data);
    apply(frame);
    schedule(t0);
  };
}

function apply(f) {
  S.jobs = f.jobs || S.jobs;
  if (f.type === "jobs" || (f.type === "snapshot" && !f.header)) {
    // no job yet, or not this one: follow the first job there is
    S.header = null;
    ["jobs", "header"].forEach((k) => S.dirty.add(k));
    if (S.jobs.length && !S.jobs.includes(S.job)) { S.job = S.jobs[0]; connect(); }
    return;
  }
  if (f.type === "snapshot") {
    perf.snapshots += 1;
    S.job = f.header.job_id;
    S.ranks = new Map(f.ranks.map((r) => [r.id, r]));
    S.sparks = new Map(Object.entries(f.sparks || {}));
    S.events = f.events; S.eventSeq = f.events.length ? f.events[f.events.length - 1].seq : 0;
    S.series = f.series;
    S.header = f.header; S.config = f.config;
    ["jobs", "header", "ranks", "events", "charts", "knobs"].forEach((k) => S.dirty.add(k));
    S.knobsKey = null;
    loadCheckpoints();
    return;
  }
  // update
  S.header = f.header;
  S.config = f.config;
  for (const diff of f.ranks) {  // only the fields that changed (a new rank comes whole)
    const old = S.ranks.get(diff.id);
    const r = old ? Object.assign(old, diff) : diff;
    if (!old || "step" in diff) {
      const trail = S.sparks.get(r.id) || [];
      trail.push([r.loss, r.step_time_s]);
      if (trail.length > 40) trail.shift();
      S.sparks.set(r.id, trail);
    }
    S.ranks.set(r.id, r);
  }
  for (const id of f.removed || []) { S.ranks.delete(id); S.sparks.delete(id); }
  const fresh = f.events.filter((e) => e.seq > S.eventSeq);
  if (fresh.length) {
    S.events.push(...fresh);
    if (S.events.length > 2000) S.events.splice(0, S.events.length - 2000);
    S.eventSeq = fresh[fresh.length - 1].seq;
    S.dirty.add("events"); S.dirty.add("charts");
    if (fresh.some((e) => e.kind.startsWith("checkpoint_"))) loadCheckpoints();
  }
  if (f.series_reset) { S.series = f.series; S.dirty.add("charts"); }
  else if (f.series.ts.length) {
    const last = S.series.ts.length ? S.series.ts[S.series.ts.length - 1] : -Infinity;
    const n = S.series.ts.length;
    f.series.ts.forEach((t, i) => {
      if (t <= last) return;
      S.series.ts.push(t);
      for (const name of Object.keys(f.series.columns)) {
        if (!S.series.columns[name]) S.series.columns[name] = new Array(n).fill(null);
      }
      for (const [name, col] of Object.entries(S.series.columns)) {
        const src = f.series.columns[name];
        col.push(src ? src[i] : null);
      }
    });
    S.dirty.add("charts");
  }
  ["header", "ranks", "knobs", "jobs"].forEach((k) => S.dirty.add(k));
}

let rafPending = false;
let frameStarts = [];
function schedule(t0) {
  frameStarts.push(t0);
  if (rafPending) return;
  rafPending = true;
  requestAnimationFrame(() => {
    rafPending = false;
    render();
    const starts = frameStarts; frameStarts = [];
    // the frame just rendered is painted before the next animation frame starts
    requestAnimationFrame(() => {
      const now = performance.now();
      for (const s of starts) perf.paint_ms.push(now - s);
      if (perf.paint_ms.length > 2000) perf.paint_ms.splice(0, perf.paint_ms.length - 2000);
    });
  });
}

function render() {
  const d = S.dirty;
  if (d.has("jobs")) renderJobs();
  if (d.has("header")) renderHeader();
  if (d.has("ranks")) { renderDrMap(); renderTable(); }
  if (d.has("knobs")) renderKnobs();
  if (d.has("events")) renderEvents();
  if (d.has("charts")) renderCharts();
  d.clear();
}

// ---- header --------------------------------------------------------------------------------
function renderJobs() {
  const sel = $("#job");
  const want = S.jobs.join("\n");
  if (sel.dataset.jobs !== want) {
    sel.innerHTML = S.jobs.map((j) => `<option>${esc(j)}</option>`).join("") || "<option value=''>no job yet</option>";
    sel.dataset.jobs = want;
  }
  if (S.job) sel.value = S.job;
}

function renderHeader() {
  const h = S.header;
  const set = (id, html, cls = "") => { const el = $(id); if (el.innerHTML !== html) el.innerHTML = html; el.className = cls; };
  const rs = $("#run-state");
  if (!h) {
    rs.textContent = "no job yet"; rs.className = "badge";
    ["#h-step", "#h-sps", "#h-loss", "#h-acc", "#h-mfu", "#h-groups", "#h-goodput"].forEach((id) => set(id, "—"));
    return;
  }
  rs.textContent = h.run_state || "—"; rs.className = "badge " + (h.run_state || "");
  set("#h-step", fmt.num(h.step));
  set("#h-sps", fmt.num(h.samples_per_s));
  set("#h-loss", fmt.sig(h.loss));
  set("#h-acc", h.test_acc == null ? "—" : fmt.pct(h.test_acc));
  set("#h-mfu", h.mfu != null ? fmt.pct(h.mfu) : h.flops_per_s != null ? `${fmt.sig(h.flops_per_s / 1e12)} TF/s` : "—");
  const gcls = h.groups_total && h.groups_healthy === h.groups_total ? "good" : h.groups_total ? "warnc" : "";
  set("#h-groups", `${h.groups_healthy}<small> / ${h.groups_total}</small>`, gcls);
  set("#h-goodput", h.goodput == null ? "—" : fmt.pct(h.goodput), h.goodput != null && h.goodput < 0.8 ? "warnc" : "");
  const w = h.weaver || {};
  const drops = Object.values(w.dropped_messages || {}).reduce((a, b) => a + b, 0);
  set("#h-weaver", w.ready ? `ok<small> · loop +${fmt.num(w.loop_late_ms, 0)} ms${drops ? " · " + drops + " dropped" : ""}${w.unsaved_events ? " · " + w.unsaved_events + " unsaved" : ""}</small>` : "starting",
    w.ready && !w.unsaved_events ? "good" : "warnc");
  set("#h-nats", w.nats_connected ? `up<small> · rtt ${w.nats_rtt_ms == null ? "—" : w.nats_rtt_ms.toFixed(1) + " ms"}</small>` : "down",
    w.nats_connected ? "good" : "bad");
  const paused = h.run_state === "paused", stopped = h.run_state === "stopped";
  $("#act-pause").disabled = paused || stopped;
  $("#act-resume").disabled = !paused;
  $("#act-stop").disabled = stopped;
  $("#act-drain").disabled = !S.selected || stopped;
  $("#act-drain").textContent = S.selected ? `Drain ${S.selected}…` : "Drain…";
}

// ---- DR map --------------------------------------------------------------------------------
function stateOf(r) {
  if (["failed", "exited", "hung", "suspect", "draining", "paused", "joining"].includes(r.state)) return r.state;
  if (r.healing) return "healing";
  if (r.straggler) return "straggler";
  return r.state;
}

function renderDrMap() {
  const hosts = new Map();
  for (const r of S.ranks.values()) {
    const host = r.host || "?";
    if (!hosts.has(host)) hosts.set(host, new Map());
    const devs = hosts.get(host);
    const dev = r.device || "?";
    if (!devs.has(dev)) devs.set(dev, []);
    devs.get(dev).push(r);
  }
  const html = [];
  for (const [host, devs] of [...hosts].sort()) {
    html.push(`<div class="host"><div class="hname" title="${esc(host)}">${esc(host)}</div><div class="devices">`);
    for (const [dev, ranks] of [...devs].sort()) {
      html.push(`<div class="device"><div class="dname" title="${esc(dev)}">${esc(dev.replace(/^cuda:GPU-/, "GPU-").slice(0, 22))}</div><div class="chips">`);
      for (const r of ranks.sort((a, b) => a.id.localeCompare(b.id, undefined, { numeric: true }))) {
        const st = stateOf(r);
        const sel = (S.selected === r.replica_id ? " sel" : "") + (r.risk >= 0.5 ? " at-risk" : "");
        html.push(`<span class="chip s-${st}${sel}" data-id="${esc(r.id)}" data-replica="${esc(r.replica_id)}" data-state="${st}">${esc(r.id)}</span>`);
      }
      html.push("</div></div>");
    }
    html.push("</div></div>");
  }
  const out = html.join("") || `<p class="conn">no rank has joined yet</p>`;
  const el = $("#drmap");
  if (el.dataset.html !== out) { el.innerHTML = out; el.dataset.html = out; }
  const leg = $("#legend");
  if (!leg.dataset.done) {
    leg.innerHTML = STATES.map((s) => `<span><i class="s-${s}"></i>${s}</span>`).join("") + `<span><i class="at-risk"></i>failure risk ≥ 50 %</span>`;
    leg.dataset.done = "1";
  }
}

function tipFor(r) {
  const rows = [
    ["replica group", r.replica_id], ["rank", `${r.rank} of ${r.group_world_size}`], ["state", stateOf(r)],
    ["host", r.host], ["device", r.device], ["pid", r.pid], ["step", fmt.num(r.step)],
    ["step time", fmt.ms(r.step_time_s)], ["samples/s", fmt.num(r.samples_per_s)], ["loss", fmt.sig(r.loss)],
    ["config", `v${r.applied_version} (desired v${r.desired_version ?? "—"})`],
    ["heartbeat", fmt.age(r.heartbeat_age_s) + " ago"], ["quorum", r.participants == null ? "—" : `${r.participants} replica group(s)`],
    ["failure risk", r.risk == null ? "—" : fmt.pct(r.risk)],
  ];
  return "<dl>" + rows.map(([k, v]) => `<dt>${k}</dt><dd>${esc(v ?? "—")}</dd>`).join("") + "</dl>";
}

function select(replica) {
  S.selected = S.selected === replica ? null : replica;
  $("#scope").value = S.selected && [...$("#scope").options].some((o) => o.value === S.selected) ? S.selected : "";
  S.knobsKey = null;
  ["ranks", "header", "charts", "knobs"].forEach((k) => S.dirty.add(k));
  render();
}

// ---- replicas table ------------------------------------------------------------------------
function spark(values, color) {
  const v = values.filter((x) => x != null && isFinite(x));
  if (v.length < 2) return "";
  const lo = Math.min(...v), hi = Math.max(...v), span = hi - lo || 1;
  const n = values.length;
  const pts = values.map((x, i) => (x == null ? null : `${((i / (n - 1)) * 80).toFixed(1)},${(17 - ((x - lo) / span) * 15).toFixed(1)}`)).filter(Boolean).join(" ");
  return `<svg width="80" height="18"><polyline fill="none" stroke="${color}" stroke-width="1.2" points="${pts}"/></svg>`;
}

function renderTable() {
  const tbody = $("#ranks tbody");
  const ids = [...S.ranks.keys()].sort((a, b) => {
    const [ga, ra] = a.split("/"), [gb, rb] = b.split("/");
    return ga === gb ? ra - rb : ga.localeCompare(gb, undefined, { numeric: true });
  });
  const existing = new Map([...tbody.rows].map((tr) => [tr.dataset.id, tr]));
  // only the rows in view (and a margin) get their cells redrawn; scrolling redraws
  const wrap = tbody.closest(".table-wrap");
  const rowH = tbody.rows[0]?.offsetHeight || 24;
  const first = Math.floor(wrap.scrollTop / rowH) - 10;
  const last = Math.ceil((wrap.scrollTop + wrap.clientHeight) / rowH) + 10;
  let prev = null;
  let index = -1;
  for (const id of ids) {
    index += 1;
    const r = S.ranks.get(id);
    let tr = existing.get(id);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.id = id;
      tr.innerHTML = "<td></td><td></td><td></td><td class=num></td><td class=num></td><td class=spark></td><td class=num></td><td class=spark></td><td class=num></td><td></td><td class=num></td>";
    }
    existing.delete(id);
    const want = prev ? prev.nextSibling : tbody.firstChild;
    if (want !== tr) tbody.insertBefore(tr, want);
    prev = tr;
    tr.dataset.replica = r.replica_id;
    tr.classList.toggle("sel", S.selected === r.replica_id);
    if ((index < first || index > last) && tr.cells[0]._h) continue;
    const st = stateOf(r);
    const trail = S.sparks.get(id) || [];
    const match = r.desired_version == null || r.applied_version === r.desired_version;
    const cells = [
      esc(id), `<span class="st s-${st}">${st}</span>`, esc(`${r.host} · ${r.device}`), fmt.num(r.step), fmt.sig(r.loss),
      spark(trail.map((p) => p[0]), "#4aa3ff"), fmt.ms(r.step_time_s), spark(trail.map((p) => p[1]), "#e3b341"),
      fmt.num(r.samples_per_s), `<span class="${match ? "" : "mismatch"}" title="applied / desired">v${r.applied_version}${match ? " ✓" : " → v" + r.desired_version}</span>`,
      `<span class="${r.heartbeat_age_s > 2 ? "stale" : ""}">${fmt.age(r.heartbeat_age_s)}</span>`,
    ];
    cells.forEach((html, i) => { const td = tr.cells[i]; if (td._h !== html) { td.innerHTML = html; td._h = html; } });
  }
  for (const tr of existing.values()) tr.remove();
  const live = [...S.ranks.values()].filter((r) => !["failed", "exited"].includes(r.state)).length;
  $("#table-note").textContent = `${live} live of ${S.ranks.size} ranks`;
}

// ---- charts --------------------------------------------------------------------------------
const charts = {};
function groupsOf(prefix) {
  return Object.keys(S.series.columns).filter((k) => k.startsWith(prefix + "/")).map((k) => k.slice(prefix.length + 1))
    .sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
}

function marksPlugin() {
  return {
    hooks: {
      draw: [(u) => {
        const ctx = u.ctx;
        const [x0, x1] = [u.scales.x.min, u.scales.x.max];
        ctx.save();
        ctx.lineWidth = 1.5 * devicePixelRatio;
        for (const e of S.events) {
          const kind = MARKS[e.kind];
          if (!kind || e.ts < x0 || e.ts > x1) continue;
          const x = Math.round(u.valToPos(e.ts, "x", true));
          ctx.strokeStyle = MARK_COLORS[kind];
          ctx.globalAlpha = kind === "cfg" ? 0.5 : 0.85;
          ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke();
        }
        ctx.restore();
      }],
    },
  };
}

function chartSpec(prefix, el, extraTotal) {
  const groups = groupsOf(prefix);
  const series = [{}];
  groups.forEach((g, i) => series.push({
    label: "group " + g, stroke: PALETTE[i % PALETTE.length], width: 1.4,
    alpha: S.selected && S.selected !== g ? 0.25 : 1, spanGaps: false, points: { show: false },
  }));
  if (extraTotal) series.push({ label: "total", stroke: "#d7dde4", width: 1.6, dash: [4, 3], points: { show: false } });
  const width = Math.max(200, el.clientWidth);
  const opts = {
    width, height: 180, series, plugins: [marksPlugin()],
    legend: { show: groups.length <= 8 },
    cursor: { drag: { x: true, y: false } },
    scales: {
      x: { time: true },
      // accuracy lives in [0, 1]: show the band the data is in, never beyond 1
      ...(prefix === "acc" ? { y: { range: (u, min, max) => [min == null ? 0 : Math.max(0, min - 0.02), max == null ? 1 : Math.min(1, max + 0.01)] } } : {}),
    },
    axes: [
      { stroke: "#8593a3", grid: { stroke: "#2a343f", width: 1 }, ticks: { stroke: "#2a343f" }, size: 30 },
      { stroke: "#8593a3", grid: { stroke: "#2a343f", width: 1 }, ticks: { stroke: "#2a343f" }, size: 58 },
    ],
  };
  const data = [S.series.ts, ...groups.map((g) => S.series.columns[prefix + "/" + g])];
  if (extraTotal) data.push(S.series.columns[prefix] || S.series.ts.map(() => null));
  return { key: groups.join(",") + "|" + (S.selected || "") + "|" + width, opts, data };
}

function renderCharts() {
  for (const [prefix, id, total] of [["loss", "#chart-loss", false], ["acc", "#chart-acc", false], ["sps", "#chart-sps", true]]) {
    const el = $(id);
    const spec = chartSpec(prefix, el, total);
    const c = charts[id];
    if (c && c.key === spec.key) { c.u.setData(spec.data); continue; }
    if (c) c.u.destroy();
    charts[id] = { key: spec.key, u: new uPlot(spec.opts, spec.data, el) };
  }
}
window.addEventListener("resize", () => { S.dirty.add("charts"); render(); });

// ---- knobs ---------------------------------------------------------------------------------
function renderKnobs() {
  const c = S.config;
  if (!c) return;
  const scope = $("#scope");
  const groups = [...new Set([...S.ranks.values()].map((r) => r.replica_id))].sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
  const want = groups.join(",");
  if (scope.dataset.groups !== want) {
    const v = scope.value;
    scope.innerHTML = `<option value="">job-wide</option>` + groups.map((g) => `<option value="${esc(g)}">replica group ${esc(g)}</option>`).join("");
    scope.dataset.groups = want;
    scope.value = groups.includes(v) ? v : "";
  }
  $("#knobs-version").textContent = `desired v${c.version ?? "—"} · from step ${c.effective_step ?? "—"}`;
  const key = `${c.version}|${scope.value}`;
  if (S.knobsKey !== key && !document.activeElement?.closest?.("#knob-list")) {
    S.knobsKey = key;
    const list = $("#knob-list");
    list.innerHTML = c.knobs.map((k) => knobRow(k, scope.value)).join("");
    list.querySelectorAll("input,select").forEach((el) => el.addEventListener("input", () => {
      el.dataset.touched = "1";
      el.classList.toggle("changed", el.value !== el.dataset.value);
      el.classList.remove("invalid");
      const err = el.closest(".knob").querySelector(".err"); if (err) err.textContent = "";
    }));
  }
  updateApplyStatus();
}

function valueFor(k, replica) {
  const ov = replica && S.config.overrides[replica];
  if (ov && k.name in ov) return [ov[k.name], true];
  return [k.value, false];
}
function show(v) { return v == null ? "off" : typeof v === "boolean" ? (v ? "on" : "off") : String(v); }

function knobRow(k, replica) {
  const [v, overridden] = valueFor(k, replica);
  const locked = replica && k.scope === "job";
  const options = k.choices ? [...(k.allow_off || v == null ? ["off"] : []), ...k.choices] : k.type === "bool" ? ["on", "off"] : null;
  const attrs = `name="${esc(k.name)}" data-value="${esc(show(v))}" ${locked ? "disabled" : ""}`;
  const input = options
    ? `<select ${attrs}>${options.map((o) => `<option ${o === show(v) ? "selected" : ""}>${esc(o)}</option>`).join("")}</select>`
    : `<input ${attrs} value="${esc(show(v))}" spellcheck="false">`;
  return `<div class="knob" data-knob="${esc(k.name)}"><label title="${esc(k.name + ": " + (k.doc || ""))}">${esc(k.name)}</label>${input}
    <div class="rule">${esc(k.rule)}${k.scope === "job" ? " · job-wide" : ""}</div>
    ${overridden ? `<div class="override">overridden for group ${esc(replica)}</div>` : ""}<div class="err"></div></div>`;
}

async function post(path, body) {
  const resp = await fetch(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body || {}) });
  let data = {};
  try { data = await resp.json(); } catch (e) { data = { ok: false, error: { message: resp.statusText } }; }
  return data;
}

async function applyKnobs(ev) {
  ev.preventDefault();
  const values = {};
  // only what the person changed: a knob the page merely shows is never sent back
  $("#knob-list").querySelectorAll("input,select").forEach((el) => {
    if (!el.disabled && el.dataset.touched && el.value !== el.dataset.value) values[el.name] = el.value;
  });
  const status = $("#apply-status");
  if (!Object.keys(values).length) { status.textContent = "nothing changed"; status.className = "msg"; return; }
  const replica = $("#scope").value || null;
  const data = await post(`/api/jobs/${encodeURIComponent(S.job)}/config`, { values, replica_id: replica });
  if (!data.ok) {
    const err = data.error || {};
    const row = err.knob && $(`#knob-list .knob[data-knob="${CSS.escape(err.knob)}"]`);
    if (row) {
      row.querySelector(".err").textContent = err.message;
      row.querySelector("input,select").classList.add("invalid");
      status.textContent = "not applied"; status.className = "msg err";
    } else { status.textContent = err.message || "refused"; status.className = "msg err"; }
    return;
  }
  S.pendingVersion = { version: data.version, step: data.effective_step };
  S.knobsKey = null;
  document.activeElement?.blur?.();
  updateApplyStatus();
}

function updateApplyStatus() {
  const p = S.pendingVersion;
  if (!p || !S.config) return;
  const st = $("#apply-status");
  const a = S.config.applies.find((x) => x.version === p.version);
  if (a && a.done) {
    const steps = [...new Set(Object.values(a.applied))];
    st.textContent = `v${p.version} applied at step ${steps.length === 1 ? steps[0] : steps.join(", ")}`;
    st.className = "msg ok";
    st.dataset.applied = String(p.version);
  } else {
    const n = a ? Object.keys(a.applied).length : 0;
    st.textContent = `v${p.version} pending → effective at step ${p.step}` + (a ? ` (${n}/${a.expected} ranks)` : "");
    st.className = "msg";
  }
}

// ---- events --------------------------------------------------------------------------------
function renderEvents() {
  const q = S.search.toLowerCase();
  const shown = S.events.filter((e) => (!S.filter || categoryOf(e.kind) === S.filter)
    && (!q || (e.kind + " " + e.message).toLowerCase().includes(q))).slice(-400).reverse();
  $("#events").innerHTML = shown.map((e) =>
    `<li class="ev-${categoryOf(e.kind)}" data-kind="${esc(e.kind)}"><time>${fmt.time(e.ts)}</time><span class="kind">${esc(e.kind)}</span><span>${esc(e.message)}</span></li>`).join("")
    || `<li><span></span><span></span><span class="conn">no events</span></li>`;
}

// ---- checkpoints ---------------------------------------------------------------------------
let ckptLoading = null;
async function loadCheckpoints() {
  const job = S.job;
  if (!job || ckptLoading) return;
  ckptLoading = fetch(`/api/jobs/${encodeURIComponent(job)}/checkpoints`)
    .then((r) => (r.ok ? r.json() : null))
    .then((data) => { if (data && job === S.job) { S.checkpoints = data; renderCheckpoints(); } })
    .catch(() => {})
    .finally(() => { ckptLoading = null; });
}

function size(n) { return !n ? "—" : n >= 1e5 ? (n / 1e6).toFixed(1) + " MB" : (n / 1e3).toFixed(0) + " kB"; }

function renderCheckpoints() {
  const data = S.checkpoints;
  if (!data) return;
  $("#ckpt-note").textContent = "a launch resumes from " + (data.resume_from || "none") + (data.resume_why ? ` (${data.resume_why})` : "");
  const job = encodeURIComponent(S.job);
  $("#ckpts tbody").innerHTML = data.checkpoints.map((c) => {
    const id = esc(c.id);
    const done = c.state === "complete";
    const buttons = done ? `<button data-ck="pin" data-id="${id}">${c.pinned ? "Unpin" : "Pin"}</button>`
      + `<button data-ck="rollback" data-id="${id}" class="warn">Roll back</button>`
      + `<a class="button" href="/api/jobs/${job}/checkpoints/${encodeURIComponent(c.id)}/export" download title="the model's weights as safetensors">Download</a>` : "";
    const del = c.state !== "pending" && c.state !== "deleted" && !c.pinned ? `<button data-ck="delete" data-id="${id}" class="danger">Delete</button>` : "";
    const state = c.state === "complete" ? "" : ` · ${esc(c.state)}`;
    return `<tr class="st-${esc(c.state)}" data-id="${id}" title="${esc(c.state + " · " + size(c.bytes) + (c.reason ? " · " + c.reason : ""))}">`
      + `<td>${id}${c.pinned ? ' <span class="pin">pinned</span>' : ""}${state}</td><td class="num">${c.step}</td><td class="num">${fmt.sig(c.loss)}</td><td class="num">${fmt.sig(c.scores?.eval_loss)}</td><td class="ck-actions">${buttons}${del}</td></tr>`;
  }).join("") || `<tr><td colspan="5" class="conn">no checkpoint yet</td></tr>`;
  renderEvalChart(data.checkpoints);
}

// eval against training loss at each scored checkpoint (x: its step)
function renderEvalChart(records) {
  const el = $("#chart-eval");
  const pts = records.filter((c) => c.state === "complete" && c.scores && c.scores.eval_loss != null)
    .sort((a, b) => a.step - b.step);
  el.hidden = pts.length === 0;
  const old = charts["#chart-eval"];
  if (!pts.length) { if (old) { old.u.destroy(); delete charts["#chart-eval"]; } return; }
  const data = [pts.map((c) => c.step), pts.map((c) => c.loss ?? null), pts.map((c) => c.scores.eval_loss)];
  const width = Math.max(200, el.clientWidth);
  const key = "eval|" + width;
  if (old && old.key === key) { old.u.setData(data); return; }
  if (old) old.u.destroy();
  const axis = { stroke: "#8593a3", grid: { stroke: "#2a343f", width: 1 }, ticks: { stroke: "#2a343f" } };
  const opts = {
    width, height: 160,
    scales: { x: { time: false } },
    series: [{ label: "step" },
      { label: "training loss", stroke: PALETTE[0], width: 1.4, points: { show: true }, spanGaps: true },
      { label: "eval loss", stroke: PALETTE[1], width: 1.6, points: { show: true }, spanGaps: true }],
    axes: [{ ...axis, size: 30 }, { ...axis, size: 58 }],
  };
  charts["#chart-eval"] = { key, u: new uPlot(opts, data, el) };
}

async function checkpointAction(kind, id) {
  const msg = $("#action-msg");
  const job = encodeURIComponent(S.job);
  const rec = (S.checkpoints?.checkpoints || []).find((c) => c.id === id);
  let data;
  if (kind === "save") {
    data = await post(`/api/jobs/${job}/checkpoints`, {});
    msg.textContent = data.ok ? `checkpoint ${data.data?.checkpoint} ordered at step ${data.effective_step}` : `save refused: ${data.error?.message}`;
  } else if (kind === "pin") {
    data = await post(`/api/jobs/${job}/checkpoints/${encodeURIComponent(id)}/pin`, { pinned: !rec?.pinned });
    msg.textContent = data.ok ? `checkpoint ${id} ${rec?.pinned ? "unpinned" : "pinned"}` : `pin refused: ${data.error?.message}`;
  } else if (kind === "delete") {
    if (!(await confirmDialog(`Delete checkpoint ${id} of job ${S.job}? It is never offered again; its files go with the next save.`, false))) return;
    data = await post(`/api/jobs/${job}/checkpoints/${encodeURIComponent(id)}/delete`, {});
    msg.textContent = data.ok ? `checkpoint ${id} deleted` : `delete refused: ${data.error?.message}`;
  } else if (kind === "rollback") {
    if (!(await confirmDialog(`Roll job ${S.job} back to checkpoint ${id} (step ${rec?.step})? Every rank loads it at one step.`, false))) return;
    data = await post(`/api/jobs/${job}/rollback`, { to: id });
    msg.textContent = data.ok ? `rollback to ${id}: v${data.version}, effective at step ${data.effective_step}` : `rollback refused: ${data.error?.message}`;
  }
  msg.className = "msg " + (data.ok ? "ok" : "err");
  loadCheckpoints();
}

// ---- actions -------------------------------------------------------------------------------
function confirmDialog(text, withReplace) {
  return new Promise((resolve) => {
    const dlg = $("#confirm");
    $("#confirm-text").textContent = text;
    $("#confirm-replace-row").hidden = !withReplace;
    $("#confirm-replace").checked = false;
    dlg.onclose = () => resolve(dlg.returnValue === "ok" ? { replace: $("#confirm-replace").checked } : null);
    dlg.showModal();
  });
}

async function action(op) {
  const msg = $("#action-msg");
  let body = {};
  if (op === "stop") {
    if (!(await confirmDialog(`Stop job ${S.job} on every rank at a common step?`, false))) return;
  } else if (op === "drain") {
    const ok = await confirmDialog(`Drain replica group ${S.selected} of job ${S.job}? It leaves at an agreed step; the others go on.`, true);
    if (!ok) return;
    body = { replica_id: S.selected, replace: ok.replace };
  }
  const data = await post(`/api/jobs/${encodeURIComponent(S.job)}/${op}`, body);
  msg.textContent = data.ok ? `${op}: v${data.version}, effective at step ${data.effective_step}` : `${op} refused: ${data.error?.message}`;
  msg.className = "msg " + (data.ok ? "ok" : "err");
}

// ---- wiring --------------------------------------------------------------------------------
function wire() {
  $("#job").addEventListener("change", (e) => {
    S.job = e.target.value; S.selected = null; S.pendingVersion = null; S.checkpoints = null;
    history.replaceState(null, "", "?job=" + encodeURIComponent(S.job));
    connect();
  });
  document.querySelectorAll(".actions button").forEach((b) => b.addEventListener("click", () => action(b.dataset.op)));
  $("#knobs").addEventListener("submit", applyKnobs);
  $("#ckpt-save").addEventListener("click", () => checkpointAction("save"));
  $("#ckpts tbody").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-ck]"); if (b) checkpointAction(b.dataset.ck, b.dataset.id);
  });
  $("#revert").addEventListener("click", () => { S.knobsKey = null; document.activeElement?.blur?.(); renderKnobs(); });
  $("#scope").addEventListener("change", () => { S.knobsKey = null; renderKnobs(); });
  $("#filters").addEventListener("click", (e) => {
    const b = e.target.closest("button"); if (!b) return;
    S.filter = b.dataset.cat;
    document.querySelectorAll("#filters button").forEach((x) => x.classList.toggle("on", x === b));
    renderEvents();
  });
  $("#event-search").addEventListener("input", (e) => { S.search = e.target.value; renderEvents(); });
  $("#drmap").addEventListener("click", (e) => { const c = e.target.closest(".chip"); if (c) select(c.dataset.replica); });
  $(".table-wrap").addEventListener("scroll", () => requestAnimationFrame(() => { S.dirty.add("ranks"); render(); }), { passive: true });
  $("#ranks tbody").addEventListener("click", (e) => { const tr = e.target.closest("tr"); if (tr) select(tr.dataset.replica); });
  const tip = $("#tip");
  $("#drmap").addEventListener("mousemove", (e) => {
    const c = e.target.closest(".chip");
    const r = c && S.ranks.get(c.dataset.id);
    if (!r) { tip.hidden = true; return; }
    tip.innerHTML = tipFor(r);
    tip.hidden = false;
    tip.style.left = Math.min(e.clientX + 14, innerWidth - tip.offsetWidth - 8) + "px";
    tip.style.top = Math.min(e.clientY + 14, innerHeight - tip.offsetHeight - 8) + "px";
  });
  $("#drmap").addEventListener("mouseleave", () => { tip.hidden = true; });
}

wire();
connect();
