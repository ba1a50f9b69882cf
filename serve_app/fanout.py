"""Fan-out after a model run: per-view metrics and previews as Ray tasks, then quality.json.

Launched by the job scheduler (in the ingress replica) once a model deployment has
uploaded its mesh, so the model replica is already free for the next job. Every task
is named after the job (``<job_id>:metrics:<view>``, ``<job_id>:preview:03``...) so the
Ray dashboard reads as a job timeline. A task that fails is retried ``max_retries``
times by Ray; a view that still fails is *reported* in quality.json's ``failed_views``
and in the run's warnings, never silently dropped.

Tasks exchange only store keys and Ray object refs (the mesh and the posed frames are
put in the object store once and shared by all tasks).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ray

from .store import Store

#: Files of a model's output that the mesh loader needs.
MESH_FILES = ("mesh.obj", "material.mtl", "texture_kd.png")
#: Resolution of the per-index preview PNGs, pixels.
PREVIEW_RESOLUTION = 512


@dataclass
class FanoutResult:
    files: list[str] = field(default_factory=list)
    """Paths added under the model's artifact folder (quality.json, previews/...)."""
    quality: dict | None = None
    """Summary of quality.json: status, psnr, ssim, failed_views."""
    warnings: list[str] = field(default_factory=list)
    error: dict | None = None
    """{code, message, details} when quality.json could not be made or its status is failure."""


# ---------------------------------------------------------------- tasks (run on any worker)


@ray.remote
def load_mesh_task(store: Store, prefix: str):
    """The model's mesh as a TexturedMesh (read back from the store)."""
    from pipeline.evaluate import load_mesh_file  # pipeline.export.load_mesh when that exists

    with tempfile.TemporaryDirectory(prefix="recon3d-mesh-") as tmp:
        for name in MESH_FILES:
            (Path(tmp) / name).write_bytes(store.get(f"{prefix}/{name}"))
        return load_mesh_file(Path(tmp) / "mesh.obj")


@ray.remote(num_returns=2)
def prepare_frames_task(store: Store, input_key: str, preset: str, resolved: list[dict] | None):
    """(PosedFrames, view names) of the job's upload, with the cameras and depth encodings the model resolved."""
    from pipeline.bundle import load_bundle
    from pipeline.config import get_preset
    from pipeline.prepare import prepare_frames

    frames = prepare_frames(load_bundle(store.get(input_key)), get_preset(preset, device="cpu"), resolved=resolved)
    return frames, [v.name for v in frames.views]


@ray.remote
def evaluate_view_task(mesh, frames, index: int) -> dict:
    from pipeline.metrics import evaluate_view

    return evaluate_view(mesh, frames.views[index])


@ray.remote
def preview_task(mesh, index: int, n: int, store: Store, prefix: str) -> list[str]:
    """textured_XX.png and wireframe_XX.png of preview camera ``index``; returns their relative paths."""
    from pipeline.previews import render_preview, render_wireframe
    from pipeline.synthetic import png_bytes

    out = []
    for kind, fn in (("textured", render_preview), ("wireframe", render_wireframe)):
        rel = f"previews/{kind}_{index:02d}.png"
        store.put(f"{prefix}/{rel}", png_bytes(fn(mesh, index, n=n, resolution=PREVIEW_RESOLUTION)))
        out.append(rel)
    return out


@ray.remote
def turntable_task(mesh, store: Store, prefix: str) -> list[str]:
    from pipeline.previews import write_turntable_gif

    with tempfile.TemporaryDirectory(prefix="recon3d-gif-") as tmp:
        path = write_turntable_gif(mesh, Path(tmp) / "turntable.gif")
        store.put_file(f"{prefix}/previews/turntable.gif", path)
    return ["previews/turntable.gif"]


@ray.remote
def contact_sheet_task(mesh, frames, per_view: list[dict], store: Store, prefix: str) -> list[str]:
    from pipeline.previews import write_contact_sheet

    with tempfile.TemporaryDirectory(prefix="recon3d-sheet-") as tmp:
        path = write_contact_sheet(mesh, frames, Path(tmp) / "contact_sheet.png", per_view=per_view)
        store.put_file(f"{prefix}/previews/contact_sheet.png", path)
    return ["previews/contact_sheet.png"]


