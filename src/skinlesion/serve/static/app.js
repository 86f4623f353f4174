// The page's only script: upload one image to /api/predict?cam=true and draw the answer.
"use strict";

const $ = (id) => document.getElementById(id);
let fullNames = {};
let maxUploadMb = null;
let operatingPoint = null;  // e.g. "mel >= 0.75 (bias +1.17)" when the model has one

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function loadModelInfo() {
  try {
    const info = await (await fetch("/api/model")).json();
    fullNames = info.full_names || {};
    maxUploadMb = info.max_upload_mb;
    const metrics = info.metrics && info.metrics.balanced_accuracy !== undefined
      ? ` · validation balanced accuracy ${(100 * info.metrics.balanced_accuracy).toFixed(1)}%` : "";
    operatingPoint = info.operating_point ? info.operating_point.text : null;
    const point = operatingPoint ? ` · operating point ${operatingPoint}` : "";
    $("model-info").textContent =
      `model ${info.model_id} · ${info.backbone} at ${info.img_size} px · ${info.backend}${metrics}${point}`;
    if (info.metadata_prior) {
      for (const site of info.metadata_prior.sites) {
        const option = document.createElement("option");
        option.textContent = site;
        $("site").appendChild(option);
      }
      $("clinical").hidden = false;
    }
  } catch (err) {
    $("model-info").textContent = "could not reach the model API";
  }
}

// The operating point may call a class that is not the most probable one (e.g. melanoma at a set sensitivity).
function decisionNote(probabilities, prediction) {
  const top = Object.keys(probabilities).reduce((a, b) => (probabilities[b] > probabilities[a] ? b : a));
  return operatingPoint && top !== prediction
    ? ` · called ${prediction} by the operating point (${operatingPoint}) although ${top} is more probable`
    : "";
}

function drawBars(probabilities, prediction) {
  const bars = $("bars");
  bars.replaceChildren();
  for (const [cls, p] of Object.entries(probabilities)) {
    const top = cls === prediction ? " top" : "";
    const label = document.createElement("div");
    label.className = "bar-label" + top;
    label.setAttribute("role", "listitem");
    label.textContent = `${fullNames[cls] || cls} (${cls})`;
    const track = document.createElement("div");
    track.className = "bar-track";
    const fill = document.createElement("div");
    fill.className = "bar-fill" + top;
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    track.appendChild(fill);
    const value = document.createElement("div");
    value.className = "bar-value" + top;
    value.textContent = `${(100 * p).toFixed(1)}%`;
    bars.append(label, track, value);
  }
}

async function predict(file) {
  if (!file) return;
  if (maxUploadMb !== null && file.size > maxUploadMb * 1024 * 1024) {
    setStatus(`${file.name} is over the ${maxUploadMb} MB upload limit; choose a smaller image`, true);
    return;
  }
  $("result").hidden = true;
  $("overlay-figure").hidden = true;
  $("preview-caption").textContent = "Uploaded image";
  setStatus(`analysing ${file.name}…`);
  $("preview").src = URL.createObjectURL(file);
  const form = new FormData();
  form.append("file", file, file.name);
  if (!$("clinical").hidden) {  // only what the user filled in; empty = unknown
    for (const field of ["age", "sex", "site"]) {
      if ($(field).value !== "") form.append(field, $(field).value);
    }
  }
  let body;
  try {
    const response = await fetch("/api/predict?cam=true", { method: "POST", body: form });
    const text = await response.text();
    try {
      body = JSON.parse(text);
    } catch {
      body = { detail: text };  // e.g. the server's plain-text 413
    }
    if (!response.ok) {
      setStatus(`${response.status}: ${body.detail || "request failed"}`, true);
      return;
    }
  } catch (err) {
    setStatus(`request failed: ${err}`, true);
    return;
  }
  // Referred or out of distribution: the page says so instead of naming a class.
  $("prediction-name").textContent = body.out_of_distribution
    ? "No diagnosis: this does not look like a dermoscopic image the model was trained on"
    : body.refer ? "Refer to a dermatologist" : body.prediction_name;
  $("prediction").textContent = body.out_of_distribution || body.refer
    ? (body.prediction ? `model's call: ${body.prediction}` : "") : body.prediction;
  drawBars(body.probabilities, body.out_of_distribution ? null : body.prediction);
  if (body.overlay) {
    // The model's view (resized, centre-cropped) beside the map drawn on that same view: one field of view.
    $("preview").src = body.model_view;
    $("preview-caption").textContent = "What the model sees (resized and centre-cropped from your image)";
    $("overlay").src = body.overlay;
    $("overlay-caption").textContent = "Grad-CAM: regions that drove the predicted class — " +
      body.overlay_resolution.text;
    $("overlay-figure").hidden = false;
  }
  $("low-confidence").hidden = !body.refer;
  if (body.refer) {
    $("low-confidence").textContent = `Refer to a dermatologist: ${body.refer_reason}.`;
  }
  const set = body.prediction_set ? ` · plausible classes (conformal set): ${body.prediction_set.join(", ")}` : "";
  $("meta").textContent = `model ${body.model_id} · temperature ${body.temperature.toFixed(3)} · ` +
    `image ${body.image.width}×${body.image.height} px` +
    (body.metadata ? ` · metadata prior: ${Object.values(body.metadata).join(", ")}` : "") +
    set + decisionNote(body.probabilities, body.prediction);
  $("result").hidden = false;
  setStatus("");
}

function setUpDrop() {
  const drop = $("drop");
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => predict(e.dataTransfer.files[0]));
  $("file").addEventListener("change", (e) => predict(e.target.files[0]));
}

loadModelInfo();
setUpDrop();
