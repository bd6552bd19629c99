// usae concept explorer: a static app that works from file:// (data comes as <script> files).
// Every piece of data is put in the page with textContent or attributes, never as HTML.
"use strict";

const chunks = {};
const waiting = {};
const O = window.USAE_OVERVIEW || null;  // set by data/overview.js, loaded first
const T = window.USAE_TEXT;  // the words shown, by place (text.js)
const state = { sort: "energy", asc: false, filter: "all", page: 0, perPage: 200, rank: "mean" };

window.USAE_CHUNK = (data) => {
  chunks[data.chunk] = data.concepts;
  (waiting[data.chunk] || []).forEach((fn) => fn());
  delete waiting[data.chunk];
};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}
const fmt = (v, d = 3) => (v === null || v === undefined || Number.isNaN(v) ? "—" : Number(v).toFixed(d));

function loadChunk(c) {
  return new Promise((resolve, reject) => {
    if (chunks[c]) return resolve(chunks[c]);
    (waiting[c] = waiting[c] || []).push(() => resolve(chunks[c]));
    if (waiting[c].length > 1) return;
    const s = document.createElement("script");
    s.src = `data/concepts_${c}.js`;
    s.onerror = () => reject(new Error(`cannot load data/concepts_${c}.js`));
    document.body.append(s);
  });
}

function classTag(cls) {
  const kind = cls.startsWith("specific") ? "specific" : cls;
  const text = cls.startsWith("specific:") ? `only ${cls.slice(9)}` : cls;
  return el("span", { class: `tag ${kind}`, text });
}

// ---- overview -----------------------------------------------------------------------------
function sortedIds() {
  const t = O.table;
  let ids = [...Array(O.n_concepts).keys()];
  if (state.filter !== "all") ids = ids.filter((k) => t.class[k].split(":")[0] === state.filter);
  const col = state.sort === "id" ? null : t[state.sort];
  const key = (k) => (col ? (col[k] === null ? -Infinity : col[k]) : k);
  ids.sort((a, b) => (state.asc ? key(a) - key(b) : key(b) - key(a)) || a - b);
  return ids;
}

function overview() {
  const r = O.report, s = r.summary, app = document.getElementById("app");
  app.replaceChildren();
  app.append(el("h1", { text: `${O.n_concepts.toLocaleString()} concepts in one space shared by ${O.models.join(", ")}` }));
  const cc = r.concept_classes;
  const specific = Object.values(cc.model_specific).reduce((a, b) => a + b, 0);
  app.append(el("div", { class: "cards" },
    card(fmt(s.self_r2_mean), T.self_r2),
    card(fmt(s.cross_r2_mean), T.cross_r2),
    card(String(cc.universal), `universal (firing entropy ≥ ${cc.thresholds.universal_fe_at_least})`),
    card(String(specific), `model-specific (FE ≤ ${cc.thresholds.model_specific_fe_at_most})`),
    card(String(cc.never_fire), T.never_fire),
    card(r.n_tokens.toLocaleString(), `tokens evaluated (${r.split})`),
    card(fmt(s.jaccard_cross_mean), T.jaccard)));
  app.append(el("h2", { text: T.r2_matrix }));
  const m = el("table", { class: "matrix" });
  m.append(el("tr", {}, el("th", { text: "" }), ...O.models.map((x) => el("th", { text: x }))));
  r.r2.forEach((row, i) => m.append(el("tr", {}, el("th", { text: O.models[i] }), ...row.map((v) => el("td", { text: fmt(v) })))));
  app.append(m);
  faithfulnessTable(app, r.faithfulness);
  truthCards(app, r.truth);
  if (O.plots.length) {
    app.append(el("h2", { text: T.plots }));
    app.append(el("div", { class: "plots" }, ...O.plots.map((p) => el("img", { src: `plots/${p}`, alt: p }))));
  }
  app.append(el("h2", { text: T.concepts }));
  const filter = el("select", { id: "filter", onchange: (e) => { state.filter = e.target.value; state.page = 0; drawTable(); } },
    ...["all", "universal", "specific", "mixed", "dead"].map((v) => el("option", { value: v, text: v })));
  filter.value = state.filter;
  app.append(el("div", { class: "filters" }, el("label", { for: "filter", text: T.show }), filter,
    el("span", { class: "muted", text: T.table_hint })));
  app.append(el("div", { id: "table" }));
  drawTable();
}

