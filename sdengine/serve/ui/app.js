// sdengine's web UI: a client of the server's own A1111 endpoints.
//   POST /sdapi/v1/txt2img, /sdapi/v1/img2img    generate (force_task_id names the request)
//   POST /internal/progress                      its queue position while it waits
//   GET  /sdapi/v1/progress                      step, ETA and the live preview while it runs
//   POST /sdapi/v1/interrupt                     stop it
//   POST /sdapi/v1/png-info                      the settings in an image's infotext
//   GET  /sdapi/v1/samplers, schedulers, loras, sd-models; /openapi.json (defaults and limits)
//   GET  /controlnet/model_list                  the ControlNets (sdengine serve --controlnet)

import { Api, ApiError, ConnectionLost } from "./api.js";
import { MaskPainter, readDataUrl } from "./canvas.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 250;
const NUMBER_FIELDS = ["steps", "cfg_scale", "width", "height", "seed", "batch_size", "n_iter", "denoising_strength"];

const HIRES_FIELDS = ["hr_scale", "hr_second_pass_steps"];

const state = { ready: false, running: false, stopRequested: false, imageCount: 0, schedulers: [], ipAdapters: [],
  controlImage: undefined };

const api = new Api({
  askKey,
  onBusy: (s) => setStatus(`Server busy, retrying in ${s} s…`),
  onConnection: (ok) => { $("connection").textContent = ok ? "" : "Connection lost"; },
});
api.stopped = () => state.stopRequested;

const painter = new MaskPainter($("canvas-wrap"), $("init_canvas"), $("mask_canvas"), $("brush"));

// ---------------------------------------------------------------------------------------
// Start-up: the lists and defaults the form needs
// ---------------------------------------------------------------------------------------

async function init() {
  try {
    const [samplers, schedulers, models, schema, controlnets] = await Promise.all([
      api.get("/sdapi/v1/samplers"), api.get("/sdapi/v1/schedulers"), api.get("/sdapi/v1/sd-models"),
      api.get("/openapi.json"), api.get("/controlnet/model_list"),
    ]);
    fillSelect($("sampler_name"), samplers.map((s) => [s.name, s.name]));
    state.schedulers = schedulers;
    fillSelect($("scheduler"), schedulers.map((s) => [s.name, s.label]));
    $("model").textContent = models.length ? models[0].title : "";
    applySchema(schema);
    applyControlNets(controlnets.model_list || []);
    state.ready = true;
    $("generate").disabled = false;
    await loadLoras();
  } catch (e) {
    showError(e);
    if (e instanceof ConnectionLost && !state.ready) setTimeout(init, 2000);  // the server may be starting
  }
}

function fillSelect(select, options) {
  select.replaceChildren(...options.map(([value, text]) => new Option(text, value)));
}

// Defaults and limits from the server's own schema: the model's size, --max-size, --max-steps, ...
function applySchema(schema) {
  const props = schema?.components?.schemas?.Txt2ImgRequest?.properties || {};
  for (const name of NUMBER_FIELDS) {
    const input = $(name);
    const prop = props[name];
    if (!input || !prop) continue;
    const bounds = [prop, ...(prop.anyOf || [])];
    for (const b of bounds) {
      if (b.maximum !== undefined) input.max = b.maximum;
      if (b.minimum !== undefined) input.min = b.minimum;
    }
    if (["width", "height"].includes(name) && typeof prop.default === "number") input.value = prop.default;
  }
  const sampler = props.sampler_index?.default;
  if (sampler && [...$("sampler_name").options].some((o) => o.value === sampler)) $("sampler_name").value = sampler;
  applyExtrasSchema(props);
}

function valueBranch(prop) { return (prop?.anyOf || [prop]).find((b) => b && b.type !== "null") || {}; }

