// Loomwatch review page. Everything it shows comes from the API, with the key the user gave
// (sent as the X-API-Key header, kept in this tab's sessionStorage, never put in a URL).
// Text from the service (file names, notes, reasons) only ever goes into textContent, never
// into HTML, so nothing a user typed or uploaded can run here.
"use strict";

const VERDICTS = { real_defect: "real defect", false_alarm: "false alarm", missed_defect: "missed defect" };
const MIN_SCALE = 0.6; // wrapped, a strip gets as many rows as keep it at least this scale
const views = []; // {holder, picture, heat, result}: redrawn when the view options change
const thumbnails = []; // object URLs of the recent list, released on refresh

const $ = (id) => document.getElementById(id);

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

// ---- the API --------------------------------------------------------------------------------

function headers(extra) {
  const all = Object.assign({}, extra || {});
  const key = sessionStorage.getItem("loomwatch.key");
  if (key) all["X-API-Key"] = key;
  return all;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const response = await fetch(path, opts);
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.detail) detail = body.detail;
    } catch (ignored) {
      // not JSON: keep the status line
    }
    if (response.status === 401) detail = "the service needs an API key: enter it above";
    const error = new Error(detail);
    error.status = response.status;
    throw error;
  }
  return response;
}

function percent(value) {
  return `${(100 * Math.max(0, Math.min(1, value))).toFixed(1)}%`;
}

// ---- the model ------------------------------------------------------------------------------

async function loadModel() {
  const line = $("model");
  try {
    const model = await (await api("model")).json();
    const fabric = model.training && model.training.fabric ? `, fabric ${model.training.fabric}` : "";
    line.textContent = `model: ${model.name} version ${model.version} (${model.type}${fabric})`;
    line.className = "muted";
  } catch (error) {
    line.textContent = `model: ${error.message}`;
    line.className = "error";
  }
}

// ---- the overlay ----------------------------------------------------------------------------

function loadImage(source) {
  return new Promise((resolve) => {
    const picture = new Image();
    picture.onload = () => resolve(picture);
    picture.onerror = () => resolve(null); // e.g. TIFF, which browsers do not show
    picture.src = source;
  });
}

// The heatmap arrives as a colour picture (blue 0 .. red 1, OpenCV's JET). Cool colours are
// made transparent, so the fabric stays readable and only what scores near or above the pixel
// threshold (green to red) is tinted, as in the API's own overlay.
function warmOnly(heat) {
  const canvas = element("canvas");
  canvas.width = heat.naturalWidth;
  canvas.height = heat.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(heat, 0, 0);
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height);
  const data = pixels.data;
  for (let i = 0; i < data.length; i += 4) {
    const warmth = (data[i] - data[i + 2]) / 255; // red minus blue: -1 (cold) .. 1 (hot)
    data[i + 3] = Math.round(255 * Math.max(0, Math.min(1, warmth + 0.5)));
  }
  context.putImageData(pixels, 0, 0);
  return canvas;
}

function drawView(view) {
  const { holder, picture, heat, result } = view;
  const width = result.image.width;
  const height = result.image.height;
  const wrap = $("wrap").checked;
  const room = holder.clientWidth || 1200;
  const rows = wrap ? Math.max(1, Math.ceil((width * MIN_SCALE) / room)) : 1;
  const step = Math.ceil(width / rows);
  const alpha = Number($("heat").value) / 100;
  const line = Math.max(1, Math.round(step / 700));
  holder.replaceChildren();
  holder.classList.toggle("natural", !wrap);
  for (let row = 0; row < rows; row += 1) {
    const left = row * step;
    const span = Math.min(step, width - left);
    const canvas = element("canvas", null, "overlay");
    canvas.width = step;
    canvas.height = height;
    canvas.dataset.row = String(row);
    const context = canvas.getContext("2d");
    context.fillStyle = "#fff";
    context.fillRect(0, 0, step, height);
    if (picture) {
      context.drawImage(picture, left, 0, span, height, 0, 0, span, height);
    } else {
      context.fillStyle = "#888";
      context.fillRect(0, 0, span, height);
    }
    if (heat && alpha > 0) {
      context.globalAlpha = alpha;
      context.drawImage(heat, left, 0, span, height, 0, 0, span, height);
      context.globalAlpha = 1;
    }
    const boxes = (regions, colour, width, pad, dash) => {
      context.strokeStyle = colour;
      context.lineWidth = width;
      context.setLineDash(dash);
      for (const region of regions) {
        const box = region.bbox;
        if (box.x + box.width < left || box.x > left + span) continue;
        context.strokeRect(box.x - left - pad, box.y - pad, box.width + 2 * pad, box.height + 2 * pad);
      }
      context.setLineDash([]);
    };
    boxes(result.suppression.regions, "#f5c400", line, 1, [4 * line, 3 * line]);
    boxes(result.regions, "#e00000", 2 * line, 3 * line, []);
    holder.append(canvas);
  }
}

