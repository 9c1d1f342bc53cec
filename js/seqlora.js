// SeqLoRA front-end: a panel on the bank nodes (concepts, capacity bars, orthogonality; on Basis Bank
// Info the interference heat map; on Train Concept the forecast) and a live
// loss curve on "Train Concept (SeqLoRA)". The server sends what is drawn: the bank nodes' UI output
// carries `seqlora_bank` (nodes/operations.py: panel_data); training broadcasts `seqlora.progress` and,
// when done, `seqlora.bank`.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PANEL_NODES = new Set([
  "SeqLoRATrainConcept", "SeqLoRALoadBasisBank", "SeqLoRASaveBasisBank", "SeqLoRABasisBankInfo",
  "SeqLoRAMergeBasisBanks",
]);

function el(tag, style = {}, text = "") {
  const e = document.createElement(tag);
  Object.assign(e.style, style);
  if (text) e.textContent = text;
  return e;
}

// The node a server message is about. Inside a subgraph ComfyUI's execution id is a path of node
// ids ("12:5": node 5 inside the subgraph node 12), so walk down from the root graph.
function nodeFor(id) {
  if (id == null) return null;
  let graph = app.graph, node = null;
  for (const part of String(id).split(":")) {
    node = graph?.getNodeById(Number(part)) ?? null;
    if (!node) return null;
    graph = node.subgraph;
  }
  return node;
}

function renderBank(panel, data) {
  const box = panel.querySelector(".seqlora-bank");
  box.replaceChildren();
  const orth = Number(data.orthogonality || 0).toExponential(1);
  if (data.file) {
    const file = el("div", { fontWeight: "bold", color: "#8cf" }, `file: ${data.file}`);
    file.className = "seqlora-file";
    box.append(file);
  }
  box.append(el("div", { fontWeight: "bold", marginBottom: "4px" },
    `${data.concepts.length} concept(s) · orthogonality error ${orth}`));
  if (data.fingerprint) box.append(el("div", { opacity: 0.7 }, `base fingerprint ${data.fingerprint}`));
  for (const c of data.concepts) {
    const row = el("div", { display: "flex", justifyContent: "space-between", gap: "8px" });
    row.className = "seqlora-concept";
    const loss = c.loss == null ? "" : ` · loss ${Number(c.loss).toFixed(4)}`;
    row.append(el("span", {}, c.token), el("span", { opacity: 0.7 }, `${c.method} · r${c.rank}${loss}`));
    box.append(row);
  }
  for (const w of data.widths) {
    const label = el("div", { marginTop: "4px", opacity: 0.8 },
      `${w.layers} layer(s) of width ${w.width}: ${w.used} / ${w.capacity} concepts`);
    const bar = el("div", { height: "6px", background: "#333", borderRadius: "3px", overflow: "hidden" });
    bar.className = "seqlora-capacity";
    const fill = el("div", {
      height: "100%", width: `${Math.min(100, (100 * w.used) / Math.max(1, w.capacity))}%`,
      background: w.used >= w.capacity ? "#c44" : "#4a8",
    });
    bar.append(fill);
    box.append(label, bar);
    if (w.leased_width) {
      box.append(el("div", { opacity: 0.7 }, `… ${w.leased_width} input dimensions leased out`));
    }
  }
  for (const l of data.leases || []) {
    const row = el("div", { opacity: l.returned ? 0.6 : 0.9 },
      `lease ${l.name}: ${l.used} / ${l.concepts} concepts of rank ${l.rank}, ${l.returned ? "returned" : "out"}`);
    row.className = "seqlora-lease";
    box.append(row);
  }
  if (data.interference) renderInterference(box, data.interference);
  if (data.report) renderReport(panel, data.report);
}

// ---- interference (issue 12): the bank's matrix as a small heat map on Basis Bank Info
// (nodes/operations.py: interference_info) and the forecast text of Train Concept
// (`seqlora.forecast` before training, `report` in `seqlora.bank` after).
function heatColor(v, max) {
  if (v == null) return "#333";
  const t = Math.sqrt(Math.max(0, v) / (max || 1)); // sqrt: small entries stay visible next to the worst
  const g = Math.round(255 * (1 - t));
  return `rgb(255,${g},${g})`;
}

