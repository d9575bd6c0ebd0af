// Helpers both pages use (index.html's chat, scene.html's whole scenes).
"use strict";

const $ = (id) => document.getElementById(id);

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.style.color = isError ? "var(--error)" : "";
}

// The API's one-line error ({"error": ...}) or the HTTP status when the body is not JSON.
async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}