@ray.remote
def quality_task(
    per_view: list[dict], failed_views: list[dict], mesh, frames, result: dict, store: Store, prefix: str
) -> dict:
    """Build quality.json (build_quality_report) and store it; returns its summary."""
    from pipeline.quality import build_quality_report

    report = build_quality_report(
        per_view,
        mesh=mesh,
        model=result.get("model", ""),
        preset=result.get("preset", ""),
        timings=result.get("timings_s", {}),
        camera_estimate=frames.camera_estimate,
    )
    doc = json.loads(report.model_dump_json())
    doc["failed_views"] = failed_views
    store.put(f"{prefix}/quality.json", json.dumps(doc, indent=2).encode())
    return {
        "status": report.status,
        "psnr": report.psnr,
        "ssim": report.ssim,
        "failed_views": [f["view"] for f in failed_views],
        "error": report.error.model_dump() if report.error is not None else None,
    }


# ---------------------------------------------------------------- orchestration (ingress event loop)


def _error_text(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    return str(cause if cause is not None else e).strip().splitlines()[-1][:500]


async def run_fanout(**kw) -> FanoutResult:
    """Metrics per view and previews in parallel, then quality.json (see :func:`_fanout`).

    When the caller is canceled (the job was canceled or timed out), every task it started is
    ``ray.cancel``-ed, so no fan-out keeps computing for a job that has ended.
    """
    refs: list = []
    try:
        return await _fanout(refs=refs, **kw)
    except asyncio.CancelledError:
        for ref in refs:
            try:
                ray.cancel(ref, recursive=True)
            except Exception:  # already finished, or freed
                pass
        raise


async def _fanout(
    *,
    refs: list,
    job_id: str,
    store: Store,
    input_key: str,
    prefix: str,
    preset: str,
    result: dict,
    max_retries: int,
    num_cpus: float,
    n_previews: int,
) -> FanoutResult:
    """Metrics per view and previews in parallel, then quality.json. Never raises for a task failure."""
    opts = {"max_retries": max_retries, "retry_exceptions": True, "num_cpus": num_cpus}
    out = FanoutResult()
    try:
        mesh = load_mesh_task.options(name=f"{job_id}:load_mesh", **opts).remote(store, prefix)
        frames, names_ref = prepare_frames_task.options(name=f"{job_id}:prepare_frames", **opts).remote(
            store, input_key, preset, result.get("cameras")
        )
        refs += [mesh, frames, names_ref]
        names: list[str] = await names_ref
    except Exception as e:
        out.error = {
            "code": "QUALITY_FAILED",
            "message": f"could not load the mesh or the views: {_error_text(e)}",
            "details": {},
        }
        return out

    metric_refs = {
        name: evaluate_view_task.options(name=f"{job_id}:metrics:{name}", **opts).remote(mesh, frames, i)
        for i, name in enumerate(names)
    }
    preview_refs = [
        preview_task.options(name=f"{job_id}:preview:{i:02d}", **opts).remote(mesh, i, n_previews, store, prefix)
        for i in range(n_previews)
    ]
    preview_refs.append(turntable_task.options(name=f"{job_id}:turntable", **opts).remote(mesh, store, prefix))
    refs += [*metric_refs.values(), *preview_refs]

    per_view: list[dict] = []
    failed: list[dict] = []
    for name, ref in metric_refs.items():
        try:
            per_view.append(await ref)
        except Exception as e:
            failed.append({"view": name, "error": _error_text(e)})
            out.warnings.append(f"metrics of view {name!r} failed after {max_retries} retries: {_error_text(e)}")

    tail = [
        contact_sheet_task.options(name=f"{job_id}:contact_sheet", **opts).remote(mesh, frames, per_view, store, prefix)
    ]
    quality_ref = quality_task.options(name=f"{job_id}:quality", **opts).remote(
        per_view, failed, mesh, frames, result, store, prefix
    )
    refs += [*tail, quality_ref]
    for ref in [*preview_refs, *tail]:
        try:
            out.files.extend(await ref)
        except Exception as e:
            out.warnings.append(f"a preview failed: {_error_text(e)}")
    try:
        out.quality = await quality_ref
        out.files.append("quality.json")
    except Exception as e:
        out.error = {
            "code": "QUALITY_FAILED",
            "message": f"quality.json could not be built: {_error_text(e)}",
            "details": {},
        }
        return out
    if out.quality.get("error"):
        err = out.quality["error"]
        out.error = {"code": err.get("code", "QUALITY_FAILED"), "message": err.get("message", ""), "details": {}}
    elif failed:
        out.warnings.append(f"{len(failed)} of {len(names)} views have no metrics")
    return out