// The hires fix's upscalers and caps, the server's refiner and IP-Adapters (sdengine serve --refiner,
// --ip-adapter), as the schema states them.
function applyExtrasSchema(props) {
  const upscalers = valueBranch(props.hr_upscaler).enum || ["Latent"];
  fillSelect($("hr_upscaler"), upscalers.map((u) => [u, u]));
  for (const name of HIRES_FIELDS) {
    const b = valueBranch(props[name]);
    if (b.maximum !== undefined) $(name).max = b.maximum;
  }
  const refiners = (valueBranch(props.refiner_checkpoint).enum || []).filter((r) => r && r !== "None");
  fillSelect($("refiner_checkpoint"), [["", "None"], ...refiners.map((r) => [r, r])]);
  $("refiner").hidden = !refiners.length;
  const script = props.alwayson_scripts?.anyOf?.find((b) => b.additionalProperties)?.additionalProperties;
  const unit = script?.properties?.args?.items?.anyOf?.find((u) => u.properties?.module?.pattern === "^ip-adapter");
  state.ipAdapters = unit ? unit.properties.model.examples : [];
  state.ipImages = [];
  $("ip-adapter-list").replaceChildren(...state.ipAdapters.map((name, i) => {
    const row = document.createElement("div");
    row.className = "ip-adapter";
    row.innerHTML = `<span class="label"></span><input type="file" accept="image/*">` +
      `<input type="number" min="0" max="2" step="0.05" value="0.6">`;
    row.querySelector("input[type=file]").setAttribute("aria-label", `Image prompt for ${name}`);
    row.querySelector("input[type=number]").setAttribute("aria-label", `Weight of ${name}`);
    row.querySelector(".label").textContent = name;
    const file = row.querySelector("input[type=file]");
    file.id = `ip_image_${i}`;
    file.addEventListener("change", async () => {
      state.ipImages[i] = file.files[0] ? await readDataUrl(file.files[0]) : undefined;
    });
    row.querySelector("input[type=number]").id = `ip_weight_${i}`;
    return row;
  }));
  $("ip-adapters").hidden = !state.ipAdapters.length;
}

// The ControlNet panel: the models of /controlnet/model_list but the IP-Adapters (which it lists too,
// as A1111's extension does), each "name [hash]"; hidden on a server without ControlNets.
function applyControlNets(models) {
  const ipAdapters = new Set(state.ipAdapters);
  const controlnets = models.filter((m) => !ipAdapters.has(m.split(" [")[0]));
  fillSelect($("controlnet_model"), controlnets.map((m) => [m, m]));
  $("controlnet").hidden = !controlnets.length;
}

async function loadLoras() {
  const loras = await api.get("/sdapi/v1/loras");
  if (!loras.length) return;
  $("lora-list").replaceChildren(...loras.map((l) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = l.name;
    b.title = `Insert <lora:${l.name}:1>`;
    b.addEventListener("click", () => insertAtCursor($("prompt"), `<lora:${l.name}:1>`));
    return b;
  }));
  $("loras").hidden = false;
}

function insertAtCursor(textarea, text) {
  const { selectionStart: a, selectionEnd: b, value } = textarea;
  const sep = a > 0 && !/\s$/.test(value.slice(0, a)) ? " " : "";
  textarea.value = value.slice(0, a) + sep + text + value.slice(b);
  textarea.selectionStart = textarea.selectionEnd = a + sep.length + text.length;
  textarea.focus();
}

// ---------------------------------------------------------------------------------------
// Generate
// ---------------------------------------------------------------------------------------

function mode() { return document.querySelector("input[name=mode]:checked").value; }

