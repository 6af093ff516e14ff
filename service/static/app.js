// The generation page: submit a job, stream its x0-hat frames (Server-Sent Events, polling as a fallback),
// then show the final images. Plain browser JavaScript, no build step. Talks only to the documented HTTP API.
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
let models = {};
let job = null; // {id, source, pollTimer, lastFrame, done}

function apiKey() { return $("api_key").value.trim(); }

async function api(method, url, body) {
  const headers = {};
  if (apiKey()) headers["X-API-Key"] = apiKey();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    const err = (data && data.error) || { code: String(res.status), message: res.statusText };
    throw new Error(`${err.message} (${res.status} ${err.code})`);
  }
  return data;
}

function setStatus(status, detail) {
  $("status").textContent = status;
  $("status").className = status.split(" ")[0];
  document.body.dataset.jobStatus = status.split(" ")[0];
  if (detail !== undefined) $("detail").textContent = detail;
}

function showError(message) { $("error").textContent = message || ""; }

async function loadModels() {
  try {
    const data = await api("GET", "/models");
    const select = $("model");
    select.innerHTML = "";
    for (const m of data.models) {
      models[m.name] = m;
      const opt = document.createElement("option");
      opt.value = m.name;
      opt.textContent = m.available ? `${m.name} (${m.image_size}×${m.image_size}, T=${m.num_timesteps})` : `${m.name} (unavailable)`;
      opt.disabled = !m.available;
      if (m.default) opt.selected = true;
      select.appendChild(opt);
    }
    onModelChange();
  } catch (e) {
    showError(`Could not list models: ${e.message}`);
  }
}

function showWorkers() {
  // GET /models says how many live workers serve each model; none is not an error: jobs wait in the queue.
  const m = models[$("model").value];
  const none = Boolean(m) && m.workers === 0;
  $("workers").hidden = !none;
  $("workers").textContent = none
    ? `No worker is serving ${m.name} right now: jobs are accepted and wait in the queue until one starts.` : "";
  document.body.dataset.workers = !m || m.workers == null ? "unknown" : none ? "none" : "serving";
}

async function refreshWorkers() {
  try {
    const data = await api("GET", "/models");
    for (const m of data.models) if (models[m.name]) models[m.name].workers = m.workers;
    showWorkers();
  } catch (e) { /* shown by the next action that needs the server */ }
}

function onModelChange() {
  const m = models[$("model").value];
  showWorkers();
  if (!m || !m.available) return;
  $("steps").max = m.num_timesteps;
  if (Number($("steps").value) > m.num_timesteps) $("steps").value = m.num_timesteps;
  $("model-info").textContent = `${m.dataset}, ${m.channels} channel(s), trained ${m.metadata.step} steps`;
}