function redrawAll() {
  for (const view of views) drawView(view);
}

// ---- one scored image -----------------------------------------------------------------------

function meter(score, threshold) {
  const box = element("div", null, "meter");
  box.title = `score ${score.toFixed(3)}, threshold ${threshold.toFixed(3)} (normalised)`;
  const fill = element("div", null, score >= threshold ? "fill over" : "fill");
  fill.style.width = percent(score);
  const mark = element("div", null, "mark");
  mark.style.left = percent(threshold);
  box.append(fill, mark);
  const caption = element("p", `score ${score.toFixed(3)} against threshold ${threshold.toFixed(3)}`, "muted");
  const holder = element("div");
  holder.append(box, caption);
  return holder;
}

function regionTable(caption, regions, withReason) {
  const table = element("table", null, "regions");
  table.append(element("caption", `${caption} (${regions.length})`));
  const head = element("tr");
  const names = ["x", "y", "width", "height", "area px", "peak", "mean"];
  if (withReason) names.unshift("reason");
  for (const name of names) head.append(element("th", name));
  table.append(head);
  for (const region of regions) {
    const row = element("tr");
    const cells = [region.bbox.x, region.bbox.y, region.bbox.width, region.bbox.height,
      region.area, region.peak.toFixed(3), region.mean.toFixed(3)];
    if (withReason) cells.unshift(region.reason.replaceAll("_", " "));
    for (const cell of cells) row.append(element("td", cell));
    table.append(row);
  }
  return table;
}

function feedbackWidget(predictionId, current) {
  const widget = $("feedback-template").content.firstElementChild.cloneNode(true);
  const saved = widget.querySelector(".saved");
  if (current) saved.textContent = `said: ${VERDICTS[current] || current}`;
  if (!predictionId) {
    for (const control of widget.querySelectorAll("button, input")) control.disabled = true;
    saved.textContent = "not recorded (no feedback database): feedback is not possible";
    return widget;
  }
  for (const button of widget.querySelectorAll("button[data-verdict]")) {
    button.addEventListener("click", async () => {
      const verdict = button.dataset.verdict;
      const body = { verdict };
      const note = widget.querySelector(".note").value.trim();
      if (note) body.note = note;
      const reviewer = sessionStorage.getItem("loomwatch.reviewer");
      if (reviewer) body.reviewer = reviewer;
      saved.textContent = "saving...";
      saved.className = "saved";
      try {
        await api(`predictions/${encodeURIComponent(predictionId)}/feedback`, {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify(body),
        });
        saved.textContent = `saved: ${VERDICTS[verdict]}`;
        widget.dataset.state = "saved";
        widget.dataset.verdict = verdict;
        const row = widget.closest("#recent tr");
        if (row) row.querySelector(".verdict").textContent = VERDICTS[verdict];
        else loadRecent(); // the list shows the new verdict
      } catch (error) {
        saved.textContent = `not saved: ${error.message}`;
        saved.className = "saved error";
      }
    });
  }
  return widget;
}

async function score(file) {
  const card = element("article", null, "result");
  card.dataset.state = "scoring";
  const title = element("h3", file.name);
  const status = element("p", "scoring...", "muted");
  card.append(title, status);
  $("results").prepend(card);
  const form = new FormData();
  form.append("file", file, file.name);
  let result;
  try {
    result = await (await api("predict?heatmap=true&mask=none", { method: "POST", body: form })).json();
  } catch (error) {
    status.textContent = `not scored: ${error.message}`;
    status.className = "error";
    card.dataset.state = "failed";
    return;
  }
  const badge = element("span", result.decision, `badge ${result.decision}`);
  title.append(" ", badge);
  status.textContent = result.decision_reason;
  const holder = element("div", null, "view");
  const source = URL.createObjectURL(file);
  const [picture, heat] = await Promise.all([
    loadImage(source),
    result.heatmap ? loadImage(`data:image/png;base64,${result.heatmap.png_base64}`) : null,
  ]);
  const view = { holder, picture, heat: heat ? warmOnly(heat) : null, result };
  views.push(view);
  const settings = result.suppression.settings;
  const settingsLine = element(
    "p",
    `suppression in force: min area ${settings.min_region_area} px, min peak ${settings.min_region_peak}, ` +
      `smoothing ${settings.smoothing_sigma} px, min valid fraction ${settings.min_valid_fraction}, ` +
      `veto margin ${settings.veto_margin}` + (result.suppression.vetoed_decision ? " (alarm vetoed)" : ""),
    "muted",
  );
  const size = element("p", `${result.image.width} x ${result.image.height} px, ${result.image.tiles} tiles, ` +
    `model ${result.model.name} ${result.model.version}, ${Math.round(result.timings_ms.total)} ms`, "muted");
  card.append(
    meter(result.score, result.threshold),
    holder,
    size,
    regionTable("kept regions", result.regions, false),
    regionTable("suppression log", result.suppression.regions, true),
    settingsLine,
    feedbackWidget(result.prediction_id, null),
  );
  drawView(view); // once in the page, where the view knows its width
  card.dataset.state = "done";
  if (result.prediction_id) card.dataset.prediction = result.prediction_id;
  loadRecent();
}

