// SeqLoRA front-end: a panel on the bank nodes (concepts, capacity bars, orthogonality) and a live
// loss curve on "Train Concept (SeqLoRA)". The server sends what is drawn: the bank nodes' UI output
// carries `seqlora_bank` (nodes/logic.py: panel_data); training broadcasts `seqlora.progress` and,
// when done, `seqlora.bank`.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PANEL_NODES = new Set([
  "SeqLoRATrainConcept", "SeqLoRALoadBasisBank", "SeqLoRASaveBasisBank", "SeqLoRABasisBankInfo",
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
