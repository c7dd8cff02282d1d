// The playground: streams a completion from /v1/completions into the page, and looks inside:
// the next-character probabilities behind every generated character (the API's logprobs) and
// the attention weights of every layer and head (/v1/tinygpt/attention) as a heatmap.
// Model output only ever becomes text nodes (never HTML), so it cannot inject markup.
"use strict";

const $ = (id) => document.getElementById(id);
const TOP = 5; // alternatives shown per character (the API's largest logprobs)
const HEATMAP_CHARS = 64; // the heatmap shows at most the last 64 characters
let model = null;
let controller = null;
// What the "look inside" view knows about the current output.
const look = {
  spans: [], // one <span> per generated character
  base: 0, // characters of the prompt (the API counts text_offset from the prompt's start)
  entries: [], // per generated token: {at: its first character, token, top: {token: logprob}}
  selected: -1, // the character whose probabilities are shown
  maps: null, // the attention route's answer for the end of the text
};

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setBusy(busy) {
  $("generate").disabled = busy || model === null;
  $("stop").disabled = !busy;
  document.body.classList.toggle("busy", busy);
}

function showModel(card) {
  const info = card.tinygpt || {};
  const rows = [
    ["model", card.id],
    ["kind", info.kind],
    ["parameters", info.num_params !== undefined ? info.num_params.toLocaleString() : undefined],
    ["vocabulary", info.vocab_size],
    ["context", info.block_size],
    ["step", info.step],
    ["val loss", typeof info.val_loss === "number" ? info.val_loss.toFixed(4) : undefined],
  ];
  const list = $("model-info");
  list.replaceChildren();
  for (const [name, value] of rows) {
    if (value === undefined || value === null) continue;
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    list.append(dt, dd);
  }
  const limit = info.limits && info.limits.max_tokens;
  if (limit) {
    const box = $("max-tokens");
    box.max = String(limit);
    if (Number(box.value) > limit) box.value = String(limit);
  }
  if (info.vocab_size) $("top-k").max = String(info.vocab_size);
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models");
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    model = body.data[0];
    showModel(model);
    setBusy(false);
  } catch (e) {
    showError("Could not load the model: " + e.message);
  }
}

function requestBody() {
  const body = {
    model: model.id,
    prompt: $("prompt").value,
    max_tokens: Math.trunc(Number($("max-tokens").value)),
    temperature: Number($("temperature").value),
    logprobs: TOP,
    stream: true,
    stream_options: { include_usage: true },
  };
  const topK = Math.trunc(Number($("top-k").value));
  if (topK > 0) body.top_k = topK;
  const topP = Number($("top-p").value);
  if (topP < 1) body.top_p = topP;
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = Math.trunc(Number(seed));
  return body;
}

// Calls onEvent(data) for every "data:" payload of a server-sent event stream.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) onEvent(line.slice(6));
      }
    }
  }
}

async function generate() {
  if (model === null || controller !== null) return;
  showError("");
  const body = requestBody();
  $("out-prompt").textContent = body.prompt;
  $("out-text").replaceChildren();
  resetLook(body.prompt);
  const output = $("output");
  let generated = "";
  const started = performance.now();
  let chars = 0;
  let finish = null;
  const stats = () => {
    const seconds = (performance.now() - started) / 1000;
    const rate = seconds > 0 ? (chars / seconds).toFixed(0) : "0";
    $("stats").textContent = `${chars} chars · ${rate} chars/s` + (finish ? ` · ${finish}` : "");
  };
  controller = new AbortController();
  setBusy(true);
  $("stats").textContent = "waiting…";
  try {
    const response = await fetch("/v1/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      const err = await response.json().catch(() => null);
      throw new Error(err && err.error ? err.error.message : `HTTP ${response.status}`);
    }
    await readEvents(response, (data) => {
      if (data === "[DONE]") return;
      const message = JSON.parse(data);
      if (message.error) throw new Error(message.error.message);
      for (const choice of message.choices) {
        addCharacters(choice.text, choice.logprobs);
        generated += choice.text;
        chars += [...choice.text].length;
        if (choice.finish_reason) finish = choice.finish_reason === "length" ? "done" : "stop string";
      }
      output.scrollTop = output.scrollHeight;
      stats();
    });
    stats();
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
      stats();
    } else {
      controller.abort(); // close the stream, so the server stops generating
      showError(e.message);
      $("stats").textContent = "";
    }
  } finally {
    controller = null;
    setBusy(false);
  }
  if (generated) loadAttention(body.prompt + generated);
}