function renderInterference(box, d) {
  const n = d.tokens.length;
  const values = d.matrix.flat().filter((v) => v != null);
  const max = values.length ? Math.max(...values) : 0;
  box.append(el("div", { marginTop: "6px", fontWeight: "bold" },
    "interference (row: affected, column: added)"));
  if (!values.length) {
    box.append(el("div", { opacity: 0.7 }, n < 2 ? "one concept: nothing to compare yet"
      : "no activation statistics stored: nothing to draw"));
    return;
  }
  const label = 56, cell = Math.max(6, Math.min(24, Math.floor(160 / Math.max(1, n))));
  const canvas = el("canvas", { display: "block" });
  canvas.className = "seqlora-interference";
  canvas.width = label + n * cell;
  canvas.height = label / 2 + n * cell;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#1e1e1e";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.font = "9px sans-serif";
  ctx.fillStyle = "#ccc";
  d.tokens.forEach((t, i) => {
    ctx.fillText(t.slice(0, 9), 2, label / 2 + i * cell + cell / 2 + 3); // row labels
    ctx.save();
    ctx.translate(label + i * cell + cell / 2 + 3, label / 2 - 2);
    ctx.rotate(-Math.PI / 4);
    ctx.fillText(t.slice(0, 6), 0, 0); // column labels
    ctx.restore();
  });
  d.matrix.forEach((row, i) => row.forEach((v, j) => {
    ctx.fillStyle = i === j ? "#555" : heatColor(v, max);
    ctx.fillRect(label + j * cell, label / 2 + i * cell, cell - 1, cell - 1);
  }));
  // the value under the pointer, as the canvas's tooltip
  canvas.addEventListener("mousemove", (ev) => {
    const r = canvas.getBoundingClientRect();
    const x = ((ev.clientX - r.left) / r.width) * canvas.width, y = ((ev.clientY - r.top) / r.height) * canvas.height;
    const i = Math.floor((y - label / 2) / cell), j = Math.floor((x - label) / cell);
    const v = d.matrix[i]?.[j];
    canvas.title = v == null ? "" : `${d.tokens[j]} on ${d.tokens[i]}: ${Number(v).toPrecision(3)} × its own residual energy`;
  });
  box.append(canvas);
  for (const w of d.worst_layers || []) {
    const row = el("div", { opacity: 0.85 },
      `${w.layer}: ${Number(w.share).toPrecision(3)} (${w.added} on ${w.affected})`);
    row.className = "seqlora-worst-layer";
    box.append(row);
  }
  if (d.missing_stats?.length) box.append(el("div", { opacity: 0.7 }, `no statistics: ${d.missing_stats.join(", ")}`));
  if (d.note) box.append(el("div", { opacity: 0.7, fontStyle: "italic" }, d.note));
}

function renderReport(panel, text) {
  let pre = panel.querySelector(".seqlora-report");
  if (!pre) {
    pre = el("pre", { whiteSpace: "pre-wrap", margin: "4px 0 0", fontSize: "10px", opacity: 0.9 });
    pre.className = "seqlora-report";
    panel.append(pre);
  }
  pre.textContent = text;
}

function renderLoss(panel, losses, step, total) {
  const canvas = panel.querySelector("canvas");
  if (!canvas) return;
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = "#1e1e1e";
  ctx.fillRect(0, 0, width, height);
  if (losses.length > 1) {
    const lo = Math.min(...losses), hi = Math.max(...losses), span = hi - lo || 1;
    ctx.strokeStyle = "#6af";
    ctx.beginPath();
    losses.forEach((v, i) => {
      const x = (i / Math.max(1, total - 1)) * (width - 4) + 2;
      const y = height - 4 - ((v - lo) / span) * (height - 8);
      i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
    });
    ctx.stroke();
  }
  const status = panel.querySelector(".seqlora-status");
  status.textContent = `step ${step} / ${total} · loss ${losses.length ? losses[losses.length - 1].toFixed(4) : "-"}`;
  status.dataset.state = "running";
}

