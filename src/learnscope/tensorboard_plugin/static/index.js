// The learnscope tab of TensorBoard: a plain ES module (no build step, no library, no
// network beyond this TensorBoard). TensorBoard loads it in an iframe whose <base> is
// /data/plugin/learnscope/, so "./lca?run=…" reaches this plugin's routes.
// Raw values throughout: nothing is smoothed.

const SVG = "http://www.w3.org/2000/svg";
// 12 colours told apart easily (Tableau 10 + 2), then cycled with a dash pattern
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948",
  "#b07aa1", "#ff9da7", "#9c755f", "#7f7f7f", "#17becf", "#bcbd22"];
const PART_COLOURS = { gradient: "#4e79a7", momentum: "#f28e2b", weight_decay: "#59a14f", residual: "#b07aa1" };
const MAX_LINES = 12;
const NFA_ROWS = 24; // NFA rows are tall: the first 24 matching layers, then a button
const state = { runs: [], selected: [], filter: "", sort: "total", views: new Map(), allNfa: false };

export async function render() {
  const style = document.createElement("link");
  style.rel = "stylesheet";
  style.href = "./style.css";
  document.head.append(style);
  document.body.replaceChildren(el("div", { class: "tooltip", id: "tooltip" }));
  const header = el("header");
  const main = el("main");
  document.body.append(header, main);
  try {
    state.runs = (await getJSON("./runs")).runs;
  } catch (error) {
    main.append(el("p", { class: "empty" }, `Could not read the runs: ${error.message}`));
    return;
  }
  if (!state.runs.length) {
    main.append(el("p", { class: "empty" },
      "No learnscope tags in this log directory (LossChangeAllocation writes lca/…, NeuralFeatureAnsatz nfa/…)."));
    document.body.dataset.ready = "1";
    return;
  }
  state.selected = state.runs.slice(0, 2).map((r) => r.name);
  buildHeader(header, main);
  await refresh(main);
}

// ---------- helpers ----------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  node.append(...children);
  return node;
}

function svgEl(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
  return response.json();
}

function query(route, params) {
  return `./${route}?` + new URLSearchParams(params).toString();
}

function fmt(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  if (value === 0) return "0";
  const magnitude = Math.abs(value);
  return magnitude >= 1e4 || magnitude < 1e-3 ? value.toExponential(digits - 1) : value.toPrecision(digits);
}

function percent(value) {
  return value === null || value === undefined ? "–" : `${(100 * value).toFixed(1)} %`;
}

function colourOf(index) {
  return PALETTE[index % PALETTE.length];
}

function dashOf(index) {
  return index < PALETTE.length ? "" : "5 3";
}

// diverging RdBu scale: −1 (helped) blue, 0 white, +1 (hurt) red
const RDBU = [[33, 102, 172], [103, 169, 207], [247, 247, 247], [239, 138, 98], [178, 24, 43]];
function diverging(t) {
  if (t === null || Number.isNaN(t)) return [230, 230, 230];
  const x = (Math.max(-1, Math.min(1, t)) + 1) * 2;
  const i = Math.min(3, Math.floor(x));
  const f = x - i;
  return RDBU[i].map((c, k) => Math.round(c + f * (RDBU[i + 1][k] - c)));
}

// the 99th percentile of |v|: one early step must not wash out the rest of the run
function robustMax(rows) {
  const all = rows.flat().filter((v) => v !== null).map(Math.abs).sort((a, b) => a - b);
  if (!all.length) return 1;
  return all[Math.min(all.length - 1, Math.floor(0.99 * all.length))] || all[all.length - 1] || 1;
}

function showTip(event, text) {
  const tip = document.getElementById("tooltip");
  tip.textContent = text;
  tip.style.display = "block";
  tip.style.left = `${Math.min(event.clientX + 12, window.innerWidth - 300)}px`;
  tip.style.top = `${event.clientY + 12}px`;
}

function hideTip() {
  document.getElementById("tooltip").style.display = "none";
}

function matcher() {
  const text = state.filter.trim();
  if (!text) return () => true;
  try {
    const pattern = new RegExp(text, "i");
    return (name) => pattern.test(name);
  } catch {
    const lower = text.toLowerCase();
    return (name) => name.toLowerCase().includes(lower);
  }
}

