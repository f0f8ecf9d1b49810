// The classification page: one image and a label set to POST /classify, the answer drawn as bars and as the strip
// of backbone blocks it went through. Plain browser JavaScript, no libraries, nothing from another origin.
"use strict";

const PRESETS = {
  // Everyday words the default model was taught through WordNet captions, then fine-grained Tiny-ImageNet names.
  Everyday: ["cat", "dog", "bird", "car", "truck", "airplane", "flower", "fruit"],
  Vehicles: ["school bus", "sports car", "tractor", "trolleybus", "police van", "lifeboat"],
  Animals: ["tabby cat", "Golden Retriever", "lion", "brown bear", "koala", "king penguin"],
  Food: ["banana", "pizza", "ice cream", "orange", "pretzel", "mushroom"],
  "At home": ["teapot", "rocking chair", "refrigerator", "umbrella", "candle", "teddy bear"],
  Places: ["beach", "mountain", "lighthouse", "barn", "fountain", "suspension bridge"],
};

const FULL = "full"; // the operating point that never exits early

const state = {
  model: null, // GET /model, once it answered
  file: null, // the chosen image (a File)
  previewUrl: null,
};

const byId = (id) => document.getElementById(id);

/** The API key the user typed, as request headers; it lives only in the input field and this call. */
function authHeaders() {
  const key = byId("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

class ApiError extends Error {
  constructor(status, body, retryAfter) {
    const error = body && body.error ? body.error : null;
    super(error ? error.message : `HTTP ${status}`);
    this.status = status;
    this.code = error ? error.code : null;
    this.retryAfter = retryAfter;
  }
}

/** fetch + the service's error shape: resolves to the JSON body, or throws ApiError / a network TypeError. */
async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null; // not JSON: a proxy's page, say; the status still says what happened
  }
  if (!response.ok) throw new ApiError(response.status, body, response.headers.get("Retry-After"));
  return body;
}

function formatBytes(bytes) {
  if (bytes >= 1024 * 1024) return `${(bytes / 1024 / 1024).toFixed(bytes % (1024 * 1024) ? 1 : 0)} MiB`;
  if (bytes >= 1024) return `${Math.round(bytes / 1024)} KiB`;
  return `${bytes} bytes`;
}

/** A sentence for a person, for every error the API answers; the service's own message follows it. */
function explain(error) {
  if (!(error instanceof ApiError)) {
    return ["The service could not be reached.", "Check that it is running and that this page came from it."];
  }
  const limits = state.model ? state.model.limits : null;
  const server = error.message;
  switch (error.status) {
    case 400:
      return ["The request was malformed.", server];
    case 401:
      return byId("api-key").value.trim()
        ? ["The API key was refused.", "Check the key in the API key field."]
        : ["This service needs an API key.", "Enter it in the API key field (below the options) and try again."];
    case 413:
      return [
        limits ? `The image is too large (the limit is ${formatBytes(limits.max_upload_bytes)} and ` +
          `${(limits.max_image_pixels / 1e6).toFixed(0)} megapixels).` : "The image is too large.",
        server,
      ];
    case 415:
      return ["That file is not an image the service can read (JPEG, PNG, WebP, GIF, BMP, TIFF).", server];
    case 422:
      return ["The service could not use this input.", server];
    case 429:
      return [`The service is busy; try again in ${error.retryAfter || "a few"} seconds.`, server];
    case 503:
      return ["The model is not ready (still starting, or shutting down); try again shortly.", server];
    default:
      return [`The service answered HTTP ${error.status}.`, server];
  }
}

/** Show a problem: a headline, a detail line, and (for tests and styling) what kind it was. */
function showMessage(headline, detail, kind) {
  const box = byId("error");
  box.replaceChildren();
  const strong = document.createElement("strong");
  strong.textContent = headline;
  box.append(strong);
  if (detail) box.append(document.createTextNode(detail));
  box.dataset.status = kind;
  box.hidden = false;
}

function showError(error) {
  const [headline, detail] = explain(error);
  const kind = error instanceof ApiError ? String(error.status) : "network";
  showMessage(headline, error.code && detail ? `${detail} (${error.code})` : detail, kind);
}

