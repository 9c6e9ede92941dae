// RCOD web extension: shows M_L and t on the nodes after a run (in a read-only widget, so both node renderers
// show it); keeps the preset combo and the t widget in sync.
// Served at /extensions/<this folder>/js/rcod.js, so ComfyUI's app module is three levels up.
import { app } from "../../../scripts/app.js";

const SHOWS_VALUES = new Set(["RCODLatentMetric", "RCODDenoise", "RCODUpscale", "RCODRealismSweep"]);
const HAS_PRESET = new Set(["RCODDenoise", "RCODUpscale"]);

function findWidget(node, name) {
  return (node.widgets || []).find((w) => w.name === name);
}

function formatValues(message) {
  const parts = [];
  const list = (key) => (Array.isArray(message?.[key]) ? message[key] : message?.[key] != null ? [message[key]] : []);
  const ml = list("rcod_m_l"), mlTrue = list("rcod_m_l_true"), t = list("rcod_t");
  if (ml.length) parts.push("M_L " + ml.map((v) => Number(v).toFixed(3)).join(", "));
  if (mlTrue.length) parts.push("true M_L " + mlTrue.map((v) => Number(v).toFixed(3)).join(", "));
  if (t.length) parts.push("t " + t.join(", "));
  return parts.join("  ·  ");
}

// The preset -> t table comes from the node's own definition (its "preset" input's rcod_preset_t option).
function presetTable(nodeData) {
  const input = nodeData?.input?.required?.preset ?? nodeData?.input?.optional?.preset;
  const table = Array.isArray(input) ? input[1]?.rcod_preset_t : null;
  return table && typeof table === "object" ? table : null;
}

function linkPresetAndT(node, PRESET_T) {
  const preset = findWidget(node, "preset");
  const t = findWidget(node, "t");
  if (!preset || !t || !PRESET_T) return;
  let syncing = false;
  const presetCallback = preset.callback;
  preset.callback = function (value, ...rest) {
    const r = presetCallback?.apply(this, [value, ...rest]);
    const v = value ?? preset.value;
    if (v in PRESET_T && t.value !== PRESET_T[v]) {
      syncing = true;
      try {
        t.value = PRESET_T[v];
        t.callback?.(t.value);
      } finally {
        syncing = false;
      }
    }
    node.setDirtyCanvas?.(true, true);
    return r;
  };
  const tCallback = t.callback;
  t.callback = function (value, ...rest) {
    const r = tCallback?.apply(this, [value, ...rest]);
    if (!syncing && preset.value !== "Custom" && preset.value !== "Adaptive") {
      const v = Number(value ?? t.value);
      if (PRESET_T[preset.value] !== v) {
        preset.value = "Custom";
        node.setDirtyCanvas?.(true, true);
      }
    }
    return r;
  };
}

app.registerExtension({
  name: "rcod.values",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const id = nodeData?.name;
    if (HAS_PRESET.has(id)) {
      const table = presetTable(nodeData);
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = onNodeCreated?.apply(this, arguments);
        linkPresetAndT(this, table);
        return r;
      };
    }
    if (!SHOWS_VALUES.has(id)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);  // the original handler first
      let text = formatValues(message);
      const tWidget = findWidget(this, "t");
      const preset = findWidget(this, "preset");
      const used = Array.isArray(message?.rcod_t) ? message.rcod_t : [];
      const fixedPreset = preset && !["Custom", "Adaptive"].includes(preset.value);
      const oneT = used.length > 0 && used.every((v) => v === used[0]);  // not a mask's levels
      if (text && tWidget && fixedPreset && oneT && used[0] !== tWidget.value) {
        text += `  (the model's own t for ${preset.value}; the widget shows the paper's ${tWidget.value})`;
      }
      if (text) {
        this.rcodValues = text;
        // a widget, not canvas drawing: both the legacy canvas and the Vue node renderer show widgets
        let shown = findWidget(this, "rcod_values");
        if (!shown && this.addWidget) {
          const node = this;
          // read-only: an edit is put back to the values of the last run
          shown = this.addWidget("text", "rcod_values", text, () => { if (shown) shown.value = node.rcodValues; },
                                 { serialize: false });
          if (shown) shown.serialize = false;  // not part of the saved workflow
        }
        if (shown) shown.value = text;
        const w = this.size?.[0] ?? 200;
        if (this.setSize && this.computeSize) {
          const min = this.computeSize();
          this.setSize([Math.max(w, min[0]), Math.max(this.size[1], min[1])]);
        }
        this.setDirtyCanvas?.(true, true);
      }
      return r;
    };
  },
});
