// The page: submit a bundle, follow the job, look at the result, list jobs and experiments.
// Plain ES modules, no build step; the 3D viewer is the vendored <model-viewer>.

import {
  ApiError,
  apiFetch,
  apiJson,
  blobUrl,
  describeError,
  forgetBlobs,
  saveFile,
  setKeyPrompt,
  storedKey,
  storeKey,
  streamEvents,
  upload,
} from "./api.js";
import { entriesFromDrop, entriesFromInput, fmtBytes, planUpload } from "./checks.js";

// model-viewer loads its DRACO / KTX2 / Lottie helpers from Google's and jsDelivr's CDNs when
// a model needs them. Ours never do, and the page must not reach outside the service, so point
// them at this origin (a 404 there, should one ever be asked for). meshopt stays unset: setting
// it makes every load fetch the decoder.
const NO_CDN = new URL("vendor/model-viewer/not-vendored/", import.meta.url).href;
self.ModelViewerElement = Object.assign(self.ModelViewerElement || {}, {
  dracoDecoderLocation: NO_CDN,
  ktx2TranscoderLocation: NO_CDN,
  lottieLoaderLocation: `${NO_CDN}LottieLoader.js`,
});
const viewerReady = import("./vendor/model-viewer/model-viewer.min.js");

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

// Measured on a 2-core CPU: docs/architecture.md "Measured quality and time" (fusion, box/spot)
// and the README's sneaker walkthrough (nvdiffrec).
const MODEL_NOTES = {
  fusion: "depth fusion + texture baking; fast: ~11-15 s, spot 31.5 dB; balanced: ~17-28 s, spot 32.0 dB",
  nvdiffrec: "fusion, then differentiable-rendering refinement; sneaker fast ~1.5 min (20.3 dB), balanced ~9 min (20.9 dB)",
};
const PRESET_NOTES = {
  fast: "128³ fusion, 10k faces, 1024² texture: fusion 11-15 s (box 44.5 dB, spot 31.5 dB)",
  balanced: "192³, 20k faces, 2048² texture: fusion 17-28 s (box 48.2 dB, spot 32.0 dB)",
  quality: "256³, 60k faces, 4096² texture: fusion 29-42 s (box 53.4 dB, spot 32.5 dB)",
};

const state = {
  settings: null,
  entries: [], // [{path, file, zone}]
  plan: null,
  job: null, // the JobView being shown
  follow: null, // AbortController of the event stream
  cancelToken: null,
};

// ---------------------------------------------------------------- small helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function fmt(x, digits) {
  return typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "–";
}

