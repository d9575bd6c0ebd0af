// EarthGPT whole-scene page: upload a large raster, see its overview, run the model on every
// tile in the background, watch tiles and boxes fill in, download the GeoJSON.
// The server streams the upload to disk and sends only a downsampled PNG overview back, so
// the page never holds or decodes the raster itself.
"use strict";

const state = { info: null, scene: null, image: null, tiles: [], boxes: [], final: false,
                source: null, running: false };
const TILE_FILL = "rgba(52, 199, 89, 0.22)";
const BOX_COLOURS = ["#ff3b30", "#ffcc00", "#0a84ff", "#ff9500", "#af52de", "#00c7be"];
const DISPLAY_SIDE = 640;

function colourFor(label) {
  let h = 0;
  for (const c of label || "") h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return BOX_COLOURS[h % BOX_COLOURS.length];
}

function formatEta(seconds) {
  const s = Math.round(seconds);
  const pad = (v) => String(v).padStart(2, "0");
  return `${Math.floor(s / 3600)}h${pad(Math.floor(s / 60) % 60)}m${pad(s % 60)}s`;
}

// Overview pixels -> canvas pixels: a small overview is blown up by a whole factor (its
// pixels stay square and sharp), a large one shrunk to fit.
function displayScale() {
  const side = Math.max(state.image.naturalWidth, state.image.naturalHeight);
  return side < DISPLAY_SIDE ? Math.max(1, Math.floor(DISPLAY_SIDE / side)) : DISPLAY_SIDE / side;
}

// Scene pixels -> canvas pixels: through the overview's scale, then the display's.
function canvasScale() {
  return displayScale() / state.scene.overview_scale;
}

function draw() {
  const canvas = $("scene-canvas");
  const img = state.image;
  if (!img) { canvas.dataset.image = "none"; return; }
  const display = displayScale();
  canvas.width = Math.round(img.naturalWidth * display);
  canvas.height = Math.round(img.naturalHeight * display);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = display < 1;
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  const s = canvasScale();
  ctx.fillStyle = TILE_FILL;  // tiles done so far, shaded
  for (const [col, row, w, h] of state.tiles) ctx.fillRect(col * s, row * s, w * s, h * s);
  for (const b of state.boxes) {
    // Whole canvas pixels: the 2-pixel stroke then covers its pixels fully (no blending).
    const c = b.corners.map((v) => Math.round(v * s));
    ctx.beginPath();
    ctx.moveTo(c[0], c[1]);
    for (let k = 2; k < 8; k += 2) ctx.lineTo(c[k], c[k + 1]);
    ctx.closePath();
    // A dark rim under the colour: a box stays visible on an object of its own colour.
    ctx.lineWidth = 4;
    ctx.strokeStyle = "#000";
    ctx.stroke();
    ctx.lineWidth = 2;
    ctx.strokeStyle = colourFor(b.label);
    ctx.stroke();
  }
  canvas.dataset.image = "loaded";
  canvas.dataset.tiles = String(state.tiles.length);
  canvas.dataset.boxes = String(state.boxes.length);
  $("placeholder").hidden = true;
}

function listFound() {
  const counts = {};
  for (const b of state.boxes) {
    const key = b.answer !== undefined ? `tile ${b.tile}: ${b.answer}` : (b.label || "region");
    counts[key] = (counts[key] || 0) + 1;
  }
  $("found-list").replaceChildren(...Object.entries(counts).map(([label, n]) => {
    const li = document.createElement("li");
    li.textContent = `${label}${n > 1 ? ` × ${n}` : ""}`;
    li.dataset.label = label;
    li.dataset.count = String(n);
    return li;
  }));
}

function showProgress(p) {
  $("tiles-bar").max = p.total;
  $("tiles-bar").value = p.done;
  const rate = `${p.tiles_per_s.toFixed(2)} tiles/s`;
  $("progress-text").textContent =
    `tiles ${p.done}/${p.total} · ${rate} · ETA ${formatEta(p.eta_s)}`;
}

function setRunning(running) {
  state.running = running;
  $("run").disabled = running || !state.scene;
  $("cancel").disabled = !running;
}

async function uploadScene(file) {
  if (state.running) return;
  setStatus(`uploading ${file.name} (${(file.size / 2 ** 20).toFixed(1)} MB)…`);
  const response = await fetch(`/api/scenes?name=${encodeURIComponent(file.name)}`, {
    method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" } });
  if (!response.ok) { setStatus(await errorText(response), true); return; }
  const scene = await response.json();
  Object.assign(state, { scene, tiles: [], boxes: [], final: false });
  $("downloads").replaceChildren();
  $("progress-text").textContent = "";
  $("tiles-bar").value = 0;
  await new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => { state.image = img; draw(); resolve(); };
    img.onerror = () => reject(new Error("the overview did not load"));
    img.src = scene.overview_url;
  });
  const where = scene.georeferenced ? scene.crs : "no georeference";
  $("scene-facts").textContent =
    `${scene.name}: ${scene.width}×${scene.height} px, ${scene.bands} band(s), ${where}`;
  listFound();
  setRunning(false);
  setStatus(scene.note || "ready: pick a task and run it on every tile", Boolean(scene.note));
}

