// meshpool dashboard: draws /dashboard/events (server-sent JSON, once a second) into the page.
// Every value goes in as text (textContent), never as HTML: provider-chosen strings stay inert.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key === "data") Object.assign(node.dataset, value);
    else if (key === "style") Object.assign(node.style, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function hue(peer) {  // a stable colour per provider
  let h = 0;
  for (let i = 0; i < peer.length; i++) h = (h * 31 + peer.charCodeAt(i)) >>> 0;
  return h % 360;
}
const colour = (peer) => `hsl(${hue(peer)} 62% 62%)`;
const short = (peer) => "…" + peer.slice(-6);
const num = (v, digits = 0) => (v === null || v === undefined) ? "–"
  : Number(v).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
const units = (v) => (v === null || v === undefined) ? "–" : num(v);

function replaceRows(table, rows, columns, emptyText) {
  const body = table.tBodies[0];
  if (!rows.length) rows = [el("tr", { class: "empty" }, el("td", { colspan: columns }, emptyText))];
  body.replaceChildren(...rows);
}

function renderFigures(s) {
  $("model").textContent = `${s.model.id} · ${s.model.n_layers} layers`;
  $("f-tps").textContent = num(s.pool.tokens_per_s, 1);
  $("f-inflight").textContent = num(s.pool.requests_in_flight);
  $("f-pending").textContent = num(s.pool.pending_requests);
  $("f-ttft").textContent = num(s.pool.ttft_ms_median);
  $("f-tokens").textContent = num(s.pool.tokens_total);
  const states = Object.entries(s.pool.providers_by_state).map(([k, v]) => `${v} ${k}`).join(", ");
  $("f-providers").textContent = num(s.providers.filter((p) => p.state !== "dead").length);
  $("f-providers").title = states;
  const err = $("plan-error");
  err.hidden = !s.pool.plan_error;
  err.textContent = s.pool.plan_error ? `planner: ${s.pool.plan_error}` : "";
}

function renderPipelines(s) {
  const n = s.model.n_layers || 1;
  $("layers").textContent = `(bars span layers 0–${n})`;
  const out = s.pipelines.map((p, i) => {
    const segments = p.stages.map((st) => el("div", {
      class: "segment", title: `${st.peer}\nlayers [${st.start}, ${st.end})`,
      data: { peer: st.peer, start: st.start, end: st.end },
      style: { width: `${(100 * (st.end - st.start)) / n}%`, background: colour(st.peer) },
    }, el("span", { class: "range" }, `[${st.start}, ${st.end})`), el("span", {}, short(st.peer))));
    return el("div", { class: "pipeline", data: { pipeline: p.id } },
      el("div", { class: "caption" }, el("b", {}, `pipeline ${i + 1}`), el("span", {}, p.id),
        el("span", {}, `${num(p.tokens_per_s, 1)} tokens/s`),
        el("span", {}, p.step_ms === null ? "step –" : `step ${num(p.step_ms, 1)} ms`),
        el("span", {}, `${p.stages.length} stages`),
        el("span", {}, p.max_sessions == null ? "" : `${num(p.max_sessions)} sessions × ${num(p.context_tokens)} tokens`)),
      el("div", { class: "bar" }, ...segments),
      el("div", { class: "scale" }, el("span", {}, "0"), el("span", {}, String(n))));
  });
  if (!out.length) out.push(el("p", { class: "muted" }, "no pipeline yet"));
  $("pipelines").replaceChildren(...out);
}

function measuredTitle(p) {
  // the profile is a claim; the planner uses what the coordinator measured
  const m = p.measured;
  if (!m || m.bandwidth_gb_per_s === null) return "not measured yet";
  return `planned at ${num(m.bandwidth_gb_per_s, 2)} GB/s, ${num(m.matmul_tflops, 4)} TFLOP/s effective (from its ${m.source})`;
}

function renderProviders(s) {
  const rows = s.providers.map((p) => el("tr", { class: p.state, data: { peer: p.peer, state: p.state } },
    el("td", { class: "peer" }, el("i", { style: { background: colour(p.peer) } }), p.peer),
    el("td", {}, el("span", { class: `badge ${p.state}`, title: p.benched ? p.benched.reason : "" },
      p.benched ? `benched, back in ${num(p.benched.back_in_s)} s` : p.state)),
    el("td", { title: p.profile.name }, `${p.profile.device} ${p.profile.name}`),
    el("td", {}, `${num(p.max_memory_mb)} MB cap / ${num(p.profile.memory_gb, 1)} GB`),
    el("td", { title: (p.links || []).map((l) => `${l.kind || "hop"} to ${l.peer}` +
      (l.bandwidth_gbps === null || l.bandwidth_gbps === undefined ? "" : `, ${num(l.bandwidth_gbps * 1000, 1)} Mbit/s measured`)).join("\n") },
      el("span", { class: `badge ${p.reachability}` }, p.reachability || "–"),
      p.rtt_ms === null ? "" : ` ${num(p.rtt_ms, 1)} ms`),
    el("td", { title: measuredTitle(p) }, (p.profile.bandwidth_gb_per_s === null ? "–" : `${num(p.profile.bandwidth_gb_per_s, 1)} GB/s`)
      + (p.measured && p.measured.contradicted ? " ✗ contradicted" : "")),
    el("td", {}, p.profile.matmul_tflops === null ? "–" : `${num(p.profile.matmul_tflops, 2)} TFLOP/s`),
    el("td", {}, p.stages.map(([a, b]) => `[${a}, ${b})`).join(" ") || "–"),
    el("td", { title: p.misconduct_count ? `${p.misconduct_count} contradicted claim(s) recorded in the ledger` : "" },
      num(p.reputation) + (p.misconduct_count ? ` (✗ ${p.misconduct_count})` : "")),
    el("td", {}, units(p.stake_units)), el("td", {}, units(p.earned_units))));
  replaceRows($("providers"), rows, 10, "no provider has joined");
}

function renderLedger(s) {
  replaceRows($("audits"), s.audits.map((a) => el("tr", {},
    el("td", {}, a.seq), el("td", { class: "peer" }, a.subject), el("td", { class: "peer" }, a.verifier),
    el("td", {}, el("span", { class: `badge ${a.verdict}` }, a.verdict)), el("td", {}, units(a.fee_units)))),
  5, "no audit yet");
  replaceRows($("slashes"), s.slashes.map((x) => el("tr", {},
    el("td", {}, x.seq), el("td", { class: "peer" }, x.peer), el("td", {}, units(x.taken_units)),
    el("td", {}, x.reason))), 4, "no slash yet");
  const l = s.ledger;
  const items = l ? [
    ["head hash", l.head_hash], ["entries", num(l.entry_count)], ["tree root", l.tree_root],
    ["last checkpoint", l.last_checkpoint
      ? `${num(l.last_checkpoint.entry_count)} entries, root ${l.last_checkpoint.tree_root}, ` +
        new Date(l.last_checkpoint.ts_ms).toISOString()
      : "none yet"],
    ["total supply", `${num(l.supply_units)} units`],
    ["in escrow", `${num(l.escrow_requests_units)} units for ${num(l.open_holds)} requests, ` +
      `${num(l.escrow_stakes_units)} units staked`],
    ["audits", `${num(l.audits_by_verdict.pass)} passed, ${num(l.audits_by_verdict.fail)} failed`],
    ["slashes", `${num(l.slash_count)} (${num(l.slashed_units)} units)`],
  ] : [["ledger", "not readable"]];
  $("ledger").replaceChildren(...items.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

let renders = 0;
function render(s) {
  renderFigures(s);
  renderPipelines(s);
  renderProviders(s);
  renderLedger(s);
  $("updated").textContent = new Date(s.ts_ms).toLocaleTimeString();
  renders += 1;
  if (renders === 1) window.meshpoolFirstRenderMs = performance.now();  // read by tests and the benchmark
  document.body.dataset.renders = String(renders);
}

function connect() {
  const conn = $("conn");
  const source = new EventSource("/dashboard/events");
  source.onopen = () => { conn.textContent = "live"; conn.className = "conn up"; };
  source.onerror = () => { conn.textContent = "reconnecting…"; conn.className = "conn down"; };
  source.onmessage = (event) => {
    try { render(JSON.parse(event.data)); } catch (e) { console.error("dashboard: bad update", e); }
  };
}

connect();