function request() {
  const body = {
    model: $("model").value || undefined,
    num_images: Number($("num_images").value),
    steps: Number($("steps").value),
    sampler: $("sampler").value,
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

function stopStreaming() {
  if (!job) return;
  if (job.source) job.source.close();
  if (job.pollTimer) clearTimeout(job.pollTimer);
  job.source = null;
  job.pollTimer = null;
}

function figure(src, caption, alt) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = src;
  img.alt = alt;
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  fig.append(img, cap);
  return fig;
}

function addFrame(frame) {
  if (frame.index <= job.lastFrame) return; // already shown (replay after a reconnect)
  job.lastFrame = frame.index;
  const src = frame.data ? `data:image/png;base64,${frame.data}` : frame.url;
  $("frames").appendChild(figure(src, `t=${frame.t}`, `x0 prediction at step ${frame.step}`));
  $("current").innerHTML = "";
  const big = document.createElement("img");
  big.src = src;
  big.alt = `latest x0 prediction (t=${frame.t})`;
  $("current").appendChild(big);
}

function showProgress(p) {
  $("progress").max = p.total || 1;
  $("progress").value = p.step || 0;
  setStatus("running", `step ${p.step} of ${p.total}` + (p.t != null ? `, t=${p.t}` : ""));
}

async function finish(status) {
  if (job.done) return;
  job.done = true;
  stopStreaming();
  $("cancel").disabled = true;
  $("submit").disabled = false;
  try {
    const view = await api("GET", `/jobs/${job.id}?since=${job.lastFrame}&inline=1`);
    view.frames.forEach(addFrame);
    if (view.status === "succeeded") {
      $("progress").value = $("progress").max;
      for (const im of view.images) {
        const src = im.data ? `data:image/png;base64,${im.data}` : im.url;
        $("images").appendChild(figure(src, `#${im.index} seed ${im.seed}`, `image ${im.index}`));
      }
      setStatus("succeeded", `${view.images.length} image(s), seed ${view.request.seed}, ${view.request.steps} steps`);
    } else if (view.status === "failed") {
      setStatus("failed", view.error ? view.error.message : "the job failed");
    } else {
      setStatus(view.status, "");
    }
    document.body.dataset.images = String(view.images.length);
  } catch (e) {
    showError(e.message);
    setStatus(status);
  }
}

function stream() {
  // EventSource cannot send headers: with an API key, or when SSE keeps failing, poll instead.
  if (!window.EventSource || apiKey()) return poll();
  let opened = false;
  let failures = 0;
  const source = new EventSource(`/jobs/${job.id}/events`);
  job.source = source;
  source.onopen = () => { opened = true; failures = 0; };
  source.addEventListener("queued", () => setStatus("queued", "waiting for a worker"));
  source.addEventListener("running", () => setStatus("running", "the worker started"));
  source.addEventListener("progress", (e) => showProgress(JSON.parse(e.data)));
  source.addEventListener("frame", (e) => addFrame(JSON.parse(e.data)));
  for (const name of TERMINAL) source.addEventListener(name, () => finish(name));
  source.onerror = () => {
    failures += 1; // the browser reconnects with Last-Event-ID by itself
    if (job.done) return;
    if (!opened || failures > 3) { source.close(); job.source = null; poll(); }
  };
}

async function poll() {
  if (!job || job.done) return;
  try {
    const view = await api("GET", `/jobs/${job.id}?since=${job.lastFrame}&inline=1`);
    view.frames.forEach(addFrame);
    if (view.status === "queued") setStatus("queued", `number ${view.queue_position ?? "?"} in the queue (1 = next)`);
    else if (view.status === "running") showProgress(view.progress);
    if (TERMINAL.has(view.status)) return finish(view.status);
  } catch (e) {
    showError(e.message);
  }
  job.pollTimer = setTimeout(poll, 500);
}

async function submit(event) {
  if (event) event.preventDefault();
  stopStreaming();
  showError("");
  $("frames").innerHTML = "";
  $("images").innerHTML = "";
  $("current").innerHTML = "";
  $("progress").value = 0;
  delete document.body.dataset.images;
  $("submit").disabled = true;
  try {
    const accepted = await api("POST", "/generate", request());
    job = { id: accepted.id, source: null, pollTimer: null, lastFrame: -1, done: false };
    document.body.dataset.jobId = accepted.id;
    $("cancel").disabled = false;
    setStatus("queued", "waiting for a worker");
    stream();
  } catch (e) {
    showError(e.message);
    setStatus("error", "");
    $("submit").disabled = false;
  }
}

async function cancel() {
  if (!job) return;
  try {
    await api("DELETE", `/jobs/${job.id}`);
  } catch (e) {
    showError(e.message);
  }
  if (job.source === null && job.pollTimer === null) poll();
}

function applyQuery() {
  // Options in the URL (?num_images=2&steps=50&seed=7&autostart=1) make a run shareable and scriptable.
  const q = new URLSearchParams(location.search);
  for (const name of ["num_images", "steps", "seed", "sampler"]) if (q.has(name)) $(name).value = q.get(name);
  if (q.has("model")) $("model").value = q.get("model");
  onModelChange();
  if (q.has("steps")) $("steps").value = q.get("steps");
  return q.get("autostart") === "1";
}

$("form").addEventListener("submit", submit);
$("cancel").addEventListener("click", cancel);
$("model").addEventListener("change", onModelChange);
$("api_key").value = localStorage.getItem("ddpm_api_key") || "";
$("api_key").addEventListener("change", () => { localStorage.setItem("ddpm_api_key", apiKey()); loadModels(); });
loadModels().then(() => { if (applyQuery()) submit(); });
setInterval(refreshWorkers, 10000);