const byName = (a, b) => a.name.localeCompare(b.name, undefined, { numeric: true });
function sortLayers(layers) {
  const copy = [...layers];
  if (state.sort === "name") return copy.sort(byName);
  if (state.sort === "abs") return copy.sort((a, b) => Math.abs(b.total ?? 0) - Math.abs(a.total ?? 0));
  return copy.sort((a, b) => (a.total ?? Infinity) - (b.total ?? Infinity)); // most helped first
}

// windowSteps > 1: each point written is a logging window's sum, written at its last step
function stepRange(columns, i, windowSteps = 1) {
  const first = columns.first[i];
  const last = columns.last[i];
  if (windowSteps > 1) return first === last ? `window ending at step ${first}` : `windows ending at steps ${first}–${last}`;
  return first === last ? `step ${first}` : `steps ${first}–${last}`;
}

// ---------- header: runs, filter, sort ----------

function buildHeader(header, main) {
  const picker = el("span", { class: "runs-picker" }, el("label", {}, "Runs: "));
  for (const run of state.runs) {
    const box = el("input", { type: "checkbox", value: run.name });
    box.checked = state.selected.includes(run.name);
    box.addEventListener("change", () => {
      state.selected = [...picker.querySelectorAll("input:checked")].map((b) => b.value);
      refresh(main);
    });
    picker.append(el("label", {}, box, run.name));
  }
  const filter = el("input", { type: "text", id: "ls-filter", placeholder: "layer name or regex, e.g. h\\.1[0-9]\\.mlp" });
  filter.addEventListener("input", () => { state.filter = filter.value; draw(main); });
  const sort = el("select", { id: "ls-sort" });
  for (const [value, label] of [["total", "cumulative LCA (most helped first)"], ["abs", "|cumulative LCA| (largest first)"],
    ["name", "name"]]) sort.append(el("option", { value }, label));
  sort.addEventListener("change", () => { state.sort = sort.value; draw(main); });
  header.append(el("h1", {}, "learnscope"), picker, el("label", {}, "Filter ", filter), el("label", {}, "Sort by ", sort));
}

async function refresh(main) {
  document.body.dataset.ready = "0";
  await Promise.all(state.selected.filter((run) => !state.views.has(run)).map(async (run) => {
    const info = state.runs.find((r) => r.name === run);
    const [lca, nfa] = await Promise.all([
      info.lca.length ? getJSON(query("lca", { run: info.run, root: info.root })) : null,
      info.nfa.length ? getJSON(query("nfa", { run: info.run, root: info.root })) : null,
    ]);
    state.views.set(run, { info, lca, nfa, unitLayer: info.units[0] ?? null });
  }));
  draw(main);
}

function draw(main) {
  const grid = el("div", { class: "runs" });
  grid.style.setProperty("--runs", String(Math.max(1, state.selected.length)));
  main.replaceChildren(
    el("p", { class: "note" },
      "Raw values, no smoothing. LCA step s is the update θ_s → θ_{s+1} (negative = the layer lowered the loss = helped); " +
      "NFA step s is the weights after s updates. Click a layer's row for its per-unit allocations (when logged)."),
    grid);
  for (const run of state.selected) grid.append(drawRun(run, state.views.get(run)));
  document.body.dataset.ready = "1";
}

function drawRun(run, view) {
  const section = el("section", { class: "run", "data-run": run }, el("h2", {}, run));
  if (view.lca) section.append(...drawLca(view));
  if (view.nfa) section.append(...drawNfa(view.info, view.nfa));
  return section;
}

// ---------- LCA ----------

