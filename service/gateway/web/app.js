// Uni-ViGU web page: forms built from /openapi.json, fetch() to the API, the job's event stream for
// progress (polling where a proxy buffers the stream). Every URL is relative so the page also works
// behind a path prefix.
"use strict";

const POLL_MS = 500; // job panel refresh while the job runs, when its event stream does not work
const STREAM_SILENCE_MS = 8000; // the gateway pings every 3 s: a longer silence means a buffering proxy
const TERMINAL = ["succeeded", "failed", "canceled"];
const LIST_MS = 2000; // recent jobs refresh
let keyHeader = "X-API-Key"; // the gateway's default; an apiKey security scheme in /openapi.json wins
const $ = (selector, root = document) => root.querySelector(selector);

let shown = null; // id of the job in the job panel
let pollTimer = null;
let following = null; // AbortController of the job panel's event stream

// --- the API -------------------------------------------------------------------------------------

class HttpError extends Error {
  constructor(status, { code, message, param }) {
    super(message);
    Object.assign(this, { status, code, param });
  }
}

function authHeaders(extra = {}) {
  const key = localStorage.getItem("apiKey");
  return key ? { ...extra, [keyHeader]: key } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  const json = (response.headers.get("content-type") || "").includes("json");
  const body = json ? await response.json() : null;
  if (!response.ok) {
    throw new HttpError(response.status, body?.error ?? { code: "http_error", message: response.statusText });
  }
  return body;
}

// A result URL usable by <video> and <a download>: direct, or a blob when an API key must be sent.
async function mediaUrl(url) {
  const path = url.replace(/^\//, "");
  if (!localStorage.getItem("apiKey")) return path;
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) throw new HttpError(response.status, { code: "http_error", message: response.statusText });
  return URL.createObjectURL(await response.blob());
}

// --- forms from the OpenAPI schema ----------------------------------------------------------------

function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  node.textContent = text;
  return node;
}

// One form field from its OpenAPI property; `limit` (GET /model's limits of this mode and option) wins over
// the schema's range, so the page shows what the served model accepts.
function field(formKind, name, property, required, model) {
  const type = property.anyOf ? property.anyOf.find((t) => t.type !== "null") : property;
  const limit = model.limits?.[formKind]?.[name] ?? {};
  const minimum = limit.minimum ?? type.minimum;
  const maximum = limit.maximum ?? type.maximum;
  const id = `${formKind}-${name}`;
  const box = element("div", { class: name === "prompt" ? "field wide" : "field" });
  const input = element(name === "prompt" ? "textarea" : "input", { id, name });
  const hints = [];
  if (type.type === "integer" || type.type === "number") {
    input.type = "number";
    if (minimum !== undefined) input.min = minimum;
    if (maximum !== undefined) input.max = maximum;
    const fourKPlusOne = limit.four_k_plus_one || (property.description || "").includes("4k+1");
    input.step = limit.multiple_of ?? type.multipleOf ?? (fourKPlusOne ? 4 : type.type === "integer" ? 1 : "any");
    if (minimum !== undefined && maximum !== undefined) hints.push(`${minimum}–${maximum}`);
  }
  const maxChars = limit.max_chars ?? type.maxLength;
  if (limit.max_tokens) {
    input.dataset.maxTokens = limit.max_tokens;
    hints.push(`up to ${limit.max_tokens} tokens`);
  } else if (maxChars && name !== "prompt") hints.push(`up to ${maxChars} characters`);
  if (property.description) hints.push(property.description.replace(/\.$/, ""));
  const defaults = model.defaults;
  if (required) input.required = true;
  else if (input.type !== "number") input.placeholder = "optional";
  else input.placeholder = name in defaults ? `default ${defaults[name]}` : "model default";
  box.append(element("label", { for: id }, property.title || name), input);
  if (hints.length) box.append(element("small", { class: "hint" }, hints.join(" · ")));
  box.append(element("small", { class: "error", hidden: "" }));
  return box;
}

// The served model (GET /model): its defaults, shown as placeholders, and its limits; none until a worker
// has started.
async function servedModel() {
  try {
    const { defaults, limits } = await api("model");
    return { defaults: { ...defaults, max_tokens: defaults.caption_tokens }, limits };
  } catch {
    return { defaults: {}, limits: {} };
  }
}

async function buildForms() {
  const [spec, model] = await Promise.all([api("openapi.json"), servedModel()]);
  const scheme = Object.values(spec.components?.securitySchemes ?? {}).find((s) => s.type === "apiKey");
  if (scheme?.in === "header") keyHeader = scheme.name;
  const caption = spec.paths["/caption"].post.requestBody.content["multipart/form-data"].schema;
  for (const form of document.forms) {
    const schema = form.dataset.schema ? spec.components.schemas[form.dataset.schema] : caption;
    const names = Object.keys(schema.properties).filter((name) => name !== "file");
    names.sort((a, b) => (b === "prompt") - (a === "prompt")); // the prompt first
    const box = $(".fields", form);
    for (const name of names) {
      const required = (schema.required || []).includes(name);
      box.append(field(form.dataset.kind, name, schema.properties[name], required, model));
    }
  }
}