function clearError() {
  const box = byId("error");
  box.hidden = true;
  box.replaceChildren();
  delete box.dataset.status;
}

// ---- the model description: operating points, templates, candidate layers -----------------------------------

/** The operating point that sends every image through all blocks, if this model offers one. */
function fullDepthPoint() {
  if (!state.model) return null;
  const points = state.model.operating_points;
  if (FULL in points) return FULL;
  // A stored point whose every threshold (at every calibrated label count) is >= 1 never exits early either.
  const never = Object.keys(points).find((name) =>
    Object.values(points[name].thresholds).every((byLayer) =>
      Object.values(byLayer).every((threshold) => threshold >= 1)));
  return never || null;
}

/** What the chosen operating point promises, under the select. */
function describeOperatingPoint() {
  const help = byId("operating-point-help");
  const name = byId("operating-point").value;
  const point = state.model && name ? state.model.operating_points[name] : null;
  if (name === FULL) help.textContent = "Every block runs: no early exit, full-depth FLOPs.";
  else if (point && typeof point.promise === "number") {
    help.textContent = `Promises ${(point.promise * 100).toFixed(0)}% agreement with the full-depth answer ` +
      "(calibrated on held-out images); earlier exits save more.";
  } else help.textContent = "How sure an exit must be before the image leaves early.";
  if (point && typeof point.label_cap === "number") {
    help.textContent += ` With more than ${point.label_cap} labels every block runs (exits rarely pay off there).`;
  }
}

/** Fill the model chooser from GET /models (shown only when the service serves more than one). */
async function loadModels() {
  const select = byId("model");
  const chosen = select.value;
  let listing;
  try {
    listing = await api("/models");
  } catch (error) {
    return; // loadModel reports why the service does not answer
  }
  select.replaceChildren();
  for (const entry of listing.models) {
    const option = document.createElement("option");
    option.value = entry.model;
    option.textContent = entry.default ? `${entry.model} (default)` : entry.model;
    option.title = `${entry.backbone}, checkpoint ${entry.checkpoint_id}`;
    select.append(option);
  }
  const names = listing.models.map((entry) => entry.model);
  select.value = names.includes(chosen) ? chosen : listing.default;
  byId("model-choice").hidden = names.length < 2;
}

async function loadModel() {
  const line = byId("model-line");
  await loadModels();
  const chosen = byId("model").value;
  try {
    state.model = await api(chosen ? `/model?model=${encodeURIComponent(chosen)}` : "/model");
  } catch (error) {
    state.model = null;
    line.textContent = error instanceof ApiError && error.status === 401
      ? "Enter the API key (in Options) to see the model; classification will use it too."
      : `The model description is unavailable: ${explain(error).join(" ")}`;
    return;
  }
  const model = state.model;
  line.textContent = `Model ${model.model}: ${model.num_layers} blocks, ${model.image_size} px, ` +
    (model.quant_mode === "none" ? "FP32" : `INT8 (${model.quant_mode} mode, ${model.quantized_modules} modules)`) +
    (model.candidate_layers.length === 0 ? ", no exit heads."
      : model.candidate_layers.length === 1 ? `, one exit head, after block ${model.candidate_layers[0]}.`
        : `, exit heads after blocks ${model.candidate_layers.join(", ")}.`);
  const select = byId("operating-point");
  const chosenPoint = select.value;
  select.replaceChildren();
  const names = Object.keys(model.operating_points);
  if (!names.includes(FULL) && fullDepthPoint() === null) {
    byId("compare").disabled = true;
    byId("compare-help").textContent = "This model offers no full-depth operating point to compare with.";
  } else {
    byId("compare").disabled = false;
    byId("compare-help").textContent = "Sends the image twice: once as chosen, once through every block.";
  }
  for (const name of names) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name === model.default_operating_point ? `${name} (default)` : name;
    select.append(option);
  }
  select.value = names.includes(chosenPoint) ? chosenPoint : model.default_operating_point;
  describeOperatingPoint();
  byId("templates").placeholder = model.default_templates.join("\n");
  byId("templates-help").textContent =
    `Empty: the model's own ${model.default_templates.length} templates (shown greyed).`;
}

