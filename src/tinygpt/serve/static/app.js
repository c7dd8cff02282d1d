// The playground: streams a completion from /v1/completions into the page.
// Model output only ever becomes text nodes (never HTML), so it cannot inject markup.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;
let controller = null;

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
  const text = document.createTextNode("");
  $("out-prompt").textContent = body.prompt;
  $("out-text").replaceChildren(text);
  const output = $("output");
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
        text.appendData(choice.text);
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
  setBusy(false);
  loadModel();
});