function fmtSeconds(s) {
  if (typeof s !== "number") return "unknown";
  return s < 90 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`;
}

function notice(text) {
  $("#notice").textContent = text;
}

function showError(box, err) {
  const d = describeError(err);
  box.replaceChildren(
    el("strong", { class: "code" }, d.code),
    " ",
    el("span", { class: "words" }, d.words),
    d.message ? el("span", { class: "message" }, ` ${d.message}`) : null,
  );
  box.dataset.code = d.code;
  box.hidden = false;
}

function hideError(box) {
  box.hidden = true;
  box.replaceChildren();
  delete box.dataset.code;
}

function badge(node, status) {
  node.textContent = status || "–";
  node.dataset.status = status || "";
}

// ---------------------------------------------------------------- tabs

function showTab(name) {
  for (const b of $$("nav [data-tab]")) b.setAttribute("aria-selected", String(b.dataset.tab === name));
  for (const p of $$("[data-panel]")) p.hidden = p.dataset.panel !== name;
  if (name === "jobs") loadJobs().catch(reportError);
  if (name === "experiments") loadExperiments().catch(reportError);
  if (name === "monitoring") loadHealth().catch(reportError);
}

function reportError(err) {
  const d = describeError(err);
  notice(`${d.code}: ${d.words} ${d.message}`);
}

// ---------------------------------------------------------------- API key dialog

function askForKey(err) {
  const dialog = $("#key-dialog");
  const d = err ? describeError(err) : null;
  $("#key-reason").textContent = d ? `${d.code}: ${d.words} ${d.message}` : "Set the API key this tab sends.";
  $("#key-input").value = storedKey();
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        const key = dialog.returnValue === "save" ? $("#key-input").value.trim() || null : null;
        if (key || dialog.returnValue === "forget") storeKey(key || "");
        updateKeyButton();
        resolve(key);
      },
      { once: true },
    );
  });
}

function updateKeyButton() {
  $("#key-button").textContent = storedKey() ? "API key (set)" : "API key";
}

// ---------------------------------------------------------------- submit: choose files

async function replan() {
  const chosen = $("#chosen");
  state.plan = state.entries.length ? await planUpload(state.entries, state.settings?.max_upload_bytes) : null;
  const plan = state.plan;
  $("#submit-button").disabled = !plan || plan.problems.length > 0 || !plan.kind;
  if (!plan) {
    chosen.replaceChildren();
    return;
  }
  const list = el("ul", { class: "chosen-files" });
  for (const [field, file, name] of plan.parts) list.append(el("li", {}, `${field}: ${name} (${fmtBytes(file.size)})`));
  const problems = el("ul", { class: "problems", id: "problems" });
  for (const p of plan.problems) {
    problems.append(el("li", { "data-code": p.code }, el("strong", { class: "code" }, p.code), ` ${p.text}`));
  }
  chosen.replaceChildren(
    el("p", {}, `${plan.parts.length} file(s), ${fmtBytes(plan.bytes)}` + (plan.ignored.length ? `; ignored: ${plan.ignored.join(", ")}` : "")),
    list,
    plan.problems.length ? problems : el("p", { class: "ok" }, "The files look right."),
  );
}

function addEntries(entries, zone) {
  if (!entries.length) return;
  // A bundle replaces everything; loose views or depth renders replace the same zone's files.
  if (zone === "bundle") state.entries = entries;
  else state.entries = state.entries.filter((e) => e.zone !== zone && e.zone !== "bundle").concat(entries);
  hideError($("#submit-error"));
  replan().catch(reportError);
}

function wireDropZones() {
  for (const zone of $$(".drop")) {
    zone.addEventListener("dragover", (e) => {
      e.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", async (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      addEntries(await entriesFromDrop(e.dataTransfer, zone.dataset.zone), zone.dataset.zone);
    });
  }
  $("#bundle-file").addEventListener("change", (e) => addEntries(entriesFromInput(e.target, "bundle"), "bundle"));
  $("#bundle-folder").addEventListener("change", (e) => addEntries(entriesFromInput(e.target, "bundle"), "bundle"));
  $("#views-files").addEventListener("change", (e) => addEntries(entriesFromInput(e.target, "views"), "views"));
  $("#depth-files").addEventListener("change", (e) => addEntries(entriesFromInput(e.target, "depth_renders"), "depth_renders"));
  $("#clear-button").addEventListener("click", () => {
    state.entries = [];
    for (const input of $$("#submit-form input[type=file]")) input.value = "";
    hideError($("#submit-error"));
    replan();
  });
}

function renderChoices(settings) {
  const models = $("#models");
  for (const m of settings.models) {
    models.append(
      el(
        "label",
        { class: "choice" },
        el("input", { type: "checkbox", name: "model", value: m, checked: m === settings.models[0] }),
        el("strong", {}, m),
        el("span", { class: "hint" }, MODEL_NOTES[m] || ""),
      ),
    );
  }
  const presets = $("#presets");
  for (const p of Object.keys(PRESET_NOTES)) {
    presets.append(
      el(
        "label",
        { class: "choice" },
        el("input", { type: "radio", name: "preset", value: p, checked: p === settings.default_preset }),
        el("strong", {}, p),
        el("span", { class: "hint" }, PRESET_NOTES[p]),
      ),
    );
  }
}

async function submit(event) {
  event.preventDefault();
  const box = $("#submit-error");
  hideError(box);
  const plan = state.plan;
  if (!plan || plan.problems.length || !plan.kind) return;
  const models = $$("#models input:checked").map((i) => i.value);
  if (!models.length) {
    showError(box, new ApiError(0, "INVALID_REQUEST", "choose at least one model"));
    return;
  }
  const form = new FormData();
  for (const [field, file, name] of plan.parts) form.append(field, file, name);
  form.append("model", models.join(","));
  form.append("preset", $("#presets input:checked")?.value || state.settings.default_preset);
  const bar = $("#upload-progress");
  bar.value = 0;
  $("#submit-button").disabled = true;
  try {
    const accepted = await upload("jobs", form, (f) => (bar.value = f));
    bar.value = 1;
    notice(`Job ${accepted.job_id} queued.`);
    await openJob(accepted.job_id);
  } catch (err) {
    showError(box, err);
  } finally {
    $("#submit-button").disabled = !state.plan || state.plan.problems.length > 0;
  }
}

// ---------------------------------------------------------------- watch a job

function renderProgress(snap) {
  $("#job-id").textContent = snap.job_id;
  badge($("#job-status"), snap.status);
  $("#job-progress").value = snap.progress || 0;
  $("#job-percent").textContent = `${fmt(snap.progress || 0, 0)}%`;
  $("#job-stage").textContent = snap.stage || "–";
  const q = snap.queue_position;
  $("#job-queue").textContent =
    q === null || q === undefined
      ? "–"
      : `${q === 0 ? "next" : `${q} job(s) ahead`}, estimated wait ${fmtSeconds(snap.estimated_wait_s)}`;
  const terminal = TERMINAL.has(snap.status);
  $("#cancel-button").hidden = terminal;
  if (terminal) $("#cancel-confirm").hidden = true;
  const log = $("#job-log");
  const line = `${snap.status} ${fmt(snap.progress || 0, 0)}% ${snap.stage || ""}`.trim();
  if (log.lastElementChild?.textContent !== line) {
    log.append(el("li", { "data-progress": snap.progress || 0, "data-status": snap.status }, line));
  }
}

async function openJob(jobId) {
  state.follow?.abort();
  showTab("submit");
  const section = $("#job");
  section.hidden = false;
  hideError($("#job-error"));
  $("#results").replaceChildren();
  $("#download-zip").hidden = true;
  $("#cancel-confirm").hidden = true;
  let log = $("#job-log");
  if (!log) {
    log = el("ol", { id: "job-log", class: "log", "aria-label": "Progress history" });
    $("#job .facts").after(el("details", {}, el("summary", {}, "Progress history"), log));
  }
  log.replaceChildren();
  const job = await apiJson(`jobs/${jobId}`);
  state.job = job;
  renderProgress(job);
  if (TERMINAL.has(job.status)) return showResult(job);
  const follow = new AbortController();
  state.follow = follow;
  try {
    await streamEvents(
      jobId,
      (name, data) => {
        renderProgress(data);
        if (name === "end" && data.status !== "deleted") showResult(data);
      },
      follow.signal,
    );
  } catch (err) {
    if (follow.signal.aborted) return;
    // The stream broke (proxy, network): fall back to polling the job.
    notice(`Progress stream lost (${describeError(err).code}); polling instead.`);
    for (;;) {
      await new Promise((r) => setTimeout(r, 2000));
      if (follow.signal.aborted) return;
      const j = await apiJson(`jobs/${jobId}`);
      renderProgress(j);
      if (TERMINAL.has(j.status)) return showResult(j);
    }
  }
}

async function askCancel() {
  const job = state.job;
  try {
    await apiFetch(`jobs/${job.job_id}/cancel`, { method: "POST" });
    notice("Cancel requested.");
  } catch (err) {
    if (err.code !== "CANCEL_CONFIRMATION_REQUIRED") return showError($("#job-error"), err);
    state.cancelToken = err.details.confirm_token;
    $("#cancel-question").textContent = `${err.message.split(";")[0]}. Really cancel?`;
    $("#cancel-confirm").hidden = false;
    $("#cancel-yes").focus();
  }
}

async function confirmCancel() {
  const job = state.job;
  $("#cancel-confirm").hidden = true;
  try {
    await apiJson(`jobs/${job.job_id}/cancel`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ confirm: true, token: state.cancelToken }),
    });
    notice(`Cancel of ${job.job_id} confirmed; it stops at the model's next checkpoint.`);
  } catch (err) {
    showError($("#job-error"), err);
  }
}

