// The playground page: completions from a job's checkpoints, side by side; weights imported.
"use strict";
const $ = (sel, root = document) => root.querySelector(sel);
function esc(s) { return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]); }
const P = { job: null, samplers: {}, records: [] };

async function getJSON(path) {
  const r = await fetch(path);
  return r.ok ? r.json() : null;
}

async function post(path, body) {
  const resp = await fetch(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  let data = {};
  try { data = await resp.json(); } catch (e) { data = { ok: false, error: { message: resp.statusText } }; }
  return data;
}

function say(text, cls = "") { const m = $("#pg-msg"); m.textContent = text; m.className = "msg " + cls; }

async function loadJobs() {
  const info = await getJSON("/api/playground");
  P.samplers = (info && info.samplers) || {};
  const jobs = ((await getJSON("/api/jobs")) || []).map((h) => h.job_id).filter((j) => j in P.samplers);
  const sel = $("#job");
  sel.innerHTML = jobs.map((j) => `<option value="${esc(j)}">${esc(j)}</option>`).join("");
  const want = new URLSearchParams(location.search).get("job");
  if (want && jobs.includes(want)) sel.value = want;
  P.job = sel.value || null;
  if (!jobs.length) say("no job to sample: start the Weaver with --sampler JOB=FILE.py:FUNC, and train the job", "err");
  await loadCheckpoints();
}

async function loadCheckpoints() {
  if (!P.job) return;
  const data = await getJSON(`/api/jobs/${encodeURIComponent(P.job)}/checkpoints`);
  P.records = ((data && data.checkpoints) || []).filter((c) => c.state === "complete" || c.state === "imported")
    .sort((a, b) => b.step - a.step || a.id.localeCompare(b.id));
  document.querySelectorAll(".pg-side").forEach((side, i) => {
    const sel = $(".pg-ckpt", side);
    const keep = sel.value;
    const none = i === 1 ? `<option value="">—</option>` : "";
    sel.innerHTML = none + P.records.map((c) => {
      const what = c.state === "imported" ? "imported" : `step ${c.step}`;
      const ev = c.scores && c.scores.eval_loss != null ? ` · eval ${c.scores.eval_loss.toFixed(3)}` : "";
      return `<option value="${esc(c.id)}">${esc(c.id)} (${what}${ev})</option>`;
    }).join("");
    if (keep && P.records.some((c) => c.id === keep)) sel.value = keep;
    else if (i === 1 && P.records.length > 1) sel.value = P.records[P.records.length - 1].id;  // B: the oldest
    linkDownload(side);
  });
}

function linkDownload(side) {
  const id = $(".pg-ckpt", side).value;
  const a = $(".pg-download", side);
  a.hidden = !id;
  if (id) a.href = `/api/jobs/${encodeURIComponent(P.job)}/checkpoints/${encodeURIComponent(id)}/export`;
}

async function sampleSide(side, params) {
  const id = $(".pg-ckpt", side).value;
  const out = $(".pg-out", side), meta = $(".pg-meta", side);
  if (!id) { out.textContent = ""; meta.textContent = ""; side.dataset.state = "idle"; return; }
  side.dataset.state = "busy";
  out.textContent = "…";
  const r = await post(`/api/jobs/${encodeURIComponent(P.job)}/playground/sample`, { checkpoint: id, ...params });
  if (r.ok) {
    out.textContent = params.prompt + r.text;
    meta.textContent = `${r.checkpoint} · step ${r.step} · load ${r.load_s.toFixed(2)} s · sample ${r.sample_s.toFixed(2)} s`;
    side.dataset.state = "done";
  } else {
    out.textContent = "";
    meta.textContent = (r.error && r.error.message) || "sampling failed";
    side.dataset.state = "error";
  }
}

async function sampleAll() {
  const params = {
    prompt: $("#prompt").value,
    max_tokens: parseInt($("#max-tokens").value, 10),
    temperature: parseFloat($("#temperature").value),
    seed: parseInt($("#seed").value, 10) || 0,
  };
  $("#sample").disabled = true;
  say("sampling…");
  try {
    for (const side of document.querySelectorAll(".pg-side")) await sampleSide(side, params);  // one worker: in turn
    say("");
  } finally { $("#sample").disabled = false; }
}

async function importFile() {
  const f = $("#import-file").files[0];
  if (!f) { say("choose a .safetensors file first", "err"); return; }
  const buf = new Uint8Array(await f.arrayBuffer());
  let bin = "";
  for (let i = 0; i < buf.length; i += 0x8000) bin += String.fromCharCode.apply(null, buf.subarray(i, i + 0x8000));
  const r = await post(`/api/jobs/${encodeURIComponent(P.job)}/checkpoints/import`, { name: f.name, data: btoa(bin) });
  if (!r.ok) { say((r.error && r.error.message) || "import refused", "err"); return; }
  say(`imported as ${r.data.id}`, "ok");
  await loadCheckpoints();
}

$("#job").addEventListener("change", () => { P.job = $("#job").value; loadCheckpoints(); });
document.querySelectorAll(".pg-ckpt").forEach((sel) => sel.addEventListener("change", () => linkDownload(sel.closest(".pg-side"))));
$("#sample").addEventListener("click", sampleAll);
$("#import").addEventListener("click", importFile);
loadJobs();
setInterval(loadCheckpoints, 5000);
