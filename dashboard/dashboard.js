// The dashboard's program: draws the tables and SVG charts from the JSON in the page's "data" element.
// dashboard/page.py inlines this file into one self-contained HTML page (it works from file://, no network).
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const PALETTE = ["#4f46e5","#0891b2","#16a34a","#ca8a04","#dc2626","#9333ea","#db2777","#0d9488","#ea580c","#64748b"];
const col = i => PALETTE[i % PALETTE.length];
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "html") e.innerHTML = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const k of kids.flat(Infinity)) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
  return e;
}
const SVGNS = "http://www.w3.org/2000/svg";
function sv(tag, attrs, ...kids) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids.flat(Infinity)) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
  return e;
}
const fmt = (v, d = 3) => (v === null || v === undefined) ? "–" : Number(v).toFixed(d);
const sgn = (v, d = 3) => (v === null || v === undefined) ? "–" : (v >= 0 ? "+" : "") + Number(v).toFixed(d);
function heat(v, lo, mid, hi) {  // diverging red-white-green around mid
  if (v === null || v === undefined) return "#f3f4f6";
  const t = v >= mid ? Math.min(1, (v - mid) / ((hi - mid) || 1)) : -Math.min(1, (mid - v) / ((mid - lo) || 1));
  const a = Math.abs(t) * 0.75;
  return t >= 0 ? `rgba(22,163,74,${a})` : `rgba(220,38,38,${a})`;
}
function selectBox(label, options, value, onchange) {
  const s = el("select", {onchange: e => onchange(e.target.value)}, options.map(o => el("option", {value: o}, o)));
  s.value = value;
  return el("label", {}, label + " ", s);
}
function card(id, title, ...kids) { return el("section", {class: "card", id}, el("h2", {}, title), ...kids); }
// checkpoints sampled with Self-CoT carry a tag; their reasoning (model output) only ever enters the page as text
const cotTag = (S, c) => (S.self_cot || []).includes(c) ? el("span", {class: "cot-tag", title: "sampled with Self-CoT: reasoning, then the image"}, "Self-CoT") : null;
const nav = [];