function faithfulnessTable(app, f) {
  if (!f || !f.top1_agreement) return;
  app.append(el("h2", { text: T.faithfulness }));
  app.append(el("p", { class: "muted", text: `Reconstructions spliced in at the cached layer, the rest of the target model run to its logits, on ${f.n_images} images. Each cell: top-1 agreement with the unspliced model / fraction of KL recovered over the mean ablation.` }));
  const t = el("table", { class: "matrix faithfulness" });
  t.append(el("tr", {}, el("th", { text: "" }), ...f.models.map((x) => el("th", { text: x }))));
  const cell = (a, k) => (a === null || k === null ? T.not_available : `${(100 * a).toFixed(1)}% / ${fmt(k)}`);
  f.top1_agreement.forEach((row, i) => t.append(el("tr", {}, el("th", { text: f.models[i] }),
    ...row.map((a, j) => el("td", { text: cell(a, f.kl_recovered[i][j]) })))));
  t.append(el("tr", {}, el("th", { text: T.grid_only }), ...f.models.map((x) =>
    el("td", { text: cell(f.resample_only[x].top1_agreement, f.resample_only[x].kl_recovered) }))));
  app.append(t);
}

function truthCards(app, t) {
  if (!t) return;
  app.append(el("h2", { text: T.truth }));
  app.append(el("div", { class: "cards" },
    ...Object.entries(t.recovery).map(([m, v]) => card(fmt(v), `recovery in ${m} (mean best cosine)`)),
    card(t.shared_as_one === null ? T.not_available : `${(100 * t.shared_as_one).toFixed(0)}%`, T.shared_as_one),
    card(t.specific_detected === null ? T.not_available : `${(100 * t.specific_detected).toFixed(0)}%`, T.specific_detected),
    card(fmt(t.mcc_mean), T.mcc),
    card(`${t.spurious.count} / ${t.spurious.firing}`, T.spurious)));
}

function card(v, k) { return el("div", { class: "card" }, el("div", { class: "v", text: v }), el("div", { class: "k", text: k })); }

function drawTable() {
  const ids = sortedIds(), t = O.table, holder = document.getElementById("table");
  const cols = [["id", T.concept], ["energy", T.energy], ["firing_entropy", T.firing_entropy], ["cofires", T.cofires],
    ...O.models.map((m) => [`fires_${m}`, `fires ${m}`]), ...O.models.map((m) => [`cfp_${m}`, `CFP ${m}`])];
  const head = el("tr", {}, ...cols.map(([key, label]) => el("th", {
    text: label, class: state.sort === key ? `sorted${state.asc ? " asc" : ""}` : "", "data-key": key,
    onclick: () => { if (state.sort === key) state.asc = !state.asc; else { state.sort = key; state.asc = key === "id"; } state.page = 0; drawTable(); },
  })), el("th", { text: T.class }));
  const table = el("table", { id: "concepts" }, head);
  const start = state.page * state.perPage;
  for (const k of ids.slice(start, start + state.perPage)) {
    const cells = cols.map(([key]) => {
      if (key === "id") return el("td", {}, el("a", { href: `#/concept/${k}`, text: `#${k}` }));
      const v = t[key][k];
      return el("td", { text: key.startsWith("fires") || key === "cofires" ? String(v) : fmt(v) });
    });
    table.append(el("tr", { "data-concept": String(k) }, ...cells, el("td", { class: "cls" }, classTag(t.class[k]))));
  }
  const pages = Math.max(1, Math.ceil(ids.length / state.perPage));
  const pager = el("div", { class: "pager" },
    el("button", { text: T.previous_page, disabled: state.page === 0, onclick: () => { if (state.page > 0) { state.page--; drawTable(); } } }),
    el("span", { text: `page ${state.page + 1} of ${pages} · ${ids.length} concepts` }),
    el("button", { text: T.next_page, onclick: () => { if (state.page < pages - 1) { state.page++; drawTable(); } } }));
  holder.replaceChildren(pager, table);
}