function makePanel(withCurve) {
  const panel = el("div", { fontSize: "11px", color: "#ddd", padding: "4px", overflowY: "auto" });
  panel.className = "seqlora-panel";
  if (withCurve) {
    const canvas = el("canvas", { width: "100%", height: "60px" });
    canvas.width = 240;
    canvas.height = 60;
    panel.append(el("div", {}, ""), canvas);
    panel.firstChild.className = "seqlora-status";
    panel.firstChild.textContent = "not trained yet";
  }
  const bank = el("div", { marginTop: "4px" }, "no bank yet");
  bank.className = "seqlora-bank";
  panel.append(bank);
  return panel;
}

app.registerExtension({
  name: "SeqLoRA.BankPanel",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!PANEL_NODES.has(nodeData.name)) return;
    const isTrain = nodeData.name === "SeqLoRATrainConcept";
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.seqloraPanel = makePanel(isTrain);
      this.seqloraLosses = [];
      this.addDOMWidget("seqlora_panel", "seqlora", this.seqloraPanel, {
        serialize: false,
        getMinHeight: () => (isTrain ? 170 : 110), // the panel scrolls (Info's heat map, Train's forecast)
      });
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const data = message?.seqlora_bank?.[0];
      if (data && this.seqloraPanel) renderBank(this.seqloraPanel, data);
    };
  },
  setup() {
    api.addEventListener("seqlora.progress", ({ detail }) => {
      const node = nodeFor(detail.node);
      if (!node?.seqloraPanel) return;
      if (detail.step === 1) node.seqloraLosses = [];
      node.seqloraLosses.push(detail.loss);
      renderLoss(node.seqloraPanel, node.seqloraLosses, detail.step, detail.total);
    });
    api.addEventListener("seqlora.bank", ({ detail }) => {
      const node = nodeFor(detail.node);
      if (node?.seqloraPanel) renderBank(node.seqloraPanel, detail);
    });
    // Train Concept's forecast, shown while the training it precedes runs
    api.addEventListener("seqlora.forecast", ({ detail }) => {
      const node = nodeFor(detail.node);
      if (node?.seqloraPanel) renderReport(node.seqloraPanel, detail.text);
    });
    // Cancel (or an error) during training: say so instead of leaving "step k / n" up
    api.addEventListener("seqlora.stopped", ({ detail }) => {
      const node = nodeFor(detail.node);
      const status = node?.seqloraPanel?.querySelector(".seqlora-status");
      if (!status) return;
      status.textContent = `${detail.state} at step ${detail.step} / ${detail.total} · the bank was left as it was`;
      status.dataset.state = detail.state;
    });
  },
});

// ---- box editor on "Regional Concepts": boxes over a canvas of the target size, a prompt and a
// concept picker per box. The `regions` text widget (JSON) stays the source of truth.
function parseRegions(text) {
  try {
    const d = JSON.parse(text || "{}");
    return { width: d.width || 512, height: d.height || 512, regions: Array.isArray(d.regions) ? d.regions : [] };
  } catch {
    return { width: 512, height: 512, regions: [] };
  }
}

const BOX_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4"];


// The bank this Regional Concepts node composes from: follow links upstream (clip ← Compose
// Concepts ← bank) to a Load Basis Bank node and read its file name; null when none is connected.
function connectedBankName(node) {
  const seen = new Set();
  const queue = [node];
  while (queue.length) {
    const n = queue.shift();
    if (!n || seen.has(n.id)) continue;
    seen.add(n.id);
    if (n.type === "SeqLoRALoadBasisBank") return n.widgets?.find((w) => w.name === "bank_name")?.value ?? null;
    for (const input of n.inputs ?? []) {
      if (input.link == null) continue;
      const link = n.graph?.links?.[input.link] ?? n.graph?.links?.get?.(input.link);
      if (link) queue.push(n.graph.getNodeById(link.origin_id));
    }
  }
  return null;
}

async function fetchTokens(bankName) {
  try {
    const query = bankName ? `?bank=${encodeURIComponent(bankName)}` : "";
    const res = await api.fetchApi(`/seqlora/concepts${query}`);
    const banks = await res.json();
    return [...new Set(Object.values(banks).flat())];
  } catch {
    return [];
  }
}

