// The page: run a job (generate; vary or reconstruct a picture from x_t; interpolate two; measure a picture's
// likelihood), stream its x0-hat frames (Server-Sent Events, polling as a fallback), then show the final images or
// the measurement, and play the job's animation. Pictures are results picked by clicking them, or uploads (sent as
// data URLs). Plain browser JavaScript, no build step. Talks only to the documented HTTP API.
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const ROUTES = { generate: "/generate", vary: "/generate", interpolate: "/interpolate", likelihood: "/likelihood" };
let models = {};
let job = null; // {id, source, pollTimer, lastFrame, done}
let picks = []; // results picked as input pictures: {job, index, src}
let uploads = []; // uploaded pictures: {name, src} (src is a data URL)

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
  $("start_t").max = m.num_timesteps;
  $("t").max = m.num_timesteps;
  if (Number($("start_t").value) > m.num_timesteps) $("start_t").value = Math.max(1, Math.floor(m.num_timesteps / 2));
  $("model-info").textContent = `${m.dataset}, ${m.channels} channel(s), trained ${m.metadata.step} steps`;
}

// ---- the operation and its input pictures ----
function op() { return document.querySelector("input[name=op]:checked").value; }

function onOpChange() {
  const o = op();
  for (const el of document.querySelectorAll("[class*='for-']")) el.hidden = !el.classList.contains(`for-${o}`);
  if (o === "vary" || o === "interpolate") { // steps count down from start_t / t: empty = all of them
    $("steps").value = "";
    $("steps").placeholder = o === "vary" ? "all from start t" : "all from t";
  } else if (o === "generate" && $("steps").value === "") {
    $("steps").value = "100";
  }
  const need = { vary: "one picture", interpolate: "two pictures (A, then B)", likelihood: "one or more pictures" }[o];
  if (need) $("pictures-help").textContent = `Needs ${need}: pick results below (click an image) or upload PNG/JPEG.`;
  document.body.dataset.op = o;
}

function inputs() { return [...uploads.map((u) => u.src), ...picks.map((p) => ({ job: p.job, index: p.index }))]; }

function showPicks() {
  const items = [...uploads.map((u) => [u.src, u.name]), ...picks.map((p) => [p.src, `#${p.index} of ${p.job.slice(0, 6)}…`])];
  $("picks").replaceChildren(...items.map(([src, caption], i) => figure(src, `${i + 1}: ${caption}`, `input picture ${i + 1}`)));
  document.body.dataset.pictures = String(items.length);
}

function togglePick(jobId, index, src, fig) {
  const at = picks.findIndex((p) => p.job === jobId && p.index === index);
  if (at >= 0) picks.splice(at, 1); else picks.push({ job: jobId, index, src });
  fig.classList.toggle("picked", at < 0);
  showPicks();
}

function readUploads() {
  const files = [...$("upload").files];
  Promise.all(files.map((f) => new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve({ name: f.name, src: reader.result });
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(f);
  }))).then((read) => { uploads = read; showPicks(); }).catch((e) => showError(`Could not read the file: ${e}`));
}

function clearPictures() {
  picks = [];
  uploads = [];
  $("upload").value = "";
  for (const fig of document.querySelectorAll("#images figure.picked")) fig.classList.remove("picked");
  showPicks();
}

function request() {
  const o = op();
  const body = { model: $("model").value || undefined };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("webhook").value.trim()) body.webhook = $("webhook").value.trim();
  if (o !== "likelihood") {
    body.sampler = $("sampler").value;
    if ($("steps").value !== "") body.steps = Number($("steps").value);
  }
  if (o === "generate" || o === "vary") body.num_images = Number($("num_images").value);
  const items = inputs();
  if (o === "vary") {
    if (items.length < 1) throw new Error("Vary needs a picture: pick a result or upload one");
    body.init_image = items[0];
    body.start_t = Number($("start_t").value);
  } else if (o === "interpolate") {
    if (items.length < 2) throw new Error("Interpolate needs two pictures: pick or upload A and B");
    body.images = items.slice(0, 2);
    if ($("t").value !== "") body.t = Number($("t").value);
    if ($("lambdas").value.trim()) body.lambdas = $("lambdas").value.split(",").map((v) => Number(v.trim()));
  } else if (o === "likelihood") {
    if (items.length < 1) throw new Error("Likelihood needs a picture: upload one or pick a result");
    body.images = items;
  }
  return [ROUTES[o], body];
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

// ---- webhook deliveries: what happened to each POST the server made to the job's webhook ----
function showWebhook(view) {
  const hook = view.webhook;
  $("webhook-card").hidden = !hook;
  if (!hook) return true;
  $("webhook-url").textContent = `${hook.url} (events: ${hook.events.join(", ")})`;
  const rows = hook.deliveries.map((d) => {
    const tr = document.createElement("tr");
    for (const [text, cls] of [[d.event, ""], [d.status, d.status], [String(d.attempts), ""], [d.last_error || "", ""]]) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.appendChild(td);
    }
    return tr;
  });
  $("deliveries").tBodies[0].replaceChildren(...rows);
  // Settled: the job ended, its `completed` delivery (when asked for) exists and no delivery is pending.
  const settled = TERMINAL.has(view.status) && hook.deliveries.every((d) => d.status !== "pending") &&
    (!hook.events.includes("completed") || hook.deliveries.some((d) => d.event === "completed"));
  document.body.dataset.webhookSettled = String(settled);
  return settled;
}