function banner(health, layers) {
  const titles = { ok: "LCA numbers check out", bad: "Do not trust these LCA numbers", unchecked: "LCA not checked" };
  const box = el("div", { class: `banner ${health.status}`, "data-status": health.status }, el("strong", {}, titles[health.status]));
  const v = health.values;
  const facts = [];
  if (v.cumulative_relative_error !== undefined) {
    const error = v.cumulative_relative_error;
    facts.push(`cumulative relative error ${error === null ? "–" : fmt(100 * error, 2)} % (≤ 1 % expected)`);
  }
  if (v.capped_steps !== undefined) facts.push(`capped steps ${fmt(v.capped_steps)}`);
  if (v.skipped_steps !== undefined) facts.push(`skipped steps ${fmt(v.skipped_steps)}`);
  facts.push(`cumulative LCA of all ${layers.length} layers ${fmt(layers.reduce((sum, l) => sum + (l.total ?? 0), 0))}`);
  box.append(": " + facts.join(" · "));
  const items = [...health.reasons, ...health.notes];
  if (items.length) box.append(el("ul", {}, ...items.map((text) => el("li", {}, text))));
  return box;
}

function drawLca(view) {
  const data = view.lca;
  const keep = matcher();
  const layers = sortLayers(data.layers.filter((l) => keep(l.name)));
  const columns = data.columns;
  const n = columns.first.length;
  const scale = robustMax(layers.map((l) => l.per_step));
  const partScale = Math.max(1e-30, ...layers.map((l) => Object.values(l.parts).reduce((s, v) => s + Math.abs(v ?? 0), 0)));
  const w = data.window_steps ?? 1;
  const note = columns.downsampled
    ? `${n} columns over steps ${columns.first[0]}–${columns.last[n - 1]}: each column is the SUM of the allocations of its points ` +
      `${w > 1 ? `(each point a logging window of ${w} measured steps, summed) ` : ""}(cumulative: value at the column's last step; helped fraction: mean).`
    : w > 1
      ? `${n} columns, one column per logging window of ${w} measured steps (window sums; a window cut short by a ` +
        `checkpoint or the end of the fit holds fewer; each column at its window's last step, ` +
        `steps ${columns.first[0] ?? "–"}–${columns.last[n - 1] ?? "–"}).`
      : `${n} measured steps, one column per step (steps ${columns.first[0] ?? "–"}–${columns.last[n - 1] ?? "–"}).`;
  const table = el("table", { class: "layers lca" });
  const head = el("tr", {}, el("th", {}, "layer"), el("th", {}, "cumulative LCA"), el("th", {}, "helped (mean)"),
    el("th", {}, "parts (cumulative)"), el("th", {}, w > 1 ? `LCA per logging window (sum over its steps)` : `LCA per step (step s: θ_s → θ_{s+1})`));
  table.append(el("thead", {}, head));
  const body = el("tbody");
  for (const layer of layers) body.append(lcaRow(layer, columns, scale, partScale, view));
  table.append(body);
  const axis = el("div", { class: "axis" }, el("span", {}, `step ${columns.first[0] ?? ""}`),
    el("span", {}, `step ${columns.last[n - 1] ?? ""}`));
  const out = [
    banner(data.health, data.layers),
    el("h3", {}, `Loss Change Allocation: ${layers.length} of ${data.layers.length} layers`),
    el("p", { class: "note" }, note),
    scaleLegend(scale, `${w > 1 ? "per-window" : "per-step"} LCA (loss): blue = helped (lowered the loss), red = hurt; colours clipped at the 99th percentile ±`),
    partsLegend(data.parts),
    table,
    axis,
  ];
  out.push(...drawCumulative(layers, columns));
  if (view.info.units.length) out.push(drawUnitsSection(view));
  return out;
}

function lcaRow(layer, columns, scale, partScale, view) {
  const row = el("tr", { class: "ls-lca-row", "data-layer": layer.name, "data-total": String(layer.total) });
  if (view.unitLayer === layer.name) row.classList.add("selected");
  const canvas = el("canvas", { class: "heat", width: String(Math.max(1, layer.per_step.length)), height: "1" });
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(Math.max(1, layer.per_step.length), 1);
  layer.per_step.forEach((v, i) => {
    const [r, g, b] = diverging(v === null ? null : v / scale);
    image.data.set([r, g, b, 255], 4 * i);
  });
  ctx.putImageData(image, 0, 0);
  canvas.addEventListener("mousemove", (event) => {
    const i = Math.min(layer.per_step.length - 1, Math.floor(event.offsetX / canvas.clientWidth * layer.per_step.length));
    showTip(event, `${layer.name}, ${stepRange(columns, i, view.lca.window_steps)}\nLCA ${fmt(layer.per_step[i])}  cumulative ${fmt(layer.cumulative[i])}` +
      `\nhelped fraction ${percent(layer.helped[i])}`);
  });
  canvas.addEventListener("mouseleave", hideTip);
  const parts = partsBar(layer.parts, partScale);
  row.append(el("td", { class: "name", title: layer.name }, layer.name), el("td", { class: "num total" }, fmt(layer.total)),
    el("td", { class: "num" }, percent(layer.helped_mean)), el("td", {}, parts), el("td", { class: "heat" }, canvas));
  if (view.info.units.includes(layer.name)) {
    row.addEventListener("click", () => { view.unitLayer = layer.name; draw(document.querySelector("main")); });
  }
  return row;
}