function collect() {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler_name").value || null, scheduler: $("scheduler").value || null,
    send_images: true, save_images: false,
  };
  for (const name of NUMBER_FIELDS) {
    if (name === "denoising_strength" && mode() !== "img2img") continue;
    const raw = $(name).value.trim();
    body[name] = raw === "" ? null : Number(raw);
  }
  if (mode() === "img2img") {
    body.init_images = painter.dataUrl ? [painter.dataUrl] : [];
    body.mask = painter.maskPng();
  } else if ($("enable_hr").checked) {  // A1111's hires fix: its denoising strength is the second pass's
    body.enable_hr = true;
    body.hr_upscaler = $("hr_upscaler").value || null;
    for (const name of HIRES_FIELDS) body[name] = $(name).value.trim() === "" ? null : Number($(name).value);
    body.denoising_strength = Number($("hr_denoising_strength").value);
  }
  if ($("refiner_checkpoint").value) {
    body.refiner_checkpoint = $("refiner_checkpoint").value;
    body.refiner_switch_at = Number($("refiner_switch_at").value);
  }
  const units = state.ipAdapters.map((name, i) => ({ name, image: state.ipImages[i], weight: $(`ip_weight_${i}`).value }))
    .filter((u) => u.image)
    .map((u) => ({ enabled: true, module: "ip-adapter_clip_sd15", model: u.name, weight: Number(u.weight), image: u.image }));
  if (!$("controlnet").hidden && state.controlImage) {  // the control map as is: module none, "Just Resize"
    units.push({
      enabled: true, module: "none", model: $("controlnet_model").value, image: state.controlImage,
      weight: Number($("control_weight").value), guidance_start: Number($("control_start").value),
      guidance_end: Number($("control_end").value), resize_mode: "Just Resize", control_mode: "Balanced",
    });
  }
  if (units.length) body.alwayson_scripts = { ControlNet: { args: units } };
  return body;
}

async function generate() {
  if (state.running || !state.ready) return;
  clearErrors();
  const body = collect();
  const task = `task(${crypto.randomUUID ? crypto.randomUUID() : Math.random().toString(36).slice(2)})`;
  body.force_task_id = task;
  state.running = true;
  state.stopRequested = false;
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  setProgress(0);
  setStatus("Sending…");
  const started = performance.now();
  const poll = pollProgress(task, body);
  try {
    const result = await api.post(`/sdapi/v1/${mode()}`, body, { retryBusy: true });
    const info = JSON.parse(result.info || "{}");
    addResults(result.images || [], info);
    setProgress(1);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    setStatus(info.interrupted ? `Interrupted after ${seconds} s` : `Done in ${seconds} s`);
  } catch (e) {
    setProgress(0);
    setStatus("");
    showError(e);
  } finally {
    poll.stop();
    state.running = false;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
    $("preview").hidden = true;
  }
}

// Queue position from /internal/progress while the request waits; step, ETA and preview from
// /sdapi/v1/progress once it runs. A failed poll says so and polling goes on.
function pollProgress(task, body) {
  let stopped = false;
  let active = false;
  let previewId = -1;
  const tick = async () => {
    while (!stopped) {
      try {
        if (!active) {
          const where = await api.post("/internal/progress", { id_task: task, id_live_preview: previewId, live_preview: false }, { timeoutMs: 5000 });
          if (stopped) break;
          active = where.active || where.completed;
          if (where.queued) setStatus(where.textinfo || "Queued");
        }
        if (active) {
          const p = await api.get("/sdapi/v1/progress", { timeoutMs: 5000 });
          if (stopped) break;
          const s = p.state || {};
          if (s.sampling_steps) {
            setProgress(p.progress);
            setStatus(`Step ${s.sampling_step}/${s.sampling_steps} · ETA ${p.eta_relative.toFixed(1)} s`);
          }
          if (p.current_image) {  // at latent resolution: shown at the image's aspect, scaled up by CSS
            $("preview").style.setProperty("--aspect", `${body.width || 1} / ${body.height || 1}`);
            $("preview").src = `data:image/png;base64,${p.current_image}`;
            $("preview").hidden = false;
          }
        }
      } catch (e) {
        if (stopped) break;
        setStatus(e instanceof ConnectionLost ? "Connection lost; still trying…" : `Progress: ${e.message}`);
      }
      await new Promise((r) => setTimeout(r, POLL_MS));
    }
  };
  tick();
  return { stop() { stopped = true; } };
}

async function interrupt() {
  state.stopRequested = true;
  setStatus("Interrupting…");
  try {
    await api.post("/sdapi/v1/interrupt");
  } catch (e) {
    showError(e);
  }
}

// ---------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------

