// The service's HTTP API as the page uses it: one fetch wrapper (API key, error shape),
// the SSE progress stream read through fetch (so it can carry the key), uploads with
// progress (XMLHttpRequest), and blob: URLs for files (so <img> and the viewer need no key).

const KEY_STORAGE = "recon3d.apiKey";

// The API lives at the origin root the page was served under: this module is <root>/ui/api.js.
export const API_ROOT = new URL("../", import.meta.url);

export class ApiError extends Error {
  constructor(status, code, message, details = {}, requestId = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details || {};
    this.requestId = requestId;
  }
}

// What each stable error code means to a person (docs/API.md has the full table).
export const ERROR_WORDS = {
  INVALID_REQUEST: "The form is not complete or a field is wrong.",
  UNKNOWN_MODEL: "The service does not know that model.",
  UNKNOWN_PRESET: "The preset must be fast, balanced or quality.",
  INVALID_INPUT: "The bundle breaks the input format.",
  MISSING_VIEW: "A view is missing: the six views are front, back, left, right, top and bottom.",
  UNKNOWN_VIEW: "A file is named after no known view.",
  MISSING_DEPTH: "A view has no depth render of the same name.",
  INVALID_IMAGE: "An image could not be decoded.",
  RESOLUTION_MISMATCH: "A depth render and its view differ in size.",
  EMPTY_DEPTH: "A depth render holds no depth.",
  INVALID_TRANSFORMS: "transforms.json is not valid.",
  INVALID_ARCHIVE: "The ZIP archive cannot be read.",
  UNSAFE_ARCHIVE: "The ZIP archive holds unsafe paths.",
  INSUFFICIENT_VIEWS: "Too few views to reconstruct from.",
  INPUT_TOO_LARGE: "The upload is larger than the service accepts.",
  UNSUPPORTED_MEDIA_TYPE: "A file has the wrong type (views and depth renders are PNG or JPEG, a bundle is a ZIP).",
  JOB_NOT_FOUND: "There is no such job (it may have been deleted).",
  JOB_NOT_READY: "The job has not finished yet.",
  JOB_ALREADY_FINISHED: "The job has already finished.",
  CANCEL_CONFIRMATION_REQUIRED: "Canceling needs a confirmation.",
  JOB_EXPIRED: "The job's files have expired and were deleted.",
  QUEUE_FULL: "The queue is full; try again in a minute.",
  MODEL_UNAVAILABLE: "That model is not served by this deployment.",
  SERVICE_NOT_READY: "The service is still starting.",
  UNAUTHORIZED: "An API key is needed.",
  AUTH_REQUIRED: "An API key is needed.",
  INVALID_API_KEY: "The API key was refused.",
  FORBIDDEN: "This API key may not do that.",
  MODEL_FAILED: "The model could not produce a mesh.",
  MODEL_OOM: "The model ran out of memory.",
  QUALITY_FAILED: "The mesh re-renders poorly against the photos (the files are still there).",
  JOB_TIMEOUT: "The job ran past its time limit.",
  JOB_INTERRUPTED: "The service stopped during the job.",
  REPLICA_LOST: "The model's worker was lost during the job.",
  CANCELED: "The job was canceled.",
  NETWORK: "The service could not be reached.",
  INTERNAL: "The service hit a bug; the request id finds it in the logs.",
};

export function describeError(err) {
  const words = ERROR_WORDS[err.code] || "The request failed.";
  return { code: err.code || "ERROR", words, message: err.message || "" };
}

// ---------------------------------------------------------------- the API key

export function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function storeKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

let keyPrompt = async () => null;

// fn(reason) -> Promise<string|null>: asks the person for a key (the page's dialog).
export function setKeyPrompt(fn) {
  keyPrompt = fn;
}

function authHeaders(extra = {}) {
  const key = storedKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

async function errorFrom(resp) {
  let body = null;
  try {
    body = await resp.json();
  } catch {
    /* not JSON */
  }
  const e = body && body.error;
  if (e && e.code) return new ApiError(resp.status, e.code, e.message, e.details, body.request_id);
  return new ApiError(resp.status, resp.status === 401 ? "UNAUTHORIZED" : `HTTP_${resp.status}`, resp.statusText);
}

// fetch(path) under the API root with the key; a 401 asks for a key once and retries.
export async function apiFetch(path, options = {}, retried = false) {
  let resp;
  try {
    resp = await fetch(new URL(path, API_ROOT), { ...options, headers: authHeaders(options.headers) });
  } catch (err) {
    throw new ApiError(0, "NETWORK", String(err));
  }
  if (resp.status === 401 && !retried) {
    const err = await errorFrom(resp);
    const key = await keyPrompt(err);
    if (key) {
      storeKey(key);
      return apiFetch(path, options, true);
    }
    throw err;
  }
  if (!resp.ok) throw await errorFrom(resp);
  return resp;
}

export async function apiJson(path, options = {}) {
  const resp = await apiFetch(path, options);
  return resp.status === 204 ? null : resp.json();
}

// ---------------------------------------------------------------- files as blob: URLs

const blobUrls = new Map();

export async function blobUrl(path) {
  if (!blobUrls.has(path)) {
    const blob = await (await apiFetch(path)).blob();
    blobUrls.set(path, URL.createObjectURL(blob));
  }
  return blobUrls.get(path);
}

export function forgetBlobs(prefix) {
  for (const [path, url] of blobUrls) {
    if (path.startsWith(prefix)) {
      URL.revokeObjectURL(url);
      blobUrls.delete(path);
    }
  }
}

// Save a file of the API to disk under `filename` (fetched with the key, then a download link).
export async function saveFile(path, filename) {
  const blob = await (await apiFetch(path)).blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
  return blob.size;
}

// ---------------------------------------------------------------- progress events (SSE)

// Reads GET /jobs/{id}/events through fetch, calling onEvent(name, data) for each event,
// until the stream ends (the server closes it at a terminal state) or signal aborts.
export async function streamEvents(jobId, onEvent, signal) {
  const resp = await apiFetch(`jobs/${encodeURIComponent(jobId)}/events`, {
    headers: { Accept: "text/event-stream" },
    signal,
  });
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

// ---------------------------------------------------------------- upload with progress

// POST a FormData with upload progress (fetch cannot report it); resolves the JSON body.
export function upload(path, form, onProgress, retried = false) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", new URL(path, API_ROOT));
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onerror = () => reject(new ApiError(0, "NETWORK", "the upload was interrupted"));
    xhr.onload = async () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        /* not JSON */
      }
      if (xhr.status >= 200 && xhr.status < 300) return resolve(body);
      const e = body && body.error;
      const err = e
        ? new ApiError(xhr.status, e.code, e.message, e.details, body.request_id)
        : new ApiError(xhr.status, xhr.status === 401 ? "UNAUTHORIZED" : `HTTP_${xhr.status}`, xhr.statusText);
      if (xhr.status === 401 && !retried) {
        const key = await keyPrompt(err);
        if (key) {
          storeKey(key);
          return upload(path, form, onProgress, true).then(resolve, reject);
        }
      }
      reject(err);
    };
    xhr.send(form);
  });
}