// The control image (sketch or keypose photo) shown under the boxes: the first Load Image of the
// graph whose image feeds a ControlNet / T2I-Adapter apply node.
function controlImageUrl(node) {
  for (const n of node.graph?._nodes ?? []) {
    if (n.type !== "LoadImage") continue;
    const feedsControl = (n.outputs?.[0]?.links ?? []).some((id) => {
      const link = n.graph.links?.[id] ?? n.graph.links?.get?.(id);
      return link && /ControlNetApply/.test(n.graph.getNodeById(link.target_id)?.type ?? "");
    });
    const file = n.widgets?.find((w) => w.name === "image")?.value;
    if (feedsControl && file) {
      const [sub, name] = file.includes("/") ? [file.slice(0, file.lastIndexOf("/")), file.slice(file.lastIndexOf("/") + 1)] : ["", file];
      return api.apiURL(`/view?filename=${encodeURIComponent(name)}&type=input&subfolder=${encodeURIComponent(sub)}`);
    }
  }
  return null;
}

const HANDLE = 8; // canvas pixels around a corner that grab it for resizing
const MAX_ROWS = 5; // box rows shown before the list scrolls

function makeBoxEditor(node, widget) {
  const root = el("div", { fontSize: "11px", color: "#ddd", padding: "4px" });
  root.className = "seqlora-box-editor";
  const hint = el("div", { opacity: 0.7, marginBottom: "2px" },
    "drag on empty space (or Shift+drag) to add a box · drag a box to move it · drag a corner to resize");
  const canvas = el("canvas", { height: "200px", maxWidth: "100%", background: "#111", cursor: "crosshair",
    display: "block", margin: "0 auto", touchAction: "none" });
  canvas.width = 256;
  canvas.height = 256;
  // at most MAX_ROWS rows visible (then it scrolls), so adding boxes never grows the node over its neighbours
  const list = el("div", { marginTop: "4px", maxHeight: `${26 * MAX_ROWS}px`, overflowY: "auto" });
  list.className = "seqlora-box-list";
  root.append(hint, canvas, list);
  let tokens = [];
  let drag = null; // {mode: "new" | "move" | "resize", index, start: [x, y], box, corner}
  let background = null;

  const state = () => parseRegions(widget.value);
  const save = (s) => {
    widget.value = JSON.stringify(s);
    widget.callback?.(widget.value);
    render();
  };

  function toImage(ev, s) {
    const r = canvas.getBoundingClientRect();
    return [((ev.clientX - r.left) / r.width) * s.width, ((ev.clientY - r.top) / r.height) * s.height];
  }

  function clampBox(b, s) {
    const [x0, y0, x1, y1] = [Math.min(b[0], b[2]), Math.min(b[1], b[3]), Math.max(b[0], b[2]), Math.max(b[1], b[3])];
    return [Math.max(0, x0), Math.max(0, y0), Math.min(s.width, x1), Math.min(s.height, y1)].map(Math.round);
  }

  function hit(s, x, y) {
    const grab = (HANDLE * s.width) / canvas.width;
    for (let i = s.regions.length - 1; i >= 0; i--) {
      const [x0, y0, x1, y1] = s.regions[i].box;
      const corners = [[x0, y0], [x1, y0], [x0, y1], [x1, y1]];
      const c = corners.findIndex(([cx, cy]) => Math.abs(cx - x) <= grab && Math.abs(cy - y) <= grab);
      if (c >= 0) return { mode: "resize", index: i, corner: c };
      if (x > x0 && x < x1 && y > y0 && y < y1) return { mode: "move", index: i };
    }
    return null;
  }

  function draggedBoxes(s) {
    if (!drag) return s.regions;
    const regions = s.regions.map((r) => ({ ...r }));
    const [sx, sy] = drag.start, [cx, cy] = drag.current ?? drag.start;
    if (drag.mode === "new") return [...regions, { box: clampBox([sx, sy, cx, cy], s), prompt: "" }];
    const [x0, y0, x1, y1] = drag.box;
    if (drag.mode === "move") {
      const dx = Math.max(-x0, Math.min(s.width - x1, cx - sx)), dy = Math.max(-y0, Math.min(s.height - y1, cy - sy));
      regions[drag.index].box = [x0 + dx, y0 + dy, x1 + dx, y1 + dy].map(Math.round);
    } else {
      const b = [x0, y0, x1, y1];
      b[drag.corner % 2 === 0 ? 0 : 2] = cx;
      b[drag.corner < 2 ? 1 : 3] = cy;
      regions[drag.index].box = clampBox(b, s);
    }
    return regions;
  }

  function fitNode() {
    const height = node.computeSize()[1];
    if (Math.abs(node.size[1] - height) > 1) node.setSize([node.size[0], height]);
    node.setDirtyCanvas?.(true, true);
  }

  function render() {
    const s = state();
    canvas.height = Math.round(canvas.width * (s.height / s.width));
    canvas.style.width = `${Math.round(200 * (s.width / s.height))}px`;
    const ctx = canvas.getContext("2d");
    const k = canvas.width / s.width;
    ctx.fillStyle = "#111";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (background?.complete && background.naturalWidth) {
      ctx.globalAlpha = 0.5;
      ctx.drawImage(background, 0, 0, canvas.width, canvas.height);
      ctx.globalAlpha = 1;
    }
    draggedBoxes(s).forEach((r, i) => {
      const [x0, y0, x1, y1] = r.box;
      ctx.strokeStyle = BOX_COLORS[i % BOX_COLORS.length];
      ctx.lineWidth = 2;
      ctx.strokeRect(x0 * k, y0 * k, (x1 - x0) * k, (y1 - y0) * k);
      ctx.fillStyle = ctx.strokeStyle;
      for (const [cx, cy] of [[x0, y0], [x1, y0], [x0, y1], [x1, y1]]) ctx.fillRect(cx * k - 3, cy * k - 3, 6, 6);
      ctx.fillText(`${i + 1}`, x0 * k + 5, y0 * k + 13);
    });
    list.replaceChildren();
    s.regions.forEach((r, i) => {
      const row = el("div", { display: "flex", gap: "4px", marginTop: "2px", alignItems: "center" });
      row.className = "seqlora-box-row";
      const swatch = el("span", { color: BOX_COLORS[i % BOX_COLORS.length] }, `${i + 1}`);
      const prompt = el("input", { flex: "1", minWidth: "0" });
      prompt.value = r.prompt || "";
      prompt.onchange = () => { const t = state(); t.regions[i].prompt = prompt.value; save(t); };
      const pick = el("select", { flex: "0 0 auto", minWidth: "110px" }); // "concept…" and a token in full
      pick.append(new Option("+ concept", ""));  // not "concept…": read as a label cut short
      tokens.forEach((t) => pick.append(new Option(t, t)));
      pick.onfocus = () => refreshTokens(); // the bank may have changed since the node was created
      pick.onchange = () => {
        if (!pick.value) return;
        const t = state();
        // the picked concept replaces the box's concept tokens instead of piling up after them
        const text = (t.regions[i].prompt || "").replace(/<[A-Za-z0-9_-]+>/g, "").replace(/\s+/g, " ").trim();
        t.regions[i].prompt = text ? `${text} ${pick.value}` : `a photo of ${pick.value}`;
        save(t);
      };
      const del = el("button", {}, "×");
      del.onclick = () => { const t = state(); t.regions.splice(i, 1); save(t); };
      row.append(swatch, prompt, pick, del);
      list.append(row);
    });
    fitNode();
  }

  canvas.addEventListener("pointerdown", (ev) => {
    const s = state();
    const [x, y] = toImage(ev, s);
    const target = ev.shiftKey ? null : hit(s, x, y);
    drag = target ? { ...target, start: [x, y], box: [...s.regions[target.index].box] } : { mode: "new", start: [x, y] };
    canvas.setPointerCapture(ev.pointerId);
    ev.stopPropagation();
  });
  canvas.addEventListener("pointermove", (ev) => {
    const s = state();
    const [x, y] = toImage(ev, s);
    if (!drag) {
      const over = hit(s, x, y);
      canvas.style.cursor = over?.mode === "resize" ? "nwse-resize" : over ? "move" : "crosshair";
      return;
    }
    drag.current = [x, y];
    render();
  });
  canvas.addEventListener("pointerup", () => {
    if (!drag) return;
    const s = state();
    const regions = draggedBoxes(s);
    const mode = drag.mode;
    drag = null;
    if (mode === "new") {
      const box = regions[regions.length - 1].box;
      if (box[2] - box[0] >= 4 && box[3] - box[1] >= 4) s.regions.push({ box, prompt: "" });
    } else {
      s.regions = regions;
    }
    save(s);
  });

  async function refreshTokens() {
    const bank = connectedBankName(node);
    const fresh = await fetchTokens(bank);
    if (fresh.join("\n") !== tokens.join("\n")) { tokens = fresh; render(); }
  }

  function refreshBackground() {
    const url = controlImageUrl(node);
    if (!url) { background = null; return; }
    if (background?.dataset?.url === url) return;
    background = new Image();
    background.dataset.url = url;
    background.onload = () => render();
    background.src = url;
  }

  root.seqloraRender = () => { refreshBackground(); refreshTokens(); render(); };
  render();
  return root;
}