// --- look inside: next-character probabilities -------------------------------------------

// How a token is shown on its own (a label, an axis): blanks and controls made visible.
function visible(text) {
  const names = { " ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍" };
  return [...text].map((ch) => {
    if (names[ch]) return names[ch];
    const code = ch.codePointAt(0);
    if (code < 0x20 || (code >= 0x7f && code < 0xa0)) return "\\x" + code.toString(16).padStart(2, "0");
    return ch;
  }).join("");
}

function resetLook(prompt = "") {
  look.spans = [];
  look.base = [...prompt].length;
  look.entries = [];
  look.selected = -1;
  look.maps = null;
  $("next-bars").replaceChildren();
  $("next-caption").textContent =
    "Hover, tap or focus a generated character (arrow keys move) to see what the model expected there.";
  for (const id of ["layer", "head"]) {
    $(id).replaceChildren();
    $(id).disabled = true;
  }
  const canvas = $("heatmap");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  canvas.dataset.state = "empty";
  $("heatmap-caption").textContent = "Generate some text to see where each head looks.";
}

// One focusable <span> per character, so each can be pointed at; logprobs may be absent.
// A token may span several characters (BPE): each character points at the token it is in.
function addCharacters(text, logprobs) {
  for (const ch of text) {
    const span = document.createElement("span");
    span.className = "ch";
    span.textContent = ch;
    span.dataset.i = String(look.spans.length);
    span.tabIndex = look.spans.length === 0 ? 0 : -1; // one tab stop; arrows move inside
    look.spans.push(span);
    $("out-text").append(span);
  }
  if (!logprobs || !logprobs.tokens) return;
  logprobs.tokens.forEach((token, j) => {
    look.entries.push({ at: logprobs.text_offset[j] - look.base, token, top: logprobs.top_logprobs[j] });
  });
}

// The token that character i of the output belongs to: the last one starting at or before it.
function entryAt(i) {
  let found = null;
  for (const entry of look.entries) {
    if (entry.at > i) break;
    found = entry;
  }
  return found;
}

function select(i, focus) {
  if (i < 0 || i >= look.spans.length) return;
  if (look.selected >= 0) {
    look.spans[look.selected].classList.remove("selected");
    look.spans[look.selected].tabIndex = -1;
  }
  look.selected = i;
  const span = look.spans[i];
  span.classList.add("selected");
  span.tabIndex = 0;
  if (focus) span.focus();
  showBars(i);
}

function showBars(i) {
  const ch = look.spans[i].textContent;
  const entry = entryAt(i);
  const list = $("next-bars");
  list.replaceChildren();
  if (!entry || !entry.top) {
    $("next-caption").textContent = `Character ${i + 1}: no probabilities were sent for it.`;
    return;
  }
  const chosen = entry.token;
  const part = chosen === ch ? "" : `, in the token “${visible(chosen)}”`;
  $("next-caption").textContent =
    `Character ${i + 1} of the output is “${visible(ch)}”${part}. Before it, the model expected:`;
  const top = entry.top;
  const ranked = Object.entries(top).sort((a, b) => b[1] - a[1]);
  const shown = ranked.slice(0, TOP);
  if (!shown.some(([ch]) => ch === chosen)) shown.push(ranked.find(([ch]) => ch === chosen));
  for (const [ch, logprob] of shown) {
    const p = Math.exp(logprob);
    const item = document.createElement("li");
    item.classList.toggle("chosen", ch === chosen);
    const label = document.createElement("span");
    label.className = "bar-label";
    label.textContent = visible(ch);
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = `${(100 * p).toFixed(1)}%`;
    item.append(label, bar, value);
    list.append(item);
  }
}

function spanIndex(target) {
  return target instanceof HTMLElement && target.classList.contains("ch") ? Number(target.dataset.i) : -1;
}

// --- look inside: attention heatmap ------------------------------------------------------