async function scoreAll(files) {
  for (const file of files) await score(file); // one at a time: the service scores on CPU
}

// ---- recent predictions ---------------------------------------------------------------------

async function thumbnail(cell, id) {
  try {
    const blob = await (await api(`predictions/${encodeURIComponent(id)}/thumbnail`)).blob();
    const url = URL.createObjectURL(blob);
    thumbnails.push(url);
    const picture = element("img", null, "thumb");
    picture.alt = "overlay of the scored image";
    picture.src = url;
    cell.append(picture);
  } catch (error) {
    cell.append(element("span", "no picture", "muted"));
  }
}

function fillFabrics(fabrics) {
  const select = $("f-fabric");
  const chosen = select.value;
  select.replaceChildren(element("option", "all"));
  select.firstElementChild.value = "";
  for (const fabric of fabrics) {
    const option = element("option", fabric);
    option.value = fabric;
    select.append(option);
  }
  select.value = fabrics.includes(chosen) ? chosen : "";
}

async function loadRecent() {
  const status = $("recent-status");
  const query = new URLSearchParams({ limit: "50" });
  for (const [name, id] of [["decision", "f-decision"], ["fabric", "f-fabric"], ["verdict", "f-verdict"]]) {
    if ($(id).value) query.set(name, $(id).value);
  }
  let listing;
  try {
    listing = await (await api(`predictions?${query}`)).json();
  } catch (error) {
    status.textContent = `recent predictions: ${error.message}`;
    status.className = "error";
    return;
  }
  while (thumbnails.length) URL.revokeObjectURL(thumbnails.pop());
  fillFabrics(listing.fabrics);
  status.textContent = `${listing.count} shown, newest first`;
  status.className = "muted";
  const body = $("recent").tBodies[0];
  body.replaceChildren();
  for (const item of listing.items) {
    const row = element("tr");
    row.dataset.prediction = item.id;
    const picture = element("td");
    if (item.has_thumbnail) thumbnail(picture, item.id);
    else picture.append(element("span", "no picture", "muted"));
    const when = new Date(item.created_at);
    row.append(
      picture,
      element("td", when.toLocaleString()),
      element("td", item.filename || "(no name)", "file"),
      element("td", item.fabric || "-"),
      element("td", item.decision, `badge ${item.decision}`),
      element("td", `${item.score.toFixed(3)} / ${item.threshold.toFixed(3)}`),
      element("td", item.verdict ? VERDICTS[item.verdict] : "-", "verdict"),
    );
    const notes = item.feedback.filter((entry) => entry.note).map((entry) => entry.note);
    const cell = element("td");
    cell.append(feedbackWidget(item.id, item.verdict));
    if (notes.length) cell.append(element("p", `notes: ${notes.join(" | ")}`, "notes"));
    row.append(cell);
    body.append(row);
  }
}

// ---- wiring ---------------------------------------------------------------------------------

function start() {
  $("key").value = sessionStorage.getItem("loomwatch.key") || "";
  $("reviewer").value = sessionStorage.getItem("loomwatch.reviewer") || "";
  $("access").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("loomwatch.key", $("key").value.trim());
    sessionStorage.setItem("loomwatch.reviewer", $("reviewer").value.trim());
    loadModel();
    loadRecent();
  });
  $("files").addEventListener("change", () => {
    scoreAll(Array.from($("files").files));
    $("files").value = "";
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    scoreAll(Array.from(event.dataTransfer.files));
  });
  $("wrap").addEventListener("change", redrawAll);
  let resizing = 0;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(redrawAll, 200);
  });
  $("heat").addEventListener("input", redrawAll);
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    loadRecent();
  });
  for (const id of ["f-decision", "f-fabric", "f-verdict"]) $(id).addEventListener("change", loadRecent);
  loadModel();
  loadRecent();
}

window.addEventListener("DOMContentLoaded", start);