function addResults(images, info) {
  const infotexts = info.infotexts || [];
  const seeds = info.all_seeds || [];
  const figures = images.map((b64, i) => {
    const n = ++state.imageCount;
    const src = `data:image/png;base64,${b64}`;
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = src;
    img.alt = `Generated image ${n}`;
    const caption = document.createElement("figcaption");
    caption.textContent = infotexts[i] || "";
    const row = document.createElement("div");
    row.className = "row";
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.textContent = "Reuse settings";
    reuse.addEventListener("click", () => reuseSettings(src, `generated image ${n}`));
    const download = document.createElement("a");
    download.href = src;
    download.download = `sdengine-${seeds[i] ?? n}.png`;
    download.textContent = "Download PNG";
    row.append(reuse, download);
    figure.append(img, caption, row);
    return figure;
  });
  $("gallery").prepend(...figures);  // the newest run first, its images in order
}

// A1111's PNG Info: the server reads the `parameters` chunk and parses it; the form takes it.
async function reuseSettings(dataUrl, what) {
  clearErrors();
  try {
    const answer = await api.post("/sdapi/v1/png-info", { image: dataUrl });
    if (!answer.info) throw new Error(`${what} has no generation parameters`);
    fillForm(answer.parameters || {});
    setStatus(`Settings from ${what}`);
  } catch (e) {
    showError(e);
  }
}

// A1111's parsed infotext (modules/infotext_utils.py parse_generation_parameters keys) -> the form.
function fillForm(p) {
  const set = (id, value) => { if (value !== undefined && value !== null) $(id).value = value; };
  set("prompt", p["Prompt"]);
  set("negative_prompt", p["Negative prompt"] ?? "");
  set("steps", p["Steps"]);
  set("cfg_scale", p["CFG scale"]);
  set("seed", p["Seed"]);
  set("width", p["Size-1"]);
  set("height", p["Size-2"]);
  const hires = p["Hires upscale"] !== undefined || p["Hires resize-1"] !== undefined;
  set(hires ? "hr_denoising_strength" : "denoising_strength", p["Denoising strength"]);
  $("enable_hr").checked = hires;
  if (hires) {
    $("hires").open = true;
    set("hr_scale", p["Hires upscale"]);
    set("hr_second_pass_steps", p["Hires steps"] ?? 0);
    if ([...$("hr_upscaler").options].some((o) => o.value === p["Hires upscaler"])) set("hr_upscaler", p["Hires upscaler"]);
  }
  if (p["Refiner"] !== undefined) {
    const name = String(p["Refiner"]).split(" [")[0];
    if ([...$("refiner_checkpoint").options].some((o) => o.value === name)) $("refiner_checkpoint").value = name;
    set("refiner_switch_at", p["Refiner switch at"]);
  }
  fillControlNet(p);
  if (p["Sampler"] && [...$("sampler_name").options].some((o) => o.value === p["Sampler"])) {
    $("sampler_name").value = p["Sampler"];
  }
  const schedule = p["Schedule type"];
  if (schedule) {
    const found = state.schedulers.find((s) => s.label === schedule || s.name === schedule);
    if (found) $("scheduler").value = found.name;
  }
}

// A1111's ControlNet extension writes each unit as one field, `ControlNet 0: "Module: none, Model:
// name [hash], Weight: 0.8, ..., Guidance Start: 0.0, Guidance End: 1.0, ..."`. The first module-none
// unit whose model this server has fills the panel (its control image is not in the PNG: upload it).
function fillControlNet(p) {
  if ($("controlnet").hidden) return;
  const units = Object.keys(p).filter((k) => /^ControlNet \d+$/.test(k)).sort()
    .map((k) => Object.fromEntries(String(p[k]).split(", ").map((kv) => [kv.split(": ")[0], kv.split(": ").slice(1).join(": ")])));
  const bare = (m) => String(m || "").split(" [")[0];
  for (const unit of units) {
    const option = [...$("controlnet_model").options].find((o) => bare(o.value) === bare(unit.Model));
    if (unit.Module !== "none" || !option) continue;
    $("controlnet_model").value = option.value;
    for (const [id, key] of [["control_weight", "Weight"], ["control_start", "Guidance Start"], ["control_end", "Guidance End"]]) {
      if (unit[key] !== undefined && unit[key] !== "") $(id).value = Number(unit[key]);
    }
    $("controlnet").open = true;
    return;
  }
}