function partsBar(parts, scale) {
  const width = 140;
  const svg = svgEl("svg", { width, height: 12, viewBox: `0 0 ${width} 12` });
  svg.append(svgEl("line", { x1: width / 2, x2: width / 2, y1: 0, y2: 12, stroke: "#9aa0a6" }));
  let neg = width / 2;
  let pos = width / 2;
  const lines = [];
  const order = [...Object.keys(PART_COLOURS), ...Object.keys(parts).filter((p) => !(p in PART_COLOURS))];
  for (const part of order) {
    const value = parts[part];
    if (value === null || value === undefined) continue;
    const w = Math.abs(value) / scale * (width / 2);
    const x = value < 0 ? (neg -= w) : pos;
    if (value >= 0) pos += w;
    svg.append(svgEl("rect", { x, y: 1, width: Math.max(0.5, w), height: 10, fill: PART_COLOURS[part] ?? "#999" }));
    lines.push(`${part} ${fmt(value)}`);
  }
  const title = svgEl("title");
  title.textContent = lines.length ? lines.join("\n") : "no parts logged (decompose=True writes them)";
  svg.append(title);
  return svg;
}

function partsLegend(parts) {
  if (!parts.length) return el("span");
  return el("div", { class: "legend" }, el("span", {}, "parts, stacked left of the centre line = helped:"),
    ...parts.map((p) => el("span", { class: "item" }, swatch(PART_COLOURS[p] ?? "#999"), p)));
}

function swatch(colour) {
  const box = el("span", { class: "swatch" });
  box.style.background = colour;
  return box;
}

function scaleLegend(scale, label) {
  const canvas = el("canvas", { width: "220", height: "1" });
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(220, 1);
  for (let i = 0; i < 220; i++) image.data.set([...diverging(i / 109.5 - 1), 255], 4 * i);
  ctx.putImageData(image, 0, 0);
  return el("div", { class: "scale" }, el("span", {}, `${label}${fmt(scale, 3)}`),
    el("span", {}, fmt(-scale, 3)), canvas, el("span", {}, `+${fmt(scale, 3)}`));
}

function drawCumulative(layers, columns) {
  const shown = [...layers].sort((a, b) => Math.abs(b.total ?? 0) - Math.abs(a.total ?? 0)).slice(0, MAX_LINES);
  const title = el("h4", {}, `Cumulative LCA per layer (${shown.length} of ${layers.length}: the largest |total|; filter to choose)`);
  const series = shown.map((layer, i) => ({ name: layer.name, values: layer.cumulative, colour: colourOf(i), dash: dashOf(i) }));
  const chart = lineChart(series, columns.last, { xLabel: "LCA step (after the update θ_s → θ_{s+1})", yLabel: "cumulative LCA (loss)" });
  const legend = el("div", { class: "legend" }, ...series.map((s, i) =>
    el("span", { class: "item" }, swatch(s.colour), `${s.name} ${fmt(shown[i].total)}`)));
  return [title, chart, legend];
}