// ---- input -------------------------------------------------------------------------------------------------

function setFile(file) {
  state.file = file || null;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = null;
  const figure = byId("preview-figure");
  if (!state.file) {
    figure.hidden = true;
    return;
  }
  state.previewUrl = URL.createObjectURL(state.file);
  const preview = byId("preview");
  preview.src = state.previewUrl;
  byId("preview-caption").textContent = `${state.file.name}, ${formatBytes(state.file.size)}`;
  figure.hidden = false;
}

function parseLabels() {
  return byId("labels").value.split(",").map((label) => label.trim()).filter((label) => label.length > 0);
}

function parseTemplates() {
  return byId("templates").value.split("\n").map((line) => line.trim()).filter((line) => line.length > 0);
}

async function classify(operatingPoint) {
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  for (const label of parseLabels()) form.append("labels", label);
  for (const template of parseTemplates()) form.append("templates", template);
  form.append("top_k", byId("top-k").value || "5");
  if (operatingPoint) form.append("operating_point", operatingPoint);
  if (byId("model").value) form.append("model", byId("model").value);
  const started = performance.now();
  const result = await api("/classify", { method: "POST", body: form });
  result.roundTripMs = performance.now() - started;
  return result;
}

// ---- output ------------------------------------------------------------------------------------------------

function renderBars(list, predictions) {
  list.replaceChildren();
  for (const prediction of predictions) {
    const item = document.createElement("li");
    item.dataset.label = prediction.label;
    item.dataset.score = String(prediction.score);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = prediction.label;
    const track = document.createElement("span");
    track.className = "track";
    track.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = `${(prediction.score * 100).toFixed(1)}%`;
    track.append(fill);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `${(prediction.score * 100).toFixed(1)}%`;
    item.append(label, track, score);
    list.append(item);
  }
}

/** One cell per block: ran, answered (the exit), or skipped; exit heads and pruned layers marked. */
function renderStrip(list, result) {
  const candidates = new Set(state.model ? state.model.candidate_layers : []);
  const pruned = new Set(state.model ? state.model.pruned_layers.map((p) => p.layer) : []);
  list.replaceChildren();
  for (let block = 1; block <= result.num_layers; block += 1) {
    const cell = document.createElement("li");
    let role;
    if (block < result.exit_layer) role = "ran";
    else if (block === result.exit_layer) role = "exit";
    else role = "skipped";
    cell.className = role;
    if (pruned.has(block)) cell.classList.add("pruned");
    cell.dataset.block = String(block);
    cell.dataset.state = role;
    const words = { ran: "ran", exit: result.exit_path === "head" ? "answered through its exit head" :
      "answered through the full CLIP path", skipped: "skipped" }[role];
    const extra = candidates.has(block) ? (pruned.has(block) ? ", exit head pruned" : ", has an exit head") : "";
    cell.setAttribute("aria-label", `block ${block}: ${words}${extra}`);
    cell.title = `block ${block}: ${words}${extra}`;
    cell.append(document.createTextNode(String(block)));
    const marker = document.createElement("span");
    marker.className = "marker";
    marker.setAttribute("aria-hidden", "true");
    marker.textContent = candidates.has(block) && !pruned.has(block) ? "◆" : "";
    cell.append(marker);
    list.append(cell);
  }
}

function addFact(list, term, value) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = value;
  list.append(dt, dd);
}

function renderFacts(list, result) {
  list.replaceChildren();
  const skipped = result.num_layers - result.exit_layer;
  addFact(list, "Exit", result.exit_path === "head"
    ? `block ${result.exit_layer} of ${result.num_layers} (exit head, gate ${result.gate_probability.toFixed(2)}); ` +
      `${skipped} block${skipped === 1 ? "" : "s"} skipped`
    : `full depth: all ${result.num_layers} blocks, CLIP's own head`);
  addFact(list, "FLOPs spent", `${(result.flops * 1000).toFixed(1)} MFLOPs`);
  addFact(list, "FLOPs saved", `${(result.flops_saved * 100).toFixed(1)}% of full depth`);
  addFact(list, "Operating point", result.operating_point);
  const t = result.timing_ms;
  addFact(list, "Time", `decode ${t.decode.toFixed(1)} ms · queue ${t.queue.toFixed(1)} ms · ` +
    `inference ${t.inference.toFixed(1)} ms · round trip ${result.roundTripMs.toFixed(0)} ms`);
}

