// Checks of the chosen files before anything is uploaded: names, types and sizes, with the
// service's own error codes (docs/input-format.md), so a wrong drop fails at once, in words.

export const VIEW_NAMES = ["front", "back", "left", "right", "top", "bottom"];
const IMAGE_EXT = /\.(png|jpe?g)$/i;
const PNG_MAGIC = [0x89, 0x50, 0x4e, 0x47];
const JPEG_MAGIC = [0xff, 0xd8, 0xff];
const ZIP_MAGIC = [0x50, 0x4b];

async function startsWith(file, magic) {
  const head = new Uint8Array(await file.slice(0, magic.length).arrayBuffer());
  return magic.every((b, i) => head[i] === b);
}

function baseName(path) {
  return path.split("/").pop();
}

function stem(name) {
  return name.replace(/\.[^.]+$/, "").toLowerCase();
}

// What the drop holds, by its path: the bundle's folders decide; loose files go by zone.
function roleOf(entry) {
  const parts = entry.path.split("/");
  if (parts.includes("multi_views")) return "views";
  if (parts.includes("depth_renders")) return "depth_renders";
  if (baseName(entry.path) === "transforms.json") return "transforms";
  if (/\.zip$/i.test(entry.path)) return "bundle";
  if (entry.zone === "views" || entry.zone === "depth_renders") return entry.zone;
  return parts.length > 1 ? "ignored" : "unknown";
}

/**
 * entries: [{path, file, zone}] (path relative, "/"-separated; zone "bundle", "views" or "depth_renders").
 * Resolves {kind: "bundle"|"files"|null, parts: [[field, File, filename]], problems: [{code, text}],
 *           ignored: [path], bytes}.
 */
export async function planUpload(entries, maxBytes) {
  const problems = [];
  const ignored = [];
  const parts = [];
  const byRole = { views: [], depth_renders: [], transforms: [], bundle: [], unknown: [] };
  for (const e of entries) {
    const role = roleOf(e);
    if (role === "ignored") ignored.push(e.path);
    else byRole[role].push(e);
  }
  const bytes = entries.filter((e) => !ignored.includes(e.path)).reduce((n, e) => n + e.file.size, 0);
  if (maxBytes && bytes > maxBytes) {
    problems.push({
      code: "INPUT_TOO_LARGE",
      text: `the files add up to ${fmtBytes(bytes)}; the service takes at most ${fmtBytes(maxBytes)}`,
    });
  }
  for (const e of byRole.unknown) {
    problems.push({
      code: "UNKNOWN_VIEW",
      text: `${e.path}: drop loose images on "Views" or "Depth renders", or drop the whole bundle folder`,
    });
  }

  if (byRole.bundle.length) {
    if (byRole.bundle.length > 1 || byRole.views.length || byRole.depth_renders.length) {
      problems.push({ code: "INVALID_REQUEST", text: "send one bundle ZIP, or views and depth renders, not both" });
    }
    const zip = byRole.bundle[0];
    if (!(await startsWith(zip.file, ZIP_MAGIC))) {
      problems.push({ code: "UNSUPPORTED_MEDIA_TYPE", text: `${zip.path} is not a ZIP archive` });
    }
    parts.push(["bundle", zip.file, baseName(zip.path)]);
    if (byRole.transforms.length) parts.push(["transforms", byRole.transforms[0].file, "transforms.json"]);
    return { kind: "bundle", parts, problems, ignored, bytes };
  }

  const posed = byRole.transforms.length > 0;
  const names = {};
  for (const field of ["views", "depth_renders"]) {
    names[field] = new Set();
    for (const e of byRole[field]) {
      const name = baseName(e.path);
      if (!IMAGE_EXT.test(name)) {
        problems.push({ code: "UNSUPPORTED_MEDIA_TYPE", text: `${e.path} is not a .png or .jpg image` });
        continue;
      }
      if (!(await startsWith(e.file, PNG_MAGIC)) && !(await startsWith(e.file, JPEG_MAGIC))) {
        problems.push({ code: "UNSUPPORTED_MEDIA_TYPE", text: `${e.path} is not a PNG or JPEG image` });
        continue;
      }
      if (!posed && !VIEW_NAMES.includes(stem(name))) {
        problems.push({ code: "UNKNOWN_VIEW", text: `${e.path}: the views are named ${VIEW_NAMES.join(", ")}` });
        continue;
      }
      if (names[field].has(stem(name))) {
        problems.push({ code: "INVALID_REQUEST", text: `${field === "views" ? "views" : "depth renders"} have ${stem(name)} twice` });
        continue;
      }
      names[field].add(stem(name));
      parts.push([field, e.file, name]);
    }
  }
  if (!names.views.size && !names.depth_renders.size) {
    if (!problems.length) problems.push({ code: "INVALID_REQUEST", text: "no input yet: drop a bundle ZIP or folder, or the views and depth renders" });
    return { kind: null, parts: [], problems, ignored, bytes };
  }
  const wanted = posed ? [...names.views] : VIEW_NAMES;
  const missingViews = wanted.filter((n) => !names.views.has(n));
  const missingDepth = wanted.filter((n) => names.views.has(n) && !names.depth_renders.has(n));
  const orphanDepth = [...names.depth_renders].filter((n) => !names.views.has(n) && !missingViews.includes(n));
  if (missingViews.length) problems.push({ code: "MISSING_VIEW", text: `missing views: ${missingViews.join(", ")}` });
  if (missingDepth.length) problems.push({ code: "MISSING_DEPTH", text: `no depth render for: ${missingDepth.join(", ")}` });
  if (orphanDepth.length) problems.push({ code: "UNKNOWN_VIEW", text: `depth renders without a view: ${orphanDepth.join(", ")}` });
  if (posed) parts.push(["transforms", byRole.transforms[0].file, "transforms.json"]);
  return { kind: "files", parts, problems, ignored, bytes };
}

// Every file under a dropped folder, as {path, file} (DataTransferItem entries, recursively).
export async function entriesFromDrop(dataTransfer, zone) {
  const out = [];
  const walk = async (entry, prefix) => {
    if (entry.isFile) {
      const file = await new Promise((res, rej) => entry.file(res, rej));
      out.push({ path: prefix + entry.name, file, zone });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((res, rej) => reader.readEntries(res, rej));
        if (!batch.length) break;
        for (const child of batch) await walk(child, `${prefix}${entry.name}/`);
      }
    }
  };
  const roots = [...dataTransfer.items].map((it) => it.webkitGetAsEntry && it.webkitGetAsEntry()).filter(Boolean);
  if (roots.length) for (const r of roots) await walk(r, "");
  else for (const file of dataTransfer.files) out.push({ path: file.name, file, zone });
  return out;
}

export function entriesFromInput(input, zone) {
  return [...input.files].map((file) => ({ path: file.webkitRelativePath || file.name, file, zone }));
}

export function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1024 ** 3) return `${(n / 1024 ** 2).toFixed(1)} MiB`;
  return `${(n / 1024 ** 3).toFixed(2)} GiB`;
}