// a line chart with axes and a hover read-out of every series at the nearest step
function lineChart(series, steps, { xLabel, yLabel, width = 640, height = 220 }) {
  const pad = { left: 62, right: 12, top: 8, bottom: 34 };
  const values = series.flatMap((s) => s.values).filter((v) => v !== null);
  let [lo, hi] = values.length ? [Math.min(0, ...values), Math.max(0, ...values)] : [0, 1];
  if (hi === lo) hi = lo + 1;
  const x0 = steps[0] ?? 0;
  const x1 = steps[steps.length - 1] ?? 1;
  const sx = (s) => pad.left + (x1 === x0 ? 0.5 : (s - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const sy = (v) => pad.top + (hi - v) / (hi - lo) * (height - pad.top - pad.bottom);
  const svg = svgEl("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "xMinYMin meet" });
  axes(svg, { lo, hi, x0, x1, sx, sy, width, height, pad, xLabel, yLabel });
  for (const s of series) {
    const d = s.values.map((v, i) => (v === null ? null : `${sx(steps[i]).toFixed(1)},${sy(v).toFixed(1)}`)).filter(Boolean);
    if (d.length) svg.append(svgEl("polyline", { points: d.join(" "), fill: "none", stroke: s.colour, "stroke-width": 1.6, "stroke-dasharray": s.dash }));
  }
  const cursor = svgEl("line", { y1: pad.top, y2: height - pad.bottom, stroke: "#9aa0a6", visibility: "hidden" });
  svg.append(cursor);
  svg.addEventListener("mousemove", (event) => {
    const box = svg.getBoundingClientRect();
    const x = (event.clientX - box.left) / box.width * width;
    let best = 0;
    steps.forEach((s, i) => { if (Math.abs(sx(s) - x) < Math.abs(sx(steps[best]) - x)) best = i; });
    cursor.setAttribute("x1", sx(steps[best]));
    cursor.setAttribute("x2", sx(steps[best]));
    cursor.setAttribute("visibility", "visible");
    showTip(event, `step ${steps[best]}\n` + series.map((s) => `${s.name}: ${fmt(s.values[best])}`).join("\n"));
  });
  svg.addEventListener("mouseleave", () => { cursor.setAttribute("visibility", "hidden"); hideTip(); });
  return svg;
}

function axes(svg, { lo, hi, x0, x1, sx, sy, width, height, pad, xLabel, yLabel }) {
  const bottom = height - pad.bottom;
  svg.append(svgEl("line", { x1: pad.left, x2: width - pad.right, y1: bottom, y2: bottom, stroke: "#bdc1c6" }));
  svg.append(svgEl("line", { x1: pad.left, x2: pad.left, y1: pad.top, y2: bottom, stroke: "#bdc1c6" }));
  if (lo < 0 && hi > 0) svg.append(svgEl("line", { x1: pad.left, x2: width - pad.right, y1: sy(0), y2: sy(0), stroke: "#e0e0e0" }));
  for (const v of [lo, (lo + hi) / 2, hi]) {
    const t = svgEl("text", { x: pad.left - 4, y: sy(v) + 4, "text-anchor": "end" });
    t.textContent = fmt(v, 3);
    svg.append(t);
  }
  for (const s of x0 === x1 ? [x0] : [x0, Math.round((x0 + x1) / 2), x1]) {
    const t = svgEl("text", { x: sx(s), y: bottom + 13, "text-anchor": "middle" });
    t.textContent = String(s);
    svg.append(t);
  }
  const xl = svgEl("text", { x: (pad.left + width - pad.right) / 2, y: height - 4, "text-anchor": "middle" });
  xl.textContent = xLabel;
  const yl = svgEl("text", { x: 10, y: pad.top + (bottom - pad.top) / 2, "text-anchor": "middle",
    transform: `rotate(-90 10 ${pad.top + (bottom - pad.top) / 2})` });
  yl.textContent = yLabel;
  svg.append(xl, yl);
}

// ---------- per-unit allocations ----------

function drawUnitsSection(view) {
  const box = el("div", { class: "units-section" });
  const select = el("select", { class: "ls-unit-layer" }, ...view.info.units.map((m) => el("option", { value: m }, m)));
  select.value = view.unitLayer;
  select.addEventListener("change", () => { view.unitLayer = select.value; draw(document.querySelector("main")); });
  box.append(el("h4", {}, "Per-unit allocation (unit × point written) of ", select));
  const holder = el("div", {}, el("p", { class: "empty" }, "loading…"));
  box.append(holder);
  const key = `units:${view.unitLayer}`;
  const ready = view[key] ?? (view[key] = getJSON(query("units", { run: view.info.run, root: view.info.root, layer: view.unitLayer })));
  ready.then((data) => holder.replaceChildren(...unitHeatmap(data))).catch((error) => holder.replaceChildren(el("p", { class: "empty" }, error.message)));
  return box;
}

function unitHeatmap(data) {
  const rows = data.values;
  const n = data.columns.first.length;
  const scale = robustMax(rows);
  const canvas = el("canvas", { class: "units", width: String(Math.max(1, n)), height: String(Math.max(1, rows.length)) });
  canvas.style.height = `${Math.min(400, Math.max(60, 3 * rows.length))}px`;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(Math.max(1, n), Math.max(1, rows.length));
  rows.forEach((row, u) => row.forEach((v, i) => image.data.set([...diverging(v === null ? null : v / scale), 255], 4 * (u * n + i))));
  ctx.putImageData(image, 0, 0);
  canvas.addEventListener("mousemove", (event) => {
    const i = Math.min(n - 1, Math.floor(event.offsetX / canvas.clientWidth * n));
    const u = Math.min(rows.length - 1, Math.floor(event.offsetY / canvas.clientHeight * rows.length));
    const units = data.units_per_row > 1 ? `units ${u * data.units_per_row}–${(u + 1) * data.units_per_row - 1}` : `unit ${u}`;
    showTip(event, `${units}, ${stepRange(data.columns, i)}: LCA ${fmt(rows[u][i])}`);
  });
  canvas.addEventListener("mouseleave", hideTip);
  const what = data.units_per_row > 1 ? `${rows.length} rows of ${data.units_per_row} adjacent units (summed)` : `${data.units} units (rows, unit 0 on top)`;
  return [
    el("p", { class: "note" }, `${what} × ${n} columns${data.columns.downsampled ? " (each the sum of its steps)" : ""}; ` +
      `${data.steps_read} points read (one per step or logging window as written): TensorBoard keeps a sample of a tensor series' steps unless started with ` +
      "--samples_per_plugin learnscope=0."),
    scaleLegend(scale, "per-unit LCA (loss), clipped at ±"),
    canvas,
    el("div", { class: "axis" }, el("span", {}, `step ${data.columns.first[0] ?? ""}`), el("span", {}, `step ${data.columns.last[n - 1] ?? ""}`)),
  ];
}

// ---------- NFA ----------

function drawNfa(info, data) {
  const keep = matcher();
  const layers = data.layers.filter((l) => keep(l.name)).sort(byName);
  const alphas = [...new Set(data.layers.flatMap((l) => Object.keys(l.series)).filter((m) => m.startsWith("pearson_a")).map((m) => m.slice(9)))]
    .sort((a, b) => Number(b) - Number(a));
  const table = el("table", { class: "layers nfa" });
  table.append(el("thead", {}, el("tr", {}, el("th", {}, "layer"),
    ...alphas.map((a) => el("th", {}, `Pearson(WᵀW, AGOP^${a}) vs rotation null ±1.96·SE`)),
    ...alphas.map((a) => el("th", {}, `excess α=${a} (last)`)), el("th", {}, "matrices"))));
  const body = el("tbody");
  const shown = state.allNfa ? layers : layers.slice(0, NFA_ROWS);
  for (const layer of shown) body.append(nfaRow(info, layer, alphas));
  table.append(body);
  const more = el("button", { class: "more" }, `show all ${layers.length} layers`);
  more.addEventListener("click", () => { state.allNfa = true; draw(document.querySelector("main")); });
  return [
    el("h3", {}, `Neural Feature Ansatz: ${shown.length} of ${data.layers.length} layers` +
      (shown.length < layers.length ? ` shown (${layers.length} match the filter)` : "")),
    el("p", { class: "note" }, "Dark line: Pearson correlation of WᵀW with AGOP^α; grey: the same with G randomly rotated " +
      "(the alignment a G of the same spectrum gets for free), bars ±1.96·SE over the draws. Excess = Pearson − null. " +
      "x axis: NFA step s = the weights after s updates."),
    table,
    shown.length < layers.length ? more : el("span"),
  ];
}

function nfaRow(info, layer, alphas) {
  const row = el("tr", { class: "ls-nfa-row", "data-layer": layer.name }, el("td", { class: "name", title: layer.name }, layer.name));
  for (const a of alphas) row.append(el("td", {}, nfaChart(layer.series, a)));
  for (const a of alphas) {
    const excess = layer.series[`excess_a${a}`];
    const se = layer.series[`null_se_a${a}`];
    const last = excess ? excess.values[excess.values.length - 1] : null;
    const spread = se ? ` ± ${fmt(1.96 * se.values[se.values.length - 1], 2)}` : "";
    row.append(el("td", { class: "num", "data-alpha": a }, last === null ? "–" : `${fmt(last, 3)}${spread}`));
  }
  row.append(el("td", { class: "nfa-image" }, layer.image_steps.length ? imagePicker(info, layer) : el("span", { class: "empty" }, "none")));
  return row;
}

function nfaChart(series, alpha) {
  const pearson = series[`pearson_a${alpha}`];
  if (!pearson) return el("span", { class: "empty" }, "not logged");
  const nul = series[`null_a${alpha}`];
  const se = series[`null_se_a${alpha}`];
  const width = 230;
  const height = 92;
  const pad = { left: 40, right: 18, top: 6, bottom: 30 };
  const band = (nul?.values ?? []).map((v, i) => [v, 1.96 * (se?.values[i] ?? 0)]);
  const all = [...pearson.values, ...band.flatMap(([v, h]) => (v === null ? [] : [v - h, v + h]))].filter((v) => v !== null);
  let [lo, hi] = [Math.min(...all), Math.max(...all)];
  if (hi - lo < 1e-6) [lo, hi] = [lo - 0.05, hi + 0.05];
  const steps = pearson.steps;
  const [x0, x1] = [steps[0], steps[steps.length - 1]];
  const sx = (s) => pad.left + (x1 === x0 ? 0.5 : (s - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const sy = (v) => pad.top + (hi - v) / (hi - lo) * (height - pad.top - pad.bottom);
  const svg = svgEl("svg", { width, height, viewBox: `0 0 ${width} ${height}` });
  axes(svg, { lo, hi, x0, x1, sx, sy, width, height, pad, xLabel: "weights after s updates", yLabel: "" });
  if (nul) {
    nul.values.forEach((v, i) => {
      if (v === null) return;
      const h = band[i][1];
      svg.append(svgEl("line", { x1: sx(nul.steps[i]), x2: sx(nul.steps[i]), y1: sy(v - h), y2: sy(v + h), stroke: "#9aa0a6", "stroke-width": 2 }));
    });
    svg.append(polyline(nul, sx, sy, "#9aa0a6", "3 2"));
  }
  svg.append(polyline(pearson, sx, sy, "#202124", ""));
  const title = svgEl("title");
  title.textContent = steps.map((s, i) => `step ${s}: pearson ${fmt(pearson.values[i], 3)}` +
    (nul ? `, null ${fmt(nul.values[nul.steps.indexOf(s)], 3)}` : "")).join("\n");
  svg.append(title);
  return svg;
}

function polyline(series, sx, sy, colour, dash) {
  const points = series.values.map((v, i) => (v === null ? null : `${sx(series.steps[i]).toFixed(1)},${sy(v).toFixed(1)}`)).filter(Boolean);
  const line = svgEl("polyline", { points: points.join(" "), fill: "none", stroke: colour, "stroke-width": 1.6, "stroke-dasharray": dash });
  if (points.length === 1) {
    const [x, y] = points[0].split(",");
    return svgEl("circle", { cx: x, cy: y, r: 2.5, fill: colour });
  }
  return line;
}

function imagePicker(info, layer) {
  const steps = layer.image_steps;
  const select = el("select", {}, ...steps.map((s) => el("option", { value: String(s) }, `weights after ${s} updates`)));
  select.value = String(steps[steps.length - 1]);
  const img = el("img", { alt: `${layer.name} matrices`, loading: "lazy" });
  const caption = el("figcaption");
  const show = () => {
    img.src = query("image", { run: info.run, root: info.root, layer: layer.name, step: select.value });
    caption.textContent = `${layer.name} matrices at step ${select.value}: WᵀW, then AGOP^α for each α (panels as logged)`;
  };
  select.addEventListener("change", show);
  show();
  return el("figure", {}, select, img, caption);
}
