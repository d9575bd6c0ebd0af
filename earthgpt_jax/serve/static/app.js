// EarthGPT web chat: upload or pick an image, ask, watch the answer stream in, see its boxes.
// Plain JS on purpose: the page is one form, one thread and one canvas.
"use strict";

const state = { info: null, conv: null, image: null, boxes: [], busy: false };
const PALETTE = ["#ff3b30", "#ffcc00", "#34c759", "#0a84ff", "#ff9500", "#af52de", "#00c7be",
                 "#ff2d55"];
const DISPLAY_SIDE = 512;  // longest side of the picture on screen, in CSS pixels

// ------------------------------------------------------------------------------ the image

function colourFor(label, index) {
  if (!label) return PALETTE[index % PALETTE.length];
  let h = 0;
  for (const c of label) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return PALETTE[h % PALETTE.length];
}

function displayScale(width, height) {
  const side = Math.max(width, height);
  // Small scenes are blown up by a whole factor so their pixels stay square and sharp.
  return side < DISPLAY_SIDE ? Math.max(1, Math.floor(DISPLAY_SIDE / side)) : DISPLAY_SIDE / side;
}

function drawCanvas() {
  const canvas = $("image-canvas");
  const img = state.image;
  if (!img) {
    canvas.dataset.image = "none";
    canvas.dataset.boxes = "0";
    $("placeholder").hidden = false;
    return;
  }
  const scale = displayScale(img.naturalWidth, img.naturalHeight);
  canvas.width = Math.round(img.naturalWidth * scale);
  canvas.height = Math.round(img.naturalHeight * scale);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  ctx.lineWidth = 2;
  ctx.font = "bold 13px system-ui, sans-serif";
  ctx.textBaseline = "top";
  state.boxes.forEach((b, i) => {
    // Whole canvas pixels: the 2-pixel stroke then covers its pixels fully (no blending).
    const [x0, y0, x1, y1] = b.pixels.map((v) => Math.round(v * scale));
    const colour = colourFor(b.label, i);
    ctx.strokeStyle = colour;
    if (b.corner_pixels) {  // an oriented box: its four corners; `pixels` encloses them
      const c = b.corner_pixels.map((v) => v * scale);
      ctx.beginPath();
      ctx.moveTo(c[0], c[1]);
      for (let k = 2; k < 8; k += 2) ctx.lineTo(c[k], c[k + 1]);
      ctx.closePath();
      ctx.stroke();
    } else {
      ctx.strokeRect(x0, y0, Math.max(x1 - x0, 1), Math.max(y1 - y0, 1));
    }
    const text = b.label || `box ${i + 1}`;
    const tw = ctx.measureText(text).width + 6;
    const ty = y0 >= 17 ? y0 - 17 : Math.min(y1 + 1, canvas.height - 17);
    ctx.fillStyle = colour;
    ctx.fillRect(x0 - 1, ty, tw, 17);
    ctx.fillStyle = "#000";
    ctx.fillText(text, x0 + 2, ty + 2);
  });
  canvas.dataset.image = "loaded";
  canvas.dataset.boxes = String(state.boxes.length);
  $("placeholder").hidden = true;
  const list = $("box-list");
  list.replaceChildren(...state.boxes.map((b, i) => {
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colourFor(b.label, i);
    const px = (b.corner_pixels || b.pixels).map((v) => Math.round(v)).join(", ");
    li.append(swatch, `${b.label || "region"}: [${px}] px`);
    li.dataset.label = b.label || "";
    return li;
  }));
}

function showImage(conv) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => { state.image = img; drawCanvas(); resolve(); };
    img.onerror = () => reject(new Error("the server's copy of the image did not load"));
    img.src = `${conv.image_url}?t=${Date.now()}`;
  });
}

async function openImage(blob, name) {
  if (state.busy) return;
  setStatus(`uploading ${name}…`);
  const response = await fetch(`/api/conversations?name=${encodeURIComponent(name)}`, {
    method: "POST", body: blob, headers: { "Content-Type": "application/octet-stream" } });
  if (!response.ok) {
    const message = await errorText(response);  // the server's own messages name the file
    setStatus(message.includes(name) ? message : `${name}: ${message}`, true);
    return;
  }
  const conv = await response.json();
  state.conv = conv;
  state.boxes = [];
  $("thread").replaceChildren();
  await showImage(conv);
  const bands = conv.bands === 1 ? "1 band (SAR / infrared style)" : `${conv.bands} bands`;
  $("image-facts").textContent = `${conv.name}: ${conv.width}×${conv.height} px, ${bands}`;
  note(`New conversation about ${conv.name}.`);
  setStatus("ready");
}

// ------------------------------------------------------------------------------ the chat

function note(text) {
  const el = document.createElement("div");
  el.className = "msg note";
  el.textContent = text;
  $("thread").append(el);
}

function bubble(kind, text) {
  const el = document.createElement("div");
  el.className = `msg ${kind}`;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  el.append(body);
  $("thread").append(el);
  $("thread").scrollTop = $("thread").scrollHeight;
  return el;
}