async function watchDeliveries(jobId, triesLeft) {
  // `completed` is delivered after the job ends: keep looking until no delivery is pending (about a minute at most).
  if (!job || job.id !== jobId || triesLeft <= 0) return;
  try {
    const view = await api("GET", `/jobs/${jobId}?since=${job.lastFrame}`);
    if (showWebhook(view)) return;
  } catch (e) {
    showError(e.message);
  }
  setTimeout(() => watchDeliveries(jobId, triesLeft - 1), 1000);
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
        const caption = view.kind === "interpolate" ? `λ=${view.request.lambdas[im.index]}` : `#${im.index} seed ${im.seed}`;
        const fig = figure(src, caption, `image ${im.index}`);
        fig.addEventListener("click", () => togglePick(view.id, im.index, src, fig));
        $("images").appendChild(fig);
      }
      if (view.result) showResult(view.result);
      const what = view.result ? `${view.result.bits_per_dim.length} picture(s) measured` : `${view.images.length} image(s)`;
      setStatus("succeeded", `${what}, seed ${view.request.seed}, ${view.request.steps} steps`);
    } else if (view.status === "failed") {
      setStatus("failed", view.error ? view.error.message : "the job failed");
    } else {
      setStatus(view.status, "");
    }
    document.body.dataset.images = String(view.images.length);
    $("play").disabled = job.lastFrame < 0;
    if (view.webhook) watchDeliveries(job.id, 60);
  } catch (e) {
    showError(e.message);
    setStatus(status);
  }
}

// ---- a likelihood job's measurement, and a job's animation ----
function rows(table, cells) {
  table.tBodies[0].replaceChildren(...cells.map((row) => {
    const tr = document.createElement("tr");
    for (const text of row) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    return tr;
  }));
}

function showResult(result) {
  $("result-card").hidden = false;
  rows($("bits"), result.bits_per_dim.map((b, i) => [String(i + 1), b.toFixed(4)]));
  rows($("rd"), result.rate_distortion.map((p) => [String(p.t), p.rate_bits_per_dim.map((v) => v.toFixed(4)).join(" / "),
    p.distortion_rmse.map((v) => v.toFixed(2)).join(" / ")]));
  document.body.dataset.bits = JSON.stringify(result.bits_per_dim);
}

async function playAnimation() {
  // fetch, not <img src>: an <img> cannot send the API key
  if (!job) return;
  const headers = apiKey() ? { "X-API-Key": apiKey() } : {};
  try {
    const res = await fetch(`/jobs/${job.id}/animation.webp`, { headers });
    if (!res.ok) {
      const data = await res.json().catch(() => ({}));
      throw new Error(`${(data.error && data.error.message) || res.statusText} (${res.status})`);
    }
    const img = document.createElement("img");
    img.alt = "the job's x0-hat frames, animated";
    img.onload = () => { document.body.dataset.animation = "loaded"; };
    img.src = URL.createObjectURL(await res.blob());
    $("animation-box").replaceChildren(img);
  } catch (e) {
    showError(`Could not load the animation: ${e.message}`);
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
    showWebhook(view);
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
  showError("");
  let route, body;
  try {
    [route, body] = request();
  } catch (e) {
    showError(e.message);
    return;
  }
  stopStreaming();
  $("frames").innerHTML = "";
  $("images").innerHTML = "";
  $("current").innerHTML = "";
  $("animation-box").innerHTML = "";
  $("progress").value = 0;
  $("webhook-card").hidden = true;
  $("result-card").hidden = true;
  $("play").disabled = true;
  $("deliveries").tBodies[0].replaceChildren();
  for (const name of ["images", "webhookSettled", "bits", "animation"]) delete document.body.dataset[name];
  $("submit").disabled = true;
  try {
    const accepted = await api("POST", route, body);
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
  // Options in the URL (?op=vary&start_t=10&num_images=2&steps=50&seed=7&webhook=...&autostart=1) make a run
  // shareable and scriptable.
  const q = new URLSearchParams(location.search);
  const fields = ["num_images", "steps", "seed", "sampler", "webhook", "start_t", "t", "lambdas"];
  for (const name of fields) if (q.has(name)) $(name).value = q.get(name);
  if (q.has("model")) $("model").value = q.get("model");
  const chosen = document.querySelector(`input[name=op][value="${q.get("op")}"]`);
  if (chosen) chosen.checked = true;
  onModelChange();
  onOpChange();
  if (q.has("steps")) $("steps").value = q.get("steps");
  return q.get("autostart") === "1";
}

$("form").addEventListener("submit", submit);
$("cancel").addEventListener("click", cancel);
$("play").addEventListener("click", playAnimation);
$("model").addEventListener("change", onModelChange);
for (const radio of document.querySelectorAll("input[name=op]")) radio.addEventListener("change", onOpChange);
$("upload").addEventListener("change", readUploads);
$("clear-picks").addEventListener("click", clearPictures);
$("api_key").value = localStorage.getItem("ddpm_api_key") || "";
$("api_key").addEventListener("change", () => { localStorage.setItem("ddpm_api_key", apiKey()); loadModels(); });
loadModels().then(() => { if (applyQuery()) submit(); });
setInterval(refreshWorkers, 10000);