// ---------------------------------------------------------------- the result

function setWireframe(viewer, on) {
  // model-viewer has no wireframe switch; its three.js scene sits under a symbol property.
  const sym = Object.getOwnPropertySymbols(viewer).find((s) => s.description === "scene");
  const scene = sym && viewer[sym];
  if (!scene) return false;
  scene.traverse((o) => {
    if (o.isMesh) for (const m of [].concat(o.material)) m.wireframe = on;
  });
  scene.queueRender?.();
  return true;
}

async function showResult(job) {
  state.job = job;
  renderProgress(job);
  const errBox = $("#job-error");
  if (job.error) showError(errBox, job.error);
  const results = $("#results");
  results.replaceChildren();
  const models = Object.entries(job.models || {});
  results.classList.toggle("compare", models.filter(([, r]) => r.files?.length).length > 1);
  const withFiles = models.filter(([, r]) => r.files && r.files.length);
  $("#download-zip").hidden = withFiles.length === 0 || job.expired;
  if (job.expired) notice(`The files of job ${job.job_id} have expired.`);
  await viewerReady;
  for (const [model, run] of models) results.append(await renderRun(job, model, run));
}

async function renderRun(job, model, run) {
  const node = $("#result-template").content.firstElementChild.cloneNode(true);
  node.dataset.model = model;
  $(".model-name", node).textContent = model;
  const q = run.quality;
  badge($(".quality-badge", node), q ? q.status : run.status);
  $(".quality-summary", node).textContent = q
    ? `masked PSNR ${fmt(q.psnr, 2)} dB, SSIM ${fmt(q.ssim, 3)}` + (q.failed_views?.length ? `; failed views: ${q.failed_views.join(", ")}` : "")
    : run.error
      ? `${run.error.code}: ${run.error.message}`
      : run.status;
  const files = run.files || [];
  const link = (f) => run.links?.[f] || `jobs/${job.job_id}/files/${model}/${f}`;
  const viewer = $("model-viewer", node);
  viewer.setAttribute("alt", `The ${model} mesh of job ${job.job_id}`);
  if (files.includes("mesh.glb") && !job.expired) {
    blobUrl(link("mesh.glb").replace(/^\//, ""))
      .then((url) => (viewer.src = url))
      .catch(reportError);
  } else {
    $(".viewer-box", node).hidden = true;
  }
  $(".wireframe", node).addEventListener("change", (e) => setWireframe(viewer, e.target.checked));
  $(".rotate", node).addEventListener("change", (e) => viewer.toggleAttribute("auto-rotate", e.target.checked));
  $(".reset-view", node).addEventListener("click", () => {
    viewer.cameraOrbit = "35deg 70deg auto";
    viewer.jumpCameraToGoal();
  });
  viewer.addEventListener("load", () => {
    if ($(".wireframe", node).checked) setWireframe(viewer, true);
  });

  if (files.includes("quality.json") && !job.expired) {
    apiJson(link("quality.json").replace(/^\//, ""))
      .then((report) => {
        const body = $(".quality-table tbody", node);
        for (const v of report.per_view || []) {
          body.append(
            el(
              "tr",
              { "data-view": v.name },
              el("th", { scope: "row" }, v.name),
              el("td", {}, fmt(v.psnr, 2)),
              el("td", {}, fmt(v.ssim, 3)),
              el("td", {}, el("span", { class: "badge", "data-status": v.status }, v.status)),
            ),
          );
        }
      })
      .catch(reportError);
  }

  const previews = $(".previews", node);
  const order = (f) => (f.includes("contact_sheet") ? 0 : f.includes("turntable") ? 1 : f.includes("textured") ? 2 : 3);
  const images = files.filter((f) => f.startsWith("previews/") && /\.(png|gif)$/.test(f)).sort((a, b) => order(a) - order(b) || a.localeCompare(b));
  if (job.expired) previews.append(el("p", {}, "Expired."));
  for (const f of job.expired ? [] : images) {
    const img = el("img", { alt: f.replace("previews/", "").replace(/[_.]/g, " "), "data-file": f });
    const fig = el("figure", { class: f.includes("contact_sheet") ? "wide" : "" }, img, el("figcaption", {}, f.replace("previews/", "")));
    previews.append(fig);
    blobUrl(link(f).replace(/^\//, ""))
      .then((url) => (img.src = url))
      .catch(reportError);
  }

  const list = $(".files", node);
  for (const f of files) {
    list.append(
      el(
        "li",
        {},
        el("button", { type: "button", class: "linkish", onclick: () => saveFile(link(f).replace(/^\//, ""), `${model}-${f.replaceAll("/", "-")}`).catch(reportError) }, f),
      ),
    );
  }
  return node;
}

// ---------------------------------------------------------------- jobs list

let jobsLoad = 0;

async function loadJobs() {
  const status = $("#jobs-filter").value;
  const mine = ++jobsLoad;
  const page = await apiJson(`jobs?limit=100${status ? `&status=${status}` : ""}`);
  if (mine !== jobsLoad) return; // a newer filter's answer wins
  const body = $("#jobs-table tbody");
  body.replaceChildren();
  for (const j of page.items) {
    const terminal = TERMINAL.has(j.status);
    const actions = el("td", { class: "row-actions" });
    actions.append(el("button", { type: "button", onclick: () => openJob(j.job_id).catch(reportError) }, "Open"));
    if (terminal) {
      const del = el("button", { type: "button", class: "danger" }, "Delete");
      del.addEventListener("click", async () => {
        if (del.dataset.armed !== "1") {
          del.dataset.armed = "1";
          del.textContent = "Confirm delete";
          return;
        }
        try {
          await apiFetch(`jobs/${j.job_id}`, { method: "DELETE" });
          forgetBlobs(`jobs/${j.job_id}/`);
          notice(`Job ${j.job_id} deleted.`);
          await loadJobs();
        } catch (err) {
          reportError(err);
        }
      });
      actions.append(del);
    }
    body.append(
      el(
        "tr",
        { "data-job": j.job_id, "data-status": j.status },
        el("th", { scope: "row" }, el("code", {}, j.job_id)),
        el("td", {}, el("span", { class: "badge", "data-status": j.status }, j.status)),
        el("td", {}, `${fmt(j.progress, 0)}%`),
        el("td", {}, Object.keys(j.models).join(", ")),
        el("td", {}, j.preset),
        el("td", {}, new Date(j.created_at * 1000).toLocaleString()),
        actions,
      ),
    );
  }
  if (!page.items.length) body.append(el("tr", {}, el("td", { colspan: 7 }, "No jobs.")));
}

// ---------------------------------------------------------------- experiments

async function loadExperiments() {
  const select = $("#experiment-select");
  const list = await apiJson("experiments?limit=50");
  const current = select.value;
  select.replaceChildren(...list.items.map((x) => el("option", { value: x.experiment_id }, `${x.name || x.experiment_id} (${x.status})`)));
  if (!list.items.length) {
    $("#experiment-summary").textContent = "No experiments yet (POST /experiments, or bench/sweep.py).";
    $("#experiment-figure").hidden = true;
    $("#experiment-table tbody").replaceChildren();
    return;
  }
  if (current && list.items.some((x) => x.experiment_id === current)) select.value = current;
  await showExperiment(select.value);
}

async function showExperiment(id) {
  const exp = await apiJson(`experiments/${id}`);
  const counts = Object.entries(exp.counts || {}).map(([k, v]) => `${v} ${k}`).join(", ");
  $("#experiment-summary").textContent = `${exp.status}: ${exp.runs_total} runs (${counts}); Pareto front: ${(exp.pareto || []).join(", ") || "–"}`;
  const body = $("#experiment-table tbody");
  body.replaceChildren(
    ...exp.runs.map((r) =>
      el(
        "tr",
        { "data-slug": r.slug },
        el("th", { scope: "row" }, r.slug),
        el("td", {}, r.status + (r.error_code ? ` (${r.error_code})` : "")),
        el("td", {}, r.quality_status ? el("span", { class: "badge", "data-status": r.quality_status }, r.quality_status) : "–"),
        el("td", {}, fmt(r.psnr, 2)),
        el("td", {}, fmt(r.ssim, 3)),
        el("td", {}, fmt(r.f_score, 3)),
        el("td", {}, r.faces ?? "–"),
        el("td", {}, fmt(r.model_s, 1)),
        el("td", {}, r.pareto ? "yes" : ""),
      ),
    ),
  );
  const finished = exp.runs.some((r) => r.status === "succeeded");
  $("#experiment-figure").hidden = !finished;
  if (finished) {
    forgetBlobs(`experiments/${id}/plot.png`);
    $("#experiment-plot").src = await blobUrl(`experiments/${id}/plot.png`);
  }
}

// ---------------------------------------------------------------- monitoring

function monitoringLinks(settings) {
  const host = location.hostname || "127.0.0.1";
  const dash = settings.dashboard_url || `${location.protocol}//${host}:${settings.dashboard_port}`;
  const grafana = settings.grafana_url || `${location.protocol}//${host}:${settings.grafana_port}`;
  $("#dashboard-link").href = dash;
  $("#dashboard-link").textContent = `Ray dashboard (${dash})`;
  $("#grafana-link").href = grafana;
  $("#grafana-link").textContent = `Grafana (${grafana})`;
}

async function loadHealth() {
  const h = await apiJson("health");
  const models = Object.entries(h.models || {}).map(([m, x]) => `${m}: ${x.status}${x.device ? ` on ${x.device}` : ""}`);
  $("#health").textContent = `status ${h.status}, version ${h.version}\nnodes ${h.ray?.nodes ?? "?"}, GPUs ${h.gpus?.length || 0}\n${models.join("\n")}\nqueued ${h.jobs?.queued ?? "?"}, running ${h.jobs?.running ?? "?"}`;
}

// ---------------------------------------------------------------- start

async function main() {
  setKeyPrompt(askForKey);
  updateKeyButton();
  for (const b of $$("nav [data-tab]")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("#key-button").addEventListener("click", () => askForKey(null));
  wireDropZones();
  $("#submit-form").addEventListener("submit", submit);
  $("#cancel-button").addEventListener("click", () => askCancel().catch(reportError));
  $("#cancel-yes").addEventListener("click", () => confirmCancel().catch(reportError));
  $("#cancel-no").addEventListener("click", () => ($("#cancel-confirm").hidden = true));
  $("#download-zip").addEventListener("click", () => {
    const id = state.job.job_id;
    saveFile(`jobs/${id}/download`, `recon3d-${id}.zip`).catch((err) => showError($("#job-error"), err));
  });
  $("#jobs-filter").addEventListener("change", () => loadJobs().catch(reportError));
  $("#jobs-refresh").addEventListener("click", () => loadJobs().catch(reportError));
  $("#experiments-refresh").addEventListener("click", () => loadExperiments().catch(reportError));
  $("#experiment-select").addEventListener("change", (e) => showExperiment(e.target.value).catch(reportError));

  state.settings = await apiJson("ui/settings.json");
  renderChoices(state.settings);
  monitoringLinks(state.settings);
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("job")) await openJob(hash.get("job"));
  document.body.dataset.ready = "1";
}

main().catch((err) => {
  reportError(err);
  document.body.dataset.ready = "error";
});