function follow(sceneId) {
  // GET Server-Sent Events: EventSource resumes after the last id by itself if cut.
  const source = new EventSource(`/api/scenes/${sceneId}/events`);
  state.source = source;
  const stop = () => { source.close(); state.source = null; setRunning(false); };
  source.addEventListener("log", (e) => setStatus(JSON.parse(e.data).message));
  source.addEventListener("progress", (e) => {
    const p = JSON.parse(e.data);
    state.tiles.push(...p.windows);
    state.boxes.push(...p.boxes);
    showProgress(p);
    draw();
    listFound();
  });
  source.addEventListener("done", (e) => {
    const d = JSON.parse(e.data);
    state.boxes = d.boxes;  // merged across tile borders, as in the GeoJSON
    state.final = true;
    draw();
    listFound();
    const links = Object.entries(d.downloads).map(([kind, url]) => {
      const a = document.createElement("a");
      a.href = url;
      a.className = "button";
      a.textContent = { geojson: state.scene.georeferenced ? "GeoJSON (WGS84)" : "GeoJSON (pixels)",
                        "scene_crs.geojson": "GeoJSON (scene CRS)", png: "overview PNG" }[kind];
      a.dataset.kind = kind;
      return a;
    });
    $("downloads").replaceChildren(...links);
    $("scene-canvas").dataset.state = "done";
    setStatus(`done: ${d.boxes.length} found on ${d.tiles} tiles in ${d.seconds.toFixed(1)} s`);
    stop();
  });
  source.addEventListener("cancelled", (e) => {
    setStatus(JSON.parse(e.data).message);
    $("scene-canvas").dataset.state = "cancelled";
    stop();
  });
  source.addEventListener("error", (e) => {
    if (e.data) {  // the job's own error event (a lost connection has no data: it retries)
      setStatus(JSON.parse(e.data).message, true);
      $("scene-canvas").dataset.state = "error";
      stop();
    }
  });
}

// The CLI's --tile and --overlap; left empty, the server's defaults.
function tiling() {
  const out = {};
  for (const name of ["tile", "overlap"]) {
    const value = $(name).value.trim();
    if (value !== "") out[name] = parseInt(value, 10);
  }
  return out;
}

async function runJob() {
  if (!state.scene || state.running) return;
  const task = document.querySelector("input[name=task]:checked").value;
  const question = $("scene-question").value.trim();
  if (task !== "detect" && !question) {
    setStatus(task === "ground" ? "type what to find" : "type the question to ask every tile",
              true);
    return;
  }
  const response = await fetch(`/api/scenes/${state.scene.id}/job`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ task, question, ...tiling() }) });
  if (!response.ok) { setStatus(await errorText(response), true); return; }
  Object.assign(state, { tiles: [], boxes: [], final: false });
  $("downloads").replaceChildren();
  $("scene-canvas").dataset.state = "running";
  draw();
  setRunning(true);
  setStatus("reading tiles…");
  follow(state.scene.id);
}

async function init() {
  const response = await fetch("/api/info");
  state.info = await response.json();
  const m = state.info.model;
  $("model-info").textContent = `${m.description} · ${m.image_size}px tiles`;
  if (!state.info.scene_limits) setStatus("this server takes no scenes", true);
  else setStatus("upload a scene");
}

$("scene-input").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (file) uploadScene(file).catch((err) => setStatus(err.message, true));
  e.target.value = "";
});
for (const radio of document.querySelectorAll("input[name=task]")) {
  radio.addEventListener("change", () => {
    $("scene-question").disabled = document.querySelector("input[name=task]:checked").value
      === "detect";
  });
}
$("run").addEventListener("click", () => runJob().catch((err) => setStatus(err.message, true)));
$("cancel").addEventListener("click", async () => {
  const response = await fetch(`/api/scenes/${state.scene.id}/job`, { method: "DELETE" });
  setStatus(response.ok ? "cancelling after this batch of tiles…" : await errorText(response),
            !response.ok);
});
// For tests and the console.
window.earthgptScene = { state, draw, canvasScale, colourFor };
init().catch((err) => setStatus(`cannot reach the server: ${err.message}`, true));