// ---------------------------------------------------------------------------------------
// Errors, status, progress
// ---------------------------------------------------------------------------------------

function clearErrors() {
  document.querySelectorAll(".field-error").forEach((e) => e.remove());
  document.querySelectorAll("[aria-invalid=true]").forEach((e) => {
    e.removeAttribute("aria-invalid");
    e.removeAttribute("aria-describedby");
  });
  $("form-error").textContent = "";
}

// A 422 lands beside the field it names; anything else under the form.
function showError(e) {
  if (e instanceof ApiError && e.status === 422 && Array.isArray(e.detail)) {
    const loose = [];
    for (const item of e.detail) {
      const loc = (item.loc || []).filter((part) => part !== "body");
      const field = document.querySelector(`.field[data-field="${loc[0]}"]`);
      if (!field) { loose.push(`${loc.join(".")}: ${item.msg}`); continue; }
      const message = document.createElement("p");
      message.className = "error field-error";
      message.id = `${loc[0]}-error`;
      message.setAttribute("role", "alert");
      message.textContent = item.msg;
      field.append(message);
      const control = field.querySelector("input, select, textarea");
      if (control) {
        control.setAttribute("aria-invalid", "true");
        control.setAttribute("aria-describedby", message.id);
      }
    }
    $("form-error").textContent = loose.join("; ");
    return;
  }
  if (e instanceof ConnectionLost) {
    $("form-error").textContent = "The connection to the server was lost; is `sdengine serve` still running?";
    return;
  }
  const text = e instanceof ApiError ? (typeof e.detail === "string" ? e.detail : JSON.stringify(e.detail)) : e.message;
  $("form-error").textContent = e instanceof ApiError ? `Error ${e.status}: ${text}` : text;
}

function setStatus(text) { $("status").textContent = text; }

function setProgress(fraction) {
  const percent = Math.round(Math.max(0, Math.min(1, fraction)) * 100);
  $("progress").setAttribute("aria-valuenow", String(percent));
  $("progress-fill").style.width = `${percent}%`;
}

function askKey(message) {
  const dialog = $("key-dialog");
  $("key-error").textContent = message || "";
  $("api_key").value = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok" ? $("api_key").value.trim() || null : null),
      { once: true });
    dialog.showModal();
  });
}

// ---------------------------------------------------------------------------------------
// Wiring
// ---------------------------------------------------------------------------------------

$("form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
$("interrupt").addEventListener("click", interrupt);
document.addEventListener("keydown", (e) => {
  if ((e.ctrlKey || e.metaKey) && e.key === "Enter") { e.preventDefault(); generate(); }
});
for (const radio of document.querySelectorAll("input[name=mode]")) {
  radio.addEventListener("change", () => {
    $("img2img").hidden = mode() !== "img2img";
    $("hires").hidden = mode() === "img2img";  // the hires fix is txt2img's
    clearErrors();
  });
}
$("init_image").addEventListener("change", async (e) => {
  if (e.target.files[0]) await painter.load(e.target.files[0]).catch(showError);
});
$("mask_file").addEventListener("change", async (e) => {
  if (e.target.files[0]) await painter.upload(e.target.files[0]).catch(showError);
});
$("clear_mask").addEventListener("click", () => painter.clear());
$("control_image").addEventListener("change", async (e) => {
  state.controlImage = e.target.files[0] ? await readDataUrl(e.target.files[0]).catch(showError) : undefined;
});

// Drop a PNG anywhere: its settings fill the form (A1111's PNG Info).
let dragDepth = 0;
document.addEventListener("dragenter", (e) => { e.preventDefault(); dragDepth++; $("drop-overlay").hidden = false; });
document.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; $("drop-overlay").hidden = true; } });
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", async (e) => {
  e.preventDefault();
  dragDepth = 0;
  $("drop-overlay").hidden = true;
  const file = [...(e.dataTransfer?.files || [])].find((f) => f.type.startsWith("image/"));
  if (!file) { $("form-error").textContent = "Drop an image file (PNG) to read its settings"; return; }
  await reuseSettings(await readDataUrl(file), file.name);
});

init();