function formValues(form) {
  const values = {};
  for (const input of form.querySelectorAll(".fields [name]")) {
    if (input.value === "") continue; // omitted: the model's default
    values[input.name] = input.type === "number" ? Number(input.value) : input.value;
  }
  return values;
}

function clearErrors(form) {
  for (const node of form.querySelectorAll(".error")) node.hidden = true;
  for (const node of form.querySelectorAll(".invalid")) node.classList.remove("invalid");
}

// The envelope's message goes next to the field named by `param`, else under the form.
function showError(form, error) {
  const input = error.param ? form.elements.namedItem(error.param) : null;
  const box = input?.closest(".field");
  const target = box ? $(".error", box) : $(".form-error", form);
  target.textContent = error.code ? `${error.message} (${error.code})` : String(error);
  target.hidden = false;
  if (box) {
    box.classList.add("invalid");
    input.focus();
  }
}

async function submit(event) {
  event.preventDefault();
  const form = event.target;
  const button = $("button[type=submit]", form);
  clearErrors(form);
  button.disabled = true;
  try {
    let request;
    if (form.dataset.kind === "caption") {
      const data = new FormData();
      const file = form.elements.file.files[0];
      if (file) data.append("file", file);
      for (const [name, value] of Object.entries(formValues(form))) data.append(name, value);
      request = { method: "POST", body: data };
    } else {
      const headers = { "Content-Type": "application/json" };
      request = { method: "POST", headers, body: JSON.stringify(formValues(form)) };
    }
    const job = await api(form.dataset.kind, request);
    showJob(job.id);
    refreshList();
  } catch (error) {
    showError(form, error);
  } finally {
    button.disabled = false;
  }
}

// --- the job panel --------------------------------------------------------------------------------

function showJob(id) {
  shown = id;
  history.replaceState(null, "", `#${id}`); // a reload shows the same job
  const panel = $("#job");
  panel.hidden = false;
  const video = $("video", panel);
  video.hidden = true;
  video.removeAttribute("src");
  for (const selector of [".caption", ".download", ".job-error"]) $(selector, panel).hidden = true;
  delete panel.dataset.loaded;
  clearTimeout(pollTimer);
  following?.abort();
  follow(id);
  highlight();
}

// One block of a text/event-stream: {type, id, data}; comment lines are skipped.
function parseEvent(block) {
  const event = { type: "message", id: null, data: [] };
  for (const line of block.split(/\r\n|\r|\n/)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (name === "event") event.type = value;
    else if (name === "id") event.id = value;
    else if (name === "data") event.data.push(value);
  }
  return { ...event, data: event.data.join("\n") };
}

// Follow the job's event stream (fetch, not EventSource, which cannot send the API key header). A stream
// that drops after delivering resumes with Last-Event-ID; one that cannot be opened or stays silent (a
// proxy that buffers it) gives way to polling.
async function follow(id, lastEventId = null) {
  const controller = new AbortController();
  following = controller;
  let silence = null;
  const listen = () => {
    clearTimeout(silence);
    silence = setTimeout(() => controller.abort(), STREAM_SILENCE_MS);
  };
  let delivered = false;
  try {
    listen();
    const headers = authHeaders({ Accept: "text/event-stream", ...(lastEventId ? { "Last-Event-ID": lastEventId } : {}) });
    const response = await fetch(`jobs/${id}/events`, { headers, signal: controller.signal });
    if (response.status === 204) return; // it ended in the state shown
    if (!response.ok || !response.body) throw new Error(`the event stream answered ${response.status}`);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      listen();
      delivered = true;
      const blocks = (buffer + value).split(/\r\n\r\n|\n\n|\r\r/);
      buffer = blocks.pop();
      for (const event of blocks.map(parseEvent)) {
        if (id !== shown) return;
        if (event.type === "job") {
          lastEventId = event.id;
          const job = JSON.parse(event.data);
          await render(job);
          if (TERMINAL.includes(job.status)) return;
        } else if (event.type === "error") {
          const { error } = JSON.parse(event.data);
          showJobError(error);
          return;
        }
      }
    }
  } catch {
    // aborted (silent, or another job shown) or the connection failed: decided below
  } finally {
    clearTimeout(silence);
  }
  if (following !== controller || id !== shown) return; // another job took the panel
  if (delivered) follow(id, lastEventId);
  else poll(id);
}

async function poll(id) {
  try {
    const job = await api(`jobs/${id}`);
    if (id !== shown) return;
    await render(job);
    if (!TERMINAL.includes(job.status)) pollTimer = setTimeout(poll, POLL_MS, id);
  } catch (error) {
    if (id !== shown) return;
    showJobError(error);
    if (!(error instanceof HttpError)) pollTimer = setTimeout(poll, POLL_MS * 4, id); // network: retry
  }
}

