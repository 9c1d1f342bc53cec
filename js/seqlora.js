// SeqLoRA front-end: a panel on the bank nodes (concepts, capacity bars, orthogonality) and a live
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

function renderBank(panel, data) {
  const box = panel.querySelector(".seqlora-bank");
  box.replaceChildren();
  const orth = Number(data.orthogonality || 0).toExponential(1);
  box.append(el("div", { fontWeight: "bold", marginBottom: "4px" },
    `${data.concepts.length} concept(s) · orthogonality error ${orth}`));
  for (const c of data.concepts) {
    const row = el("div", { display: "flex", justifyContent: "space-between", gap: "8px" });
    row.className = "seqlora-concept";
    row.append(el("span", {}, c.token), el("span", { opacity: 0.7 }, `${c.method} · r${c.rank}`));
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
  panel.querySelector(".seqlora-status").textContent =
    `step ${step} / ${total} · loss ${losses.length ? losses[losses.length - 1].toFixed(4) : "-"}`;
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
        getMinHeight: () => (isTrain ? 170 : 110),
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
    const nodeFor = (id) => (id == null ? null : app.graph?.getNodeById(Number(id)));
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

async function fetchTokens() {
  try {
    const res = await api.fetchApi("/seqlora/concepts");
    const banks = await res.json();
    return [...new Set(Object.values(banks).flat())];
  } catch {
    return [];
  }
}

function makeBoxEditor(node, widget) {
  const root = el("div", { fontSize: "11px", color: "#ddd", padding: "4px" });
  root.className = "seqlora-box-editor";
  const canvas = el("canvas", { height: "200px", maxWidth: "100%", background: "#111", cursor: "crosshair",
    display: "block", margin: "0 auto" });
  canvas.width = 256;
  canvas.height = 256;
  const list = el("div", { marginTop: "4px" });
  list.className = "seqlora-box-list";
  root.append(canvas, list);
  let tokens = [];
  let drag = null;

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

  function render() {
    const s = state();
    canvas.height = Math.round(canvas.width * (s.height / s.width));
    canvas.style.width = `${Math.round(200 * (s.width / s.height))}px`;
    const ctx = canvas.getContext("2d");
    const k = canvas.width / s.width;
    ctx.fillStyle = "#111";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    const all = drag ? [...s.regions, { box: drag, prompt: "" }] : s.regions;
    all.forEach((r, i) => {
      const [x0, y0, x1, y1] = r.box;
      ctx.strokeStyle = BOX_COLORS[i % BOX_COLORS.length];
      ctx.lineWidth = 2;
      ctx.strokeRect(x0 * k, y0 * k, (x1 - x0) * k, (y1 - y0) * k);
      ctx.fillStyle = ctx.strokeStyle;
      ctx.fillText(`${i + 1}`, x0 * k + 3, y0 * k + 11);
    });
    list.replaceChildren();
    s.regions.forEach((r, i) => {
      const row = el("div", { display: "flex", gap: "4px", marginTop: "2px", alignItems: "center" });
      row.className = "seqlora-box-row";
      const swatch = el("span", { color: BOX_COLORS[i % BOX_COLORS.length] }, `${i + 1}`);
      const prompt = el("input", { flex: "1", minWidth: "0" });
      prompt.value = r.prompt || "";
      prompt.onchange = () => { const t = state(); t.regions[i].prompt = prompt.value; save(t); };
      const pick = el("select", { maxWidth: "90px" });
      pick.append(new Option("concept…", ""));
      tokens.forEach((t) => pick.append(new Option(t, t)));
      pick.onchange = () => {
        if (!pick.value) return;
        const t = state();
        t.regions[i].prompt = `${t.regions[i].prompt || "a photo of"} ${pick.value}`.trim();
        save(t);
      };
      const del = el("button", {}, "×");
      del.onclick = () => { const t = state(); t.regions.splice(i, 1); save(t); };
      row.append(swatch, prompt, pick, del);
      list.append(row);
    });
  }

  canvas.addEventListener("pointerdown", (ev) => {
    const s = state();
    const [x, y] = toImage(ev, s);
    drag = [x, y, x, y];
    canvas.setPointerCapture(ev.pointerId);
  });
  canvas.addEventListener("pointermove", (ev) => {
    if (!drag) return;
    const [x, y] = toImage(ev, state());
    drag = [drag[0], drag[1], x, y];
    render();
  });
  canvas.addEventListener("pointerup", () => {
    if (!drag) return;
    const [a, b, c, d] = drag;
    drag = null;
    const box = [Math.min(a, c), Math.min(b, d), Math.max(a, c), Math.max(b, d)].map(Math.round);
    const s = state();
    if (box[2] - box[0] >= 4 && box[3] - box[1] >= 4) s.regions.push({ box, prompt: "" });
    save(s);
  });

  fetchTokens().then((t) => { tokens = t; render(); });
  render();
  root.seqloraRender = render;
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
      const editor = makeBoxEditor(this, widget);
      this.seqloraEditor = editor;
      this.addDOMWidget("seqlora_box_editor", "seqlora", editor, {
        serialize: false,
        getMinHeight: () => 220 + 26 * parseRegions(widget.value).regions.length,
      });
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      this.seqloraEditor?.seqloraRender();
      return r;
    };
  },
});