async function loadAttention(fullText) {
  const context = (model.tinygpt && model.tinygpt.block_size) || HEATMAP_CHARS;
  let chars = [...fullText].slice(-Math.min(context, HEATMAP_CHARS));
  const canvas = $("heatmap");
  canvas.dataset.state = "loading";
  try {
    for (;;) {
      const response = await fetch("/v1/tinygpt/attention", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ model: model.id, text: chars.join("") }),
      });
      const body = await response.json();
      const code = body.error && body.error.code;
      if (code === "context_length_exceeded" && chars.length > 1) {
        chars = chars.slice(Math.floor(chars.length / 2)); // more tokens than characters (BPE)
        continue;
      }
      if (!response.ok) throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
      look.maps = body;
      break;
    }
  } catch (e) {
    canvas.dataset.state = "error";
    $("heatmap-caption").textContent = "No attention to show: " + e.message;
    return;
  }
  fillPicker("layer", look.maps.layers);
  fillPicker("head", look.maps.heads);
  drawHeatmap();
}

function fillPicker(id, values) {
  const picker = $(id);
  picker.replaceChildren(...values.map((v) => new Option(String(v), String(v))));
  picker.disabled = false;
}

function drawHeatmap() {
  const maps = look.maps;
  if (!maps) return;
  const li = maps.layers.indexOf(Number($("layer").value));
  const hi = maps.heads.indexOf(Number($("head").value));
  const rows = maps.weights[li][hi]; // rows[q][k]: how much token q looks at token k
  const tokens = maps.tokens;
  const n = tokens.length;
  const cell = Math.max(8, Math.min(18, Math.floor(560 / n)));
  const margin = 22;
  const canvas = $("heatmap");
  const ratio = window.devicePixelRatio || 1;
  const size = margin + n * cell + 2;
  canvas.width = size * ratio;
  canvas.height = size * ratio;
  canvas.style.width = `${size}px`; // the height follows (the CSS caps the width)
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  const css = getComputedStyle(document.body);
  ctx.fillStyle = css.getPropertyValue("--panel") || "#fff";
  ctx.fillRect(0, 0, size, size);
  const hot = css.getPropertyValue("--heat").trim() || "59, 91, 219";
  for (let q = 0; q < n; q++) {
    for (let k = 0; k < rows[q].length; k++) {
      ctx.fillStyle = `rgba(${hot}, ${rows[q][k]})`;
      ctx.fillRect(margin + k * cell, margin + q * cell, cell, cell);
    }
  }
  ctx.fillStyle = css.getPropertyValue("--text") || "#000";
  ctx.font = `${Math.min(12, cell)}px ui-monospace, Menlo, Consolas, monospace`;
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  tokens.forEach((ch, i) => {
    const label = visible(ch);
    ctx.fillText(label, margin + i * cell + cell / 2, margin / 2); // columns: where it looks
    ctx.fillText(label, margin / 2, margin + i * cell + cell / 2); // rows: who looks
  });
  const unit = tokens.every((t) => [...t].length === 1) ? ["characters", "character"] : ["tokens", "token"];
  canvas.dataset.state = "ready";
  canvas.dataset.layer = String(maps.layers[li]);
  canvas.dataset.head = String(maps.heads[hi]);
  canvas.setAttribute("aria-label",
    `attention of layer ${maps.layers[li]}, head ${maps.heads[hi]} over the last ${n} ${unit[0]}`);
  $("heatmap-caption").textContent =
    `Layer ${maps.layers[li]}, head ${maps.heads[hi]}, the last ${n} ${unit[0]}: row = the ` +
    `${unit[1]} that looks, column = the ${unit[1]} it looks at; darker = more attention.`;
}

function bindValue(inputId, outputId, digits) {
  const show = () => { $(outputId).textContent = Number($(inputId).value).toFixed(digits); };
  $(inputId).addEventListener("input", show);
  show();
}

document.addEventListener("DOMContentLoaded", () => {
  bindValue("temperature", "temperature-value", 2);
  bindValue("top-p", "top-p-value", 2);
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      generate();
    }
  });
  const out = $("out-text");
  out.addEventListener("mouseover", (e) => { const i = spanIndex(e.target); if (i >= 0) select(i, false); });
  out.addEventListener("click", (e) => { const i = spanIndex(e.target); if (i >= 0) select(i, true); });
  out.addEventListener("focusin", (e) => { const i = spanIndex(e.target); if (i >= 0) select(i, false); });
  out.addEventListener("keydown", (e) => {
    const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[e.key];
    if (step === undefined || look.selected < 0) return;
    e.preventDefault();
    select(Math.max(0, Math.min(look.spans.length - 1, look.selected + step)), true);
  });
  $("layer").addEventListener("change", drawHeatmap);
  $("head").addEventListener("change", drawHeatmap);
  resetLook();
  setBusy(false);
  loadModel();
});