function decodingSettings() {
  const sampling = document.querySelector("input[name=mode]:checked").value === "sample";
  return {
    max_new_tokens: parseInt($("max-tokens").value, 10) || 128,
    temperature: sampling ? parseFloat($("temperature").value) || 0.7 : 0,
    top_p: sampling ? parseFloat($("top-p").value) || 0.9 : 1,
    seed: sampling ? Math.floor(Math.random() * 2 ** 31) : 0,
  };
}

function setBusy(busy) {
  state.busy = busy;
  for (const el of document.querySelectorAll("#shortcuts button, #send, #reset")) {
    el.disabled = busy;
  }
}

// Server-Sent Events over a POST body: EventSource only does GET, so the stream is parsed here.
async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      yield { event, data: data ? JSON.parse(data) : {} };
    }
  }
}

async function ask(question) {
  question = question.trim();
  if (!state.conv) { setStatus("upload or pick an image first", true); return; }
  if (state.busy) return;
  if (!question) { setStatus("the question is empty: type one, or pick a shortcut", true); return; }
  setBusy(true);
  bubble("user", question);
  const answer = bubble("assistant", "");
  answer.dataset.state = "waiting";
  const text = answer.querySelector(".text");
  setStatus("thinking…");
  try {
    const response = await fetch(`/api/conversations/${state.conv.id}/messages`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ question, ...decodingSettings() }) });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const { event, data } of readEvents(response)) {
      if (event === "start" && data.dropped_turns) {
        note(`(the ${data.dropped_turns} oldest turn(s) no longer fit the context)`);
      } else if (event === "token") {
        answer.dataset.state = "streaming";
        answer.dataset.chunks = String(Number(answer.dataset.chunks || 0) + 1);
        text.textContent += data.text;
        $("thread").scrollTop = $("thread").scrollHeight;
      } else if (event === "done") {
        text.textContent = data.answer;
        const meta = document.createElement("span");
        meta.className = "meta";
        const speed = data.tokens_per_s ? ` · ${data.tokens_per_s} tokens/s` : "";
        const count = data.tokens === 1 ? "1 token" : `${data.tokens} tokens`;
        meta.textContent = `${count} · first token ${data.ttft_s.toFixed(2)} s${speed}`;
        answer.append(meta);
        state.boxes = data.boxes || [];
        answer.dataset.boxes = String(state.boxes.length);
        drawCanvas();
        answer.dataset.state = "done";
        setStatus(state.boxes.length ? `${state.boxes.length} box(es) drawn` : "ready");
      } else if (event === "error") {
        throw new Error(data.message);
      }
    }
    if (answer.dataset.state !== "done") throw new Error("the answer stream ended early");
  } catch (err) {
    answer.dataset.state = "error";
    text.textContent = `error: ${err.message}`;
    setStatus(err.message, true);
  } finally {
    setBusy(false);
  }
}

async function resetConversation() {
  if (!state.conv || state.busy) return;
  const response = await fetch(`/api/conversations/${state.conv.id}/reset`, { method: "POST" });
  if (!response.ok) { setStatus(await errorText(response), true); return; }
  state.boxes = [];
  $("thread").replaceChildren();
  drawCanvas();
  note("Dialogue cleared; same image.");
  setStatus("ready");
}

// ------------------------------------------------------------------------------ wiring

async function init() {
  const response = await fetch("/api/info");
  state.info = await response.json();
  const m = state.info.model;
  $("model-info").textContent =
    `${m.description} · ${m.layers} layers × ${m.hidden_size} · ${m.image_size}px, ` +
    `${m.visual_tokens} visual tokens`;
  $("max-tokens").max = state.info.limits.max_new_tokens;
  for (const ex of state.info.examples) {
    const option = document.createElement("option");
    option.value = ex.url;
    option.textContent = ex.name;
    $("example-select").append(option);
  }
  $("example-select").disabled = state.info.examples.length === 0;
  setStatus("upload or pick an image");
}

$("file-input").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (file) openImage(file, file.name).catch((err) => setStatus(err.message, true));
  e.target.value = "";
});
$("example-select").addEventListener("change", async (e) => {
  const url = e.target.value;
  if (!url) return;
  const response = await fetch(url);
  if (!response.ok) { setStatus(await errorText(response), true); return; }
  await openImage(await response.blob(), url.split("/").pop());
});
$("ask-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = $("question").value;
  $("question").value = "";
  ask(q);
});
$("reset").addEventListener("click", resetConversation);
for (const button of document.querySelectorAll("#shortcuts button")) {
  button.addEventListener("click", () => {
    const task = button.dataset.task;
    const prompt = state.info.prompts[task];
    if (task === "find") {
      const phrase = $("find-phrase").value.trim();
      if (!phrase) { setStatus("type what to find next to the Find button", true); return; }
      ask(prompt.replace("{phrase}", phrase));
    } else {
      ask(prompt);
    }
  });
}
for (const radio of document.querySelectorAll("input[name=mode]")) {
  radio.addEventListener("change", () => {
    const sampling = document.querySelector("input[name=mode]:checked").value === "sample";
    $("temperature").disabled = !sampling;
    $("top-p").disabled = !sampling;
  });
}
// For tests and the console: the page's state and how it colours boxes.
window.earthgptChat = { state, colourFor, displayScale, drawCanvas };
init().catch((err) => setStatus(`cannot reach the server: ${err.message}`, true));