function showJobError(error) {
  const line = $("#job .job-error");
  line.textContent = `${error.message}${error.code ? ` (${error.code})` : ""}`;
  line.hidden = false;
}

// "about 40 s left" / "about 3 min left"; empty without an estimate.
function etaText(seconds) {
  if (seconds === null || seconds === undefined) return "";
  return seconds < 90 ? `about ${Math.max(1, Math.round(seconds))} s left` : `about ${Math.round(seconds / 60)} min left`;
}

async function render(job) {
  const panel = $("#job");
  const terminal = TERMINAL.includes(job.status);
  $(".type", panel).textContent = job.type;
  $(".id", panel).textContent = job.id;
  const status = $(".status", panel);
  status.textContent = job.status;
  status.className = `status status-${job.status}`;
  const ahead = job.queue_position;
  $(".queue", panel).textContent =
    job.status === "queued" && ahead !== null ? (ahead === 0 ? "next in the queue" : `${ahead} ahead in the queue`) : "";
  $("progress", panel).value = job.progress;
  $(".percent", panel).textContent = `${job.progress}%`;
  $(".eta", panel).textContent = terminal ? "" : etaText(job.eta_seconds);
  $(".cancel", panel).hidden = terminal;
  if (job.error) {
    $(".job-error", panel).textContent = `${job.error.message} (${job.error.code})`;
    $(".job-error", panel).hidden = false;
  }
  if (job.status !== "succeeded" || panel.dataset.loaded === job.id) return;
  panel.dataset.loaded = job.id;
  const { video_url: videoUrl, result_url: resultUrl, caption } = job.result;
  const video = $("video", panel);
  const link = $(".download", panel);
  if (videoUrl) {
    video.src = await mediaUrl(videoUrl);
    video.hidden = false;
  }
  if (caption !== null && caption !== undefined) {
    $(".caption", panel).textContent = caption;
    $(".caption", panel).hidden = false;
  }
  link.href = videoUrl ? video.src : await mediaUrl(resultUrl);
  link.download = `${job.id}.${videoUrl ? "mp4" : "json"}`;
  link.textContent = videoUrl ? "Download the video (MP4)" : "Download the result (JSON)";
  link.hidden = false;
}

async function cancelShown() {
  try {
    await render(await api(`jobs/${shown}/cancel`, { method: "POST" }));
  } catch (error) {
    showJobError(error);
  }
  refreshList();
}

// --- recent jobs ------------------------------------------------------------------------------------

async function refreshList() {
  let page;
  try {
    page = await api("jobs?limit=20");
  } catch (error) {
    $("#jobs").replaceChildren(element("li", { class: "error" }, `${error.message} (${error.code})`));
    return;
  }
  const items = page.jobs.map((job) => {
    const button = element("button", { type: "button", "data-id": job.id });
    const what = job.params.prompt || (job.type === "caption" ? "uploaded video" : "");
    button.append(element("span", { class: `status-${job.status}` }, `${job.type} · ${job.status}`));
    if (!TERMINAL.includes(job.status)) button.append(` ${job.progress}%`);
    button.append(element("div", { class: "meta" }, `${new Date(job.created_at).toLocaleString()} · ${what.slice(0, 60)}`));
    const item = element("li");
    item.append(button);
    return item;
  });
  if (!items.length) items.push(element("li", { class: "meta" }, "No jobs yet."));
  $("#jobs").replaceChildren(...items);
  highlight();
}

function highlight() {
  for (const button of document.querySelectorAll("#jobs button")) {
    button.classList.toggle("current", button.dataset.id === shown);
  }
}

// --- wiring -----------------------------------------------------------------------------------------

function selectTab(kind) {
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.tab === kind));
  }
  for (const form of document.forms) form.hidden = form.dataset.kind !== kind;
}

function wireDrop() {
  const zone = $("#drop");
  const input = $("#caption-file");
  const showName = () => ($(".file-name", zone).textContent = input.files[0]?.name ?? "");
  input.addEventListener("change", showName);
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    input.files = event.dataTransfer.files;
    showName();
  });
}

async function main() {
  const key = $("#api-key");
  key.value = localStorage.getItem("apiKey") || "";
  key.addEventListener("change", () => {
    localStorage.setItem("apiKey", key.value.trim());
    refreshList();
  });
  for (const tab of document.querySelectorAll("[role=tab]")) tab.addEventListener("click", () => selectTab(tab.dataset.tab));
  for (const form of document.forms) form.addEventListener("submit", submit);
  $("#job .cancel").addEventListener("click", cancelShown);
  $("#jobs").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-id]");
    if (button) showJob(button.dataset.id);
  });
  wireDrop();
  await buildForms();
  document.body.dataset.ready = "true"; // the forms are built (tests wait for this)
  if (location.hash.length > 1) showJob(location.hash.slice(1));
  refreshList();
  setInterval(refreshList, LIST_MS);
}

main();