app.registerExtension({
  name: "SeqLoRA.BoxEditor",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "SeqLoRARegionalConcepts") return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const widget = this.widgets.find((w) => w.name === "regions");
      // the JSON stays the serialised value (and the API input) but is edited through the boxes
      widget.hidden = true;
      widget.computeSize = () => [0, -4];
      for (const e of [widget.element, widget.inputEl]) if (e) e.style.display = "none";
      const callback = widget.callback;
      const node = this;
      widget.callback = function () {
        const r = callback?.apply(this, arguments);
        node.seqloraEditor?.seqloraRender();
        return r;
      };
      const editor = makeBoxEditor(this, widget);
      this.seqloraEditor = editor;
      this.addDOMWidget("seqlora_box_editor", "seqlora", editor, {
        serialize: false,
        getMinHeight: () => 250 + 26 * Math.min(MAX_ROWS, parseRegions(widget.value).regions.length),
      });
      setTimeout(() => editor.seqloraRender(), 0); // links exist only after the graph is configured
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      this.seqloraEditor?.seqloraRender();
      return r;
    };
    const onConnectionsChange = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function () {
      const r = onConnectionsChange?.apply(this, arguments);
      this.seqloraEditor?.seqloraRender();
      return r;
    };
  },
});

// ---- "Load Image Folder (SeqLoRA)": upload several photos at once into the chosen folder under
// input/ (ComfyUI's own /upload/image with a subfolder), then refresh the folder list.
async function uploadPhotos(node, files) {
  const folderWidget = node.widgets.find((w) => w.name === "folder");
  let folder = folderWidget?.value;
  if (!folder) folder = window.prompt("Folder under ComfyUI/input/ for these photos:", "my_concept");
  if (!folder) return;
  for (const file of files) {
    const body = new FormData();
    body.append("image", file);
    body.append("subfolder", folder);
    body.append("type", "input");
    const res = await api.fetchApi("/upload/image", { method: "POST", body });
    if (res.status !== 200) throw new Error(`upload of ${file.name} failed: ${res.status} ${res.statusText}`);
  }
  await app.refreshComboInNodes?.();
  if (folderWidget) folderWidget.value = folder;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "SeqLoRA.ImageFolder",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "SeqLoRALoadImageFolder") return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const input = document.createElement("input");
      Object.assign(input, { type: "file", multiple: true, accept: "image/*" });
      input.style.display = "none";
      document.body.append(input);
      input.onchange = () => uploadPhotos(this, [...input.files]).finally(() => { input.value = ""; });
      const onRemoved = this.onRemoved;
      this.onRemoved = function () { input.remove(); return onRemoved?.apply(this, arguments); };
      const button = this.addWidget("button", "upload photos…", null, () => input.click(), { serialize: false });
      button.serialize = false; // neither in the saved workflow nor in the prompt
      return result;
    };
  },
});