// ---- concept page -------------------------------------------------------------------------
const LUT = (() => {
  const lut = new Uint8ClampedArray(256 * 4);
  for (let i = 0; i < 256; i++) {
    const t = i / 255;
    lut[i * 4] = 255 - 55 * Math.max(0, t - 0.6) / 0.4;
    lut[i * 4 + 1] = 230 * Math.max(0, 1 - t * 1.1);
    lut[i * 4 + 2] = 0;
    lut[i * 4 + 3] = Math.round(170 * Math.sqrt(t));
  }
  return lut;
})();

function decode(b64) {
  const s = atob(b64), out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

function tile(concept, row, modelIndex, model) {
  const info = O.images[String(row)] || {};
  const canvas = el("canvas", { width: 128, height: 128, "aria-label": `${model} heatmap on ${info.name || row}` });
  const ctx = canvas.getContext("2d");
  const [gh, gw] = O.grid, tokens = gh * gw;
  const maps = concept._maps[model], idx = concept.images.indexOf(row);
  const overlay = () => {
    const small = document.createElement("canvas");
    small.width = gw; small.height = gh;
    const img = small.getContext("2d").createImageData(gw, gh);
    for (let t = 0; t < tokens; t++) {
      const v = maps[idx * tokens + t];
      img.data.set(LUT.subarray(v * 4, v * 4 + 4), t * 4);
    }
    small.getContext("2d").putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(small, 0, 0, 128, 128);
  };
  if (info.thumb) {
    const im = new Image();
    im.onload = () => { ctx.drawImage(im, 0, 0, 128, 128); overlay(); };
    im.onerror = overlay;
    im.src = info.thumb;
  } else { ctx.fillStyle = "#9aa1ad"; ctx.fillRect(0, 0, 128, 128); overlay(); }
  const cap = el("div", { class: "cap", text: info.label ? `${info.label} · ${info.name}` : (info.name || `image ${row}`), title: info.name || "" });
  return el("div", { class: "tile", "data-model": model }, canvas, cap);
}

async function conceptPage(k) {
  const app = document.getElementById("app");
  if (!(k >= 0 && k < O.n_concepts)) { app.replaceChildren(el("p", { class: "empty", text: `There is no concept ${k}.` })); return; }
  app.replaceChildren(el("p", { class: "empty", text: `Loading concept ${k}…` }));
  let data;
  try { data = (await loadChunk(Math.floor(k / O.chunk)))[k]; }
  catch (err) { app.replaceChildren(el("p", { class: "empty", text: String(err.message) })); return; }
  if (!data._maps) data._maps = Object.fromEntries(Object.entries(data.maps).map(([m, b]) => [m, decode(b)]));
  const t = O.table;
  app.replaceChildren();
  app.append(el("div", { class: "nav" },
    el("a", { href: "#/", text: T.to_overview }),
    el("a", { href: `#/concept/${Math.max(0, k - 1)}`, text: T.previous_concept }),
    el("a", { href: `#/concept/${Math.min(O.n_concepts - 1, k + 1)}`, text: T.next_concept })));
  app.append(el("h1", { id: "concept-title" }, `Concept #${k} `, classTag(t.class[k])));
  const metrics = el("table", { class: "metrics" },
    el("tr", {}, el("th", { text: T.energy }), el("td", { text: fmt(t.energy[k], 4) }),
      el("th", { text: T.firing_entropy }), el("td", { text: fmt(t.firing_entropy[k]) }),
      el("th", { text: T.cofires }), el("td", { text: String(t.cofires[k]) })),
    el("tr", {}, ...O.models.flatMap((m) => [el("th", { text: `fires ${m}` }), el("td", { text: `${t[`fires_${m}`][k]} (CFP ${fmt(t[`cfp_${m}`][k], 2)})` })])));
  app.append(metrics);
  const ranking = data.rankings[state.rank] ? state.rank : "mean";
  const rows = data.rankings[ranking] || [];
  const bar = el("div", { class: "toolbar" }, el("span", { text: T.rank_by }),
    ...["mean", ...O.models].map((key) => el("button", {
      text: key === "mean" ? T.mean_ranking : key, "aria-pressed": String(key === ranking),
      onclick: () => { state.rank = key; conceptPage(k); },
    })),
    el("span", { text: T.scale_from }), el("span", { class: "scale" }),
    el("span", { text: `${fmt(data.scale, 3)} (shared by every row)` }));
  app.append(bar);
  if (!rows.length) {
    app.append(el("p", { class: "empty", text: T.dead }));
  } else {
    app.append(el("div", { class: "rows" }, ...O.models.map((m, j) => el("div", { class: "row", "data-model": m },
      el("div", { class: "label", text: m }), ...rows.map((r) => tile(data, r, j, m))))));
  }
  if (data.cam) camSection(app, data);
}

function camSection(app, data) {
  app.append(el("h2", { text: T.cam }));
  const names = Object.keys(data.cam);
  app.append(el("div", { class: "row cams" }, ...names.map((m) => el("div", { class: "tile cam", "data-model": m },
    el("img", { src: data.cam[m], alt: `${m}: image optimized for this concept` }),
    data.cam_alpha && data.cam_alpha[m] ? el("img", { src: data.cam_alpha[m], class: "alpha", alt: `${m}: where the objective's gradient was (transparency map)` }) : null,
    el("div", { class: "cap", text: m })))));
  const c = data.cam_checks;
  if (!c) return;
  app.append(el("p", { class: "camnote", text: T.cam_note }));
  app.append(el("table", { class: "metrics camchecks" },
    el("tr", {}, el("th", { text: T.self_ratio }), ...names.map((m) => el("td", { "data-model": m, text: `${m} ${fmt(c.self_ratio && c.self_ratio[m], 2)}` })))));
  const matrix = (title, mat) => el("table", { class: "metrics transfer", "data-kind": title },
    el("tr", {}, el("th", { text: title }), ...names.map((m) => el("th", { text: m }))),
    ...(mat || []).map((row, i) => el("tr", {}, el("th", { text: names[i] }), ...row.map((v) => el("td", { text: fmt(v, 2) })))));
  app.append(matrix(T.transfer, c.transfer));
  app.append(matrix(`control (concept ${c.control_concept})`, c.transfer_control));
  app.append(el("p", { class: "camnote", text: `mean off-diagonal transfer ${fmt(c.transfer_offdiag_mean, 2)} against ${fmt(c.transfer_control_offdiag_mean, 2)} for the frequency-matched control concept's images` }));
}

// ---- routing and keys ---------------------------------------------------------------------
function route() {
  const m = location.hash.match(/^#\/concept\/(\d+)/);
  if (m) conceptPage(Number(m[1])); else overview();
  window.scrollTo(0, 0);
}

function current() { const m = location.hash.match(/^#\/concept\/(\d+)/); return m ? Number(m[1]) : null; }

document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT" || e.metaKey || e.ctrlKey) return;
  const k = current();
  if ((e.key === "ArrowRight" || e.key === "j") && k !== null && k < O.n_concepts - 1) location.hash = `#/concept/${k + 1}`;
  else if ((e.key === "ArrowLeft" || e.key === "k") && k !== null && k > 0) location.hash = `#/concept/${k - 1}`;
  else if (e.key === "Escape" || e.key === "u") location.hash = "#/";
});

document.getElementById("search").addEventListener("submit", (e) => {
  e.preventDefault();
  const v = document.getElementById("goto").value;
  if (v !== "") location.hash = `#/concept/${Number(v)}`;
});

if (!O) {
  document.getElementById("app").replaceChildren(el("p", { class: "empty", text: T.no_overview }));
} else {
  document.getElementById("runinfo").textContent = O.run;
  window.addEventListener("hashchange", route);
  route();
}