// ---- evaluation: table, win rates, distributions, grid, hacking panel --------------------------------
function rewardTable(S, box, base) {
  box.innerHTML = "";
  const head = el("tr", {}, el("th", {class: "name"}, "checkpoint"),
    S.rewards.map(r => [el("th", {}, r, el("div", {class: "muted"}, "mean [95% CI]")),
                        el("th", {}, "Δ vs " + base, el("div", {class: "muted"}, "paired 95% CI"))]));
  const rows = S.checkpoints.map((c, i) => el("tr", {},
    el("td", {class: "name"}, el("i", {style: `display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;background:${col(i)}`}), c, cotTag(S, c)),
    S.rewards.map(r => {
      const t = S.table[r][i], d = S.deltas[base][r][i];
      const sig = c === base ? "" : (d.lo > 0 ? "sig-up" : (d.hi < 0 ? "sig-down" : ""));
      return [el("td", {class: "mean", "data-checkpoint": c, "data-reward": r, "data-value": String(t.mean)},
                 fmt(t.mean, 4), el("span", {class: "ci"}, `[${fmt(t.lo, 4)}, ${fmt(t.hi, 4)}]`)),
              el("td", {class: "delta " + sig, "data-checkpoint": c, "data-reward": r, "data-value": String(d.delta)},
                 c === base ? "baseline" : sgn(d.delta, 4), c === base ? null : el("span", {class: "ci"}, `[${sgn(d.lo, 4)}, ${sgn(d.hi, 4)}]`))];
    })));
  box.append(el("div", {class: "scroll"}, el("table", {class: "reward-table"}, el("thead", {}, head), el("tbody", {}, rows))),
    el("p", {class: "muted"}, "Green / red: the paired CI of the gain excludes 0. Rows are the same prompts and seeds for every checkpoint."));
}
function cotSummary(S) {  // each Self-CoT entry against the same weights sampled without it
  if (!(S.cot_pairs || []).length) return null;
  return el("div", {class: "cot-summary"}, S.cot_pairs.map(p => el("p", {},
    el("b", {}, `Self-CoT: ${p.with} vs ${p.without}`), " (same weights, prompts and seeds; paired 95% CI): ",
    S.rewards.map((r, k) => { const d = p.deltas[r];
      return [k ? "; " : "", el("span", {class: "cot-delta " + (d.lo > 0 ? "sig-up" : (d.hi < 0 ? "sig-down" : "")), "data-reward": r, "data-value": String(d.delta)},
        `${r} ${sgn(d.delta, 4)} [${sgn(d.lo, 4)}, ${sgn(d.hi, 4)}]`)]; }))));
}
function winMatrix(S, box, r) {
  box.innerHTML = "";
  const W = S.winrates[r];
  box.append(el("div", {class: "scroll"}, el("table", {class: "win-table"},
    el("tr", {}, el("th", {class: "name"}, "row beats column"), S.checkpoints.map(c => el("th", {}, c))),
    S.checkpoints.map((c, i) => el("tr", {}, el("td", {class: "name"}, c),
      W[i].map((v, j) => el("td", {style: `background:${i === j ? "#f3f4f6" : heat(v, 0, 0.5, 1)}`, "data-value": String(v)}, i === j ? "·" : fmt(v, 2))))))),
    el("p", {class: "muted"}, `Share of paired (prompt, seed) rows where the row's ${r} is higher (ties count ½).`));
}
function distChart(S, box, r) {
  box.innerHTML = "";
  const all = S.dists[r].flat().filter(v => v !== null);
  let lo = Math.min(...all), hi = Math.max(...all); if (hi === lo) { hi += 1e-6; lo -= 1e-6; }
  const W = 640, L = 130, rowH = 34, H = S.checkpoints.length * rowH + 30;
  const x = v => L + (v - lo) / (hi - lo) * (W - L - 20);
  const g = sv("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`});
  S.checkpoints.forEach((c, i) => {
    const v = S.dists[r][i].filter(a => a !== null).sort((a, b) => a - b), y = 14 + i * rowH + rowH / 2;
    const q = p => v[Math.min(v.length - 1, Math.floor(p * (v.length - 1)))];
    g.append(sv("text", {x: L - 8, y: y + 4, "text-anchor": "end", "font-size": 12, fill: "#374151"}, c),
      sv("line", {x1: x(q(0)), x2: x(q(1)), y1: y, y2: y, stroke: col(i), "stroke-width": 1}),
      sv("rect", {x: x(q(.25)), y: y - 8, width: Math.max(1, x(q(.75)) - x(q(.25))), height: 16, fill: col(i), "fill-opacity": .18, stroke: col(i)}),
      sv("line", {x1: x(q(.5)), x2: x(q(.5)), y1: y - 9, y2: y + 9, stroke: col(i), "stroke-width": 2.5}));
    v.forEach((a, k) => g.append(sv("circle", {cx: x(a), cy: y + ((k * 7919) % 13 - 6), r: 2, fill: col(i), "fill-opacity": .55})));
    const m = S.table[r][i].mean; g.append(sv("path", {d: `M${x(m)},${y - 13} l-4,-6 h8 z`, fill: "#111827"}));
  });
  for (let k = 0; k <= 4; k++) { const v = lo + k * (hi - lo) / 4;
    g.append(sv("text", {x: x(v), y: H - 4, "text-anchor": "middle", "font-size": 10, fill: "#6b7280"}, fmt(v, 3))); }
  box.append(g, el("p", {class: "muted"}, "Box: quartiles; bar: median; ▼ mean; dots: every sample."));
}
function imageGrid(S, box, state) {
  box.innerHTML = "";
  const base = S.checkpoints.indexOf(state.base), r = state.reward;
  const change = row => Math.max(...row.scores[r].map(v => Math.abs((v ?? 0) - (row.scores[r][base] ?? 0))));
  let rows = S.grid.filter(row => row.prompt.toLowerCase().includes(state.filter.toLowerCase()));
  if (state.sort === "largest change") rows = rows.slice().sort((a, b) => change(b) - change(a));
  const table = el("table", {class: "grid"}, el("tr", {}, el("th", {class: "name"}, "prompt"), S.checkpoints.map(c => el("th", {}, c, cotTag(S, c)))));
  rows.forEach(row => table.append(el("tr", {class: "grid-row"}, el("td", {class: "prompt"}, row.prompt,
    el("div", {class: "muted"}, "max |Δ| " + fmt(change(row), 3))),
    S.checkpoints.map((c, i) => { const v = row.scores[r][i], d = v - row.scores[r][base];
      const cls = i === base ? "badge" : (d > 0 ? "badge up" : (d < 0 ? "badge down" : "badge"));
      const text = (row.reasoning || [])[i];
      return el("td", {}, el("div", {class: "cell"}, el("div", {class: "thumb"}, el("img", {src: row.images[i], alt: c, title: `${c}: ${r} = ${fmt(v, 4)}`}),
        el("span", {class: cls}, fmt(v, 3))), text === null || text === undefined ? null : el("div", {class: "reasoning", title: "Self-CoT reasoning"}, text))); }))));
  box.append(el("div", {class: "muted"}, `${rows.length} of ${S.grid.length} prompts (first seed of each)`), el("div", {class: "scroll"}, table));
}
function corrTable(names, M, cls) {
  return el("table", {class: cls}, el("tr", {}, el("th", {}, ""), names.map(n => el("th", {}, n))),
    names.map((a, i) => el("tr", {}, el("td", {class: "name"}, a),
      M[i].map((v, j) => el("td", {style: `background:${i === j ? "#f3f4f6" : heat(v, -1, 0, 1)}`}, fmt(v, 2))))));
}
function hackingPanel(S, box, base) {
  box.innerHTML = "";
  const b = S.drift[S.checkpoints.indexOf(base)];
  const keys = ["diversity", "brightness", "saturation", "png_kb"];
  const drift = el("table", {class: "drift-table"}, el("tr", {}, el("th", {class: "name"}, "checkpoint"), keys.map(k => el("th", {}, k))),
    S.drift.map(d => el("tr", {}, el("td", {class: "name"}, d.checkpoint), keys.map(k => {
      const rel = b[k] ? (d[k] - b[k]) / Math.abs(b[k]) : 0;
      return el("td", {style: `background:${heat(-Math.abs(rel), -0.5, 0, 0.5)}`, title: `${sgn(100 * rel, 1)}% vs ${base}`}, fmt(d[k], 4));
    }))));
  const warn = S.drift.filter(d => b.diversity && d.diversity !== null && d.diversity < 0.7 * b.diversity).map(d => d.checkpoint);
  box.append(el("h3", {}, "Rank correlation between rewards over every sample (Spearman)"), corrTable(S.rewards, S.corr_samples, "corr-table"),
    el("h3", {}, "Correlation of reward means across checkpoints (Pearson): rewards that stop moving together hint at hacking"),
    corrTable(S.rewards, S.corr_means, "corr-table"),
    el("h3", {}, "Cheap drift signals from the thumbnails (shade: relative change vs " + base + ")"), drift,
    warn.length ? el("p", {class: "warn"}, "Diversity fell by over 30% for: " + warn.join(", ")) : el("p", {class: "muted"}, "No checkpoint lost over 30% of the baseline's diversity."));
}
function renderEval(S, k) {
  const id = `eval${k}`, state = {base: S.baseline, reward: S.rewards[0], win: S.rewards[0], dist: S.rewards[0], sort: "prompt order", filter: ""};
  const tag = D.evals.length > 1 ? ` ${k + 1}` : "";
  nav.push([id, "Scores" + tag]);
  const tbl = el("div"), win = el("div"), dist = el("div"), grid = el("div"), hack = el("div");
  const redraw = () => { rewardTable(S, tbl, state.base); imageGrid(S, grid, state); hackingPanel(S, hack, state.base); };
  const kpis = el("div", {class: "kpis"}, [["checkpoints", S.checkpoints.length], ["prompts", S.num_prompts], ["paired rows", S.num_rows],
    ["rewards", S.rewards.length]].map(([a, v]) => el("div", {class: "kpi"}, el("b", {}, v), el("span", {}, a))));
  const main = document.getElementById("main");
  main.append(card(id, "Checkpoints × rewards — " + S.name, kpis, S.complete ? null : el("p", {class: "warn"}, "Some checkpoints are not fully scored: common rows only."),
    el("div", {class: "controls"}, selectBox("baseline", S.checkpoints, state.base, v => { state.base = v; redraw(); })), tbl, cotSummary(S)));
  if (S.selection) {
    const sel = S.selection, cands = sel.candidates;
    main.append(card(id + "-sel", "Checkpoint selection (primary: " + sel.primary + ")",
      el("div", {class: "chosen"}, el("b", {}, "Chosen: " + sel.chosen), " — " + sel.reason),
      el("div", {class: "scroll"}, el("table", {class: "selection-table"},
        el("tr", {}, ["rank", "candidate", sel.primary + " mean [95% CI]", "gain vs base [95% CI]", "win vs base", "held-out FM loss", "diversity", "guards"].map((h, i) => el("th", {class: i < 2 ? "name" : ""}, h))),
        sel.ranking.map((n, i) => { const f = cands[n], ok = !f.failed_guards.length;
          return el("tr", {style: n === sel.chosen ? "background:#ecfdf5" : ""}, el("td", {class: "name"}, i + 1), el("td", {class: "name"}, n),
            el("td", {}, fmt(f.primary_mean, 4), el("span", {class: "ci"}, `[${fmt(f.primary_ci[0], 4)}, ${fmt(f.primary_ci[1], 4)}]`)),
            el("td", {class: f.delta_ci[0] > 0 ? "sig-up" : (f.delta_ci[1] < 0 ? "sig-down" : "")}, sgn(f.delta_vs_base, 4), el("span", {class: "ci"}, `[${sgn(f.delta_ci[0], 4)}, ${sgn(f.delta_ci[1], 4)}]`)),
            el("td", {}, fmt(f.win_rate_vs_base, 3)), el("td", {}, fmt(f.fm_loss, 4)), el("td", {}, fmt(f.diversity, 4)),
            el("td", {class: "name", style: `color:${ok ? "#16a34a" : "#dc2626"}`}, ok ? "✔ pass" : "✘ " + f.failed_guards.join("; ")));
        }))),
      (sel.notes || []).map(t => el("p", {class: "muted"}, t))));
    nav.push([id + "-sel", "Selection" + tag]);
  }
  main.append(card(id + "-win", "Win rates", el("div", {class: "controls"}, selectBox("reward", S.rewards, state.win, v => { state.win = v; winMatrix(S, win, v); })), win));
  main.append(card(id + "-dist", "Score distributions", el("div", {class: "controls"}, selectBox("reward", S.rewards, state.dist, v => { state.dist = v; distChart(S, dist, v); })), dist));
  main.append(card(id + "-grid", "Images: prompt × checkpoint", el("div", {class: "controls"},
    selectBox("badge", S.rewards, state.reward, v => { state.reward = v; imageGrid(S, grid, state); }),
    selectBox("sort", ["prompt order", "largest change"], state.sort, v => { state.sort = v; imageGrid(S, grid, state); }),
    el("input", {type: "text", placeholder: "filter prompts…", id: id + "-filter", oninput: e => { state.filter = e.target.value; imageGrid(S, grid, state); }})), grid));
  main.append(card(id + "-hack", "Reward hacking watch", hack));
  nav.push([id + "-win", "Win rates" + tag], [id + "-dist", "Distributions" + tag], [id + "-grid", "Images" + tag], [id + "-hack", "Hacking" + tag]);
  redraw(); winMatrix(S, win, state.win); distChart(S, dist, state.dist);
}

// ---- training curves --------------------------------------------------------------------------------
function lineChart(title, series) {
  const W = 300, H = 170, L = 44, B = 22, pts = series.flatMap(s => s.points);
  const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1; if (y1 === y0) { y1 += Math.abs(y0) * 0.05 + 1e-6; y0 -= Math.abs(y0) * 0.05 + 1e-6; }
  const X = v => L + (v - x0) / (x1 - x0) * (W - L - 8), Y = v => 8 + (1 - (v - y0) / (y1 - y0)) * (H - B - 8);
  const g = sv("svg", {width: W, height: H});
  [y0, (y0 + y1) / 2, y1].forEach(v => g.append(sv("line", {x1: L, x2: W - 8, y1: Y(v), y2: Y(v), stroke: "#eef0f3"}),
    sv("text", {x: L - 4, y: Y(v) + 3, "text-anchor": "end", "font-size": 9, fill: "#6b7280"}, Number(v.toPrecision(3)))));
  [x0, x1].forEach(v => g.append(sv("text", {x: X(v), y: H - 6, "text-anchor": "middle", "font-size": 9, fill: "#6b7280"}, v)));
  series.forEach(s => { g.append(sv("polyline", {points: s.points.map(p => `${X(p[0])},${Y(p[1])}`).join(" "), fill: "none", stroke: s.color, "stroke-width": 1.8}));
    if (s.points.length < 30) s.points.forEach(p => g.append(sv("circle", {cx: X(p[0]), cy: Y(p[1]), r: 2.2, fill: s.color}))); });
  return el("div", {class: "chart"}, el("div", {class: "title"}, title), g);
}
function renderRuns() {
  if (!D.runs.length) return;
  const keys = [...new Set(D.runs.flatMap(r => Object.keys(r.metrics)))].sort();
  const legend = el("div", {class: "legend"}, D.runs.map((r, i) => el("span", {}, el("i", {style: `background:${col(i)}`}), r.name)));
  const charts = el("div", {class: "charts"}, keys.map(k => lineChart(k, D.runs.map((r, i) => ({color: col(i), points: r.metrics[k] || []})).filter(s => s.points.length))));
  document.getElementById("main").append(card("curves", "Training curves", legend, charts));
  nav.push(["curves", "Curves"]);
}

// ---- preference datasets -----------------------------------------------------------------------------
function histogram(values, color) {
  const W = 420, H = 150, n = 20, v = values.filter(a => a !== null);
  let lo = Math.min(...v, 0), hi = Math.max(...v, 0); if (hi === lo) hi = lo + 1;
  const counts = new Array(n).fill(0); v.forEach(a => counts[Math.min(n - 1, Math.floor((a - lo) / (hi - lo) * n))]++);
  const top = Math.max(...counts, 1), bw = (W - 20) / n, g = sv("svg", {width: W, height: H});
  counts.forEach((c, i) => g.append(sv("rect", {x: 10 + i * bw + 1, y: H - 20 - c / top * (H - 30), width: bw - 2, height: c / top * (H - 30), fill: color, rx: 2})));
  const zx = 10 + (0 - lo) / (hi - lo) * (W - 20);
  g.append(sv("line", {x1: zx, x2: zx, y1: 4, y2: H - 20, stroke: "#111827", "stroke-dasharray": "3 3"}),
    sv("text", {x: 10, y: H - 6, "font-size": 10, fill: "#6b7280"}, fmt(lo, 3)), sv("text", {x: W - 10, y: H - 6, "font-size": 10, fill: "#6b7280", "text-anchor": "end"}, fmt(hi, 3)));
  return g;
}
function renderPrefs(P, k) {
  const id = `prefs${k}`, gap = el("div"), state = {r: P.primary};
  const drawGap = () => { gap.innerHTML = ""; gap.append(histogram(P.gaps[state.r], col(P.rewards.indexOf(state.r))),
    el("p", {class: "muted"}, `chosen − rejected ${state.r}; dashed line at 0: pairs left of it disagree with this reward.`)); };
  const agree = el("table", {class: "agree-table"}, el("tr", {}, el("th", {class: "name"}, "reward"), el("th", {}, "agrees with the chosen image")),
    P.rewards.map(r => el("tr", {}, el("td", {class: "name"}, r + (r === P.primary ? " (primary)" : "")),
      el("td", {style: `background:${heat(P.agreement[r], 0, 0.5, 1)}`}, fmt(P.agreement[r] === null ? null : 100 * P.agreement[r], 1) + "%"))));
  const pairs = el("div", {class: "pairs"}, P.pairs.map(p => el("div", {class: "pair"}, el("div", {}, p.prompt),
    el("div", {class: "imgs"}, ["chosen", "rejected"].map(s => el("div", {}, el("img", {src: p[s], alt: s}), el("div", {class: "lbl"}, s),
      el("div", {}, P.rewards.map(r => el("div", {}, `${r}: ${fmt(p[s + "_scores"][r], 3)}`)))))))));
  document.getElementById("main").append(card(id, `Preference pairs — ${P.name} (${P.num_pairs} pairs)`,
    el("h3", {}, "Agreement between rewards"), agree,
    el("h3", {}, "Score gap"), el("div", {class: "controls"}, selectBox("reward", P.rewards, state.r, v => { state.r = v; drawGap(); })), gap,
    el("h3", {}, `First ${P.pairs.length} pairs`), pairs));
  nav.push([id, "Pairs"]); drawGap();
}

document.getElementById("main").innerHTML = "";
D.evals.forEach(renderEval); renderRuns(); D.prefs.forEach(renderPrefs);
document.getElementById("nav").append(...nav.map(([id, t]) => el("a", {href: "#" + id}, t)));
document.body.setAttribute("data-ready", "1");