function renderComparison(early, full) {
  const panel = byId("comparison");
  if (!full) {
    panel.hidden = true;
    delete panel.dataset.agree;
    return;
  }
  const agree = early.predictions[0].label === full.predictions[0].label;
  panel.dataset.agree = String(agree);
  const sentence = byId("agreement");
  sentence.replaceChildren();
  const verdict = document.createElement("span");
  verdict.className = agree ? "agree" : "disagree";
  verdict.textContent = agree ? "Same answer at full depth." : "Full depth answers differently.";
  sentence.append(verdict, document.createTextNode(
    ` Early exit: “${early.predictions[0].label}” after block ${early.exit_layer}; full depth: ` +
    `“${full.predictions[0].label}” after block ${full.exit_layer}. The early answer spent ` +
    `${(early.flops * 1000).toFixed(1)} of full depth's ${(full.flops * 1000).toFixed(1)} MFLOPs.`));
  renderBars(byId("full-bars"), full.predictions);
  renderFacts(byId("full-facts"), full);
  panel.hidden = false;
}

// ---- wiring ------------------------------------------------------------------------------------------------

async function onSubmit(event) {
  event.preventDefault();
  clearError();
  const status = byId("status");
  if (!state.file) {
    showMessage("No image yet.", "Choose or drop an image first.", "input");
    byId("image").focus();
    return;
  }
  if (parseLabels().length === 0) {
    showMessage("No labels yet.", "Type at least one label, or pick a preset.", "input");
    byId("labels").focus();
    return;
  }
  const chosen = byId("operating-point").value;
  const fullPoint = byId("compare").checked ? fullDepthPoint() : null;
  const button = byId("submit");
  button.disabled = true;
  byId("results").setAttribute("aria-busy", "true");
  status.textContent = fullPoint ? "Classifying (as chosen and at full depth)…" : "Classifying…";
  try {
    const [early, full] = await Promise.all([classify(chosen), fullPoint ? classify(fullPoint) : null]);
    renderBars(byId("bars"), early.predictions);
    renderStrip(byId("exit-strip"), early);
    renderFacts(byId("facts"), early);
    renderComparison(early, full);
    byId("answer").hidden = false;
    const top = early.predictions[0];
    status.textContent = `“${top.label}” (${(top.score * 100).toFixed(1)}%), answered at block ` +
      `${early.exit_layer} of ${early.num_layers}, ${(early.flops_saved * 100).toFixed(1)}% of FLOPs saved.`;
  } catch (error) {
    byId("answer").hidden = true;
    status.textContent = "No answer.";
    showError(error);
    if (error instanceof ApiError && error.status === 401) byId("api-key").focus();
  } finally {
    button.disabled = false;
    byId("results").removeAttribute("aria-busy");
  }
}

function setUp() {
  const presets = byId("presets");
  for (const [name, labels] of Object.entries(PRESETS)) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = name;
    button.title = labels.join(", ");
    button.addEventListener("click", () => {
      byId("labels").value = labels.join(", ");
    });
    presets.append(button);
  }
  byId("image").addEventListener("change", (event) => setFile(event.target.files[0]));
  byId("preview").addEventListener("error", () => {
    if (state.file) byId("preview-caption").textContent = `${state.file.name}: the browser cannot preview this file.`;
  });
  const zone = byId("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    if (event.dataTransfer.files.length > 0) {
      byId("image").files = event.dataTransfer.files;
      setFile(event.dataTransfer.files[0]);
    }
  });
  // A new key may unlock /model (and with it the operating points).
  byId("api-key").addEventListener("change", loadModel);
  byId("operating-point").addEventListener("change", describeOperatingPoint);
  byId("model").addEventListener("change", loadModel);
  byId("classify-form").addEventListener("submit", onSubmit);
  loadModel();
}

document.addEventListener("DOMContentLoaded", setUp);
