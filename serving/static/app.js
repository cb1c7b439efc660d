// The search page: pick or drop a photo, add words, POST /search, show the ranked items.
// A session id in localStorage is the A/B unit (X-Session-Id); clicking a result logs a click.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("search-form"), input = $("image-input"), drop = $("drop"), preview = $("preview");
const statusEl = $("status"), results = $("results"), latency = $("latency");
let chosen = null;   // the File to search with (from the picker or a drop)

const session = (() => {
  let id = localStorage.getItem("pailitao-session");
  if (!id) {
    id = (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2) + Date.now());
    localStorage.setItem("pailitao-session", id);
  }
  return id;
})();

function choose(file) {
  chosen = file || null;
  preview.hidden = !chosen;
  $("drop-hint").hidden = !!chosen;
  if (chosen) preview.src = URL.createObjectURL(chosen);
}

input.addEventListener("change", () => choose(input.files[0]));
["dragenter", "dragover"].forEach((ev) => drop.addEventListener(ev, (e) => {
  e.preventDefault();
  drop.classList.add("over");
}));
["dragleave", "drop"].forEach((ev) => drop.addEventListener(ev, (e) => {
  e.preventDefault();
  drop.classList.remove("over");
}));
drop.addEventListener("drop", (e) => {
  const file = e.dataTransfer.files[0];
  if (file) choose(file);
});
$("clear-button").addEventListener("click", () => {
  input.value = "";
  $("text-input").value = "";
  choose(null);
  results.replaceChildren();
  latency.hidden = true;
  statusEl.textContent = "";
});

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function render(body, roundTrip) {
  const ms = body.latency_ms;
  latency.querySelector("tbody tr").replaceChildren(
    ...["decode", "embed", "ann", "rerank", "total"].map((k) => cell(ms[k].toFixed(1))),
    cell(roundTrip.toFixed(1)));
  latency.hidden = false;
  $("meta").textContent = `model ${body.model} · index ${body.index_version} · variant ${body.variant} · request ${body.request_id}`;
  results.replaceChildren(...body.results.map((r) => {
    const li = document.createElement("li");
    li.className = "result";
    li.dataset.itemId = r.item_id;
    li.dataset.groupId = r.group_id || "";
    li.dataset.rank = r.rank;
    const img = document.createElement("img");
    img.src = "/images/" + encodeURIComponent(r.image_id);
    img.alt = r.title || r.item_id;
    img.loading = "lazy";
    const title = document.createElement("div");
    title.className = "title";
    title.textContent = r.title || r.item_id;
    const info = document.createElement("div");
    info.className = "info";
    info.textContent = `#${r.rank} · ${r.category_display || r.category || ""} · score ${r.score.toFixed(3)}` +
      (r.rerank_score == null ? "" : ` · rerank ${r.rerank_score.toFixed(3)}`) +
      (r.p_instance == null ? "" : ` · P(same product) ${(100 * r.p_instance).toFixed(0)}%`);
    li.append(img, title, info);
    li.addEventListener("click", () => fetch("/click", {
      method: "POST", headers: {"Content-Type": "application/json", "X-Session-Id": session},
      body: JSON.stringify({request_id: body.request_id, item_id: r.item_id}),
    }));
    return li;
  }));
  statusEl.textContent = `${body.results.length} results`;
}

form.addEventListener("submit", async (e) => {
  e.preventDefault();
  const data = new FormData();
  if (chosen) data.append("image", chosen, chosen.name);
  const text = $("text-input").value.trim();
  if (text) data.append("text", text);
  if (!chosen && !text) {
    statusEl.textContent = "Choose a photo or type a few words.";
    return;
  }
  statusEl.textContent = "Searching…";
  const t0 = performance.now();
  try {
    const resp = await fetch("/search", {method: "POST", body: data, headers: {"X-Session-Id": session}});
    const body = await resp.json();
    if (!resp.ok) {
      results.replaceChildren();
      latency.hidden = true;
      const err = body.error;   // the service's one error shape; its request id helps a bug report
      statusEl.textContent = `Error ${resp.status}: ${err ? `${err.message} (request ${err.request_id})` : resp.statusText}`;
      return;
    }
    render(body, performance.now() - t0);
  } catch (err) {
    statusEl.textContent = "Search failed: " + err;
  }
});
