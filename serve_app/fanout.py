"""Fan-out after a model run: the evaluation path's parts as Ray tasks, then quality.json.

Used on clusters of more than one node (``AppArgs.evaluate_in``, :func:`replica_evaluates`); on one
node the model replica runs the same parts itself (``deployments/replica_evaluation.py``) and
:func:`from_replica` reads what it sent.

The parts are :mod:`pipeline.evaluation`'s, the same functions the CLI runs in one process
(:func:`pipeline.evaluation.evaluate_result`): per-view metrics, preview cameras, the turntable,
the contact sheet and quality.json. Launched by the job scheduler (in the ingress replica)
once a model deployment has uploaded its mesh, so the model replica is already free for the
next job. Every task is named after the job (``<job_id>:metrics:<view>``, ``<job_id>:preview:03``
...) so the Ray dashboard reads as a job timeline. A task that fails is retried ``max_retries``
times by Ray; a view that still fails is *reported* in quality.json's ``failed_views`` and in
the run's warnings, never silently dropped.

The model replica puts the published mesh, the frames it was made from and the previews'
shading normals in the object store as soon as the mesh files exist
(``ResultEvent.evaluation_inputs``); every task takes those refs, so nothing is read back or
decoded again. Without them (a custom runner, or the replica that owned them is gone) the
fan-out reads the mesh from the store and prepares the frames from the upload with the run's
resolved config, typed (``result.json``'s ``config``: preset plus overrides), never by resolving
the preset again. Tasks exchange only store keys and Ray object refs.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import ray

from deployments.protocol import QUALITY_FAILED
from deployments.store import Store
from pipeline import evaluation as EV
from pipeline.config import ReconstructConfig
from pipeline.result import QualitySummary, ReconstructionResult

logger = logging.getLogger("recon3d.fanout")


@dataclass
class FanoutResult:
    files: list[str] = field(default_factory=list)
    """Paths added under the model's artifact folder (quality.json, previews/...)."""
    quality: QualitySummary | None = None
    """Summary of quality.json: status, psnr, ssim, failed_views."""
    warnings: list[str] = field(default_factory=list)
    error: dict | None = None
    """{code, message, details} when quality.json could not be made or its status is failure."""


def from_replica(quality: dict | None, error: dict | None, warnings: list[str] | None = None) -> FanoutResult:
    """The FanoutResult of a replica that evaluated its own mesh (``QualityEvent`` / ``ResultEvent.evaluation``).

    Its files came with the model's (``ResultEvent.files``), so ``files`` stays empty."""
    out = FanoutResult(warnings=list(warnings or []))
    if quality:
        out.quality = QualitySummary(
            **{k: quality[k] for k in ("status", "psnr", "ssim", "failed_views") if k in quality}
        )
    if error:
        out.error = {"code": error.get("code", QUALITY_FAILED), "message": error.get("message", ""), "details": {}}
    return out


async def replica_evaluates(evaluate_in: str) -> bool:
    """Whether a model run's replica scores its own mesh (``AppArgs.evaluate_in``); decided per run.

    ``auto``: yes while the Ray cluster has one node. There the tasks would share the replica's
    cores, and their workers start cold for each job (Ray stops idle workers between jobs on a
    small node), so each task imports the library again; the replica has it imported and the
    frames in memory. With more nodes the tasks spread over them, and the model replica (and its
    GPU) is free as soon as its mesh is published.
    """
    if evaluate_in != "auto":
        return evaluate_in == "replica"
    return await asyncio.to_thread(_alive_nodes) == 1


def _alive_nodes() -> int | None:
    """Alive nodes of the Ray cluster this process is connected to; None outside Ray."""
    if not ray.is_initialized():
        return None
    try:
        return sum(1 for n in ray.nodes() if n.get("Alive"))
    except Exception:  # GCS unreachable: fall back to the tasks, which work on any cluster
        logger.warning("could not count the cluster's nodes", exc_info=True)
        return None


# ---------------------------------------------------------------- tasks (run on any worker)


def _put(store: Store, prefix: str, files: dict[str, bytes]) -> list[str]:
    for rel, data in files.items():
        store.put(f"{prefix}/{rel}", data)
    return sorted(files)


@ray.remote
def load_mesh_task(store: Store, prefix: str):
    """The model's mesh as a TexturedMesh (read back from the store)."""
    return EV.published_mesh(lambda name: store.get(f"{prefix}/{name}"))


@ray.remote(num_returns=2)
def prepare_frames_task(store: Store, input_key: str, result: ReconstructionResult, cfg: ReconstructConfig):
    """(PosedFrames, view names) of the job's upload, with the config, cameras and depth encodings the model used."""
    frames = EV.frames_for_result(store.get(input_key), result, cfg)
    return frames, [v.name for v in frames.views]


@ray.remote
def normals_task(mesh):
    """The previews' corner normals (when the model replica did not put them)."""
    from pipeline.previews import corner_normals

    return corner_normals(mesh.vertices, mesh.faces)


@ray.remote
def evaluate_view_task(mesh, frames, index: int) -> dict:
    return EV.view_metrics(mesh, frames, index)


@ray.remote
def preview_task(mesh, normals, index: int, n: int, store: Store, prefix: str) -> list[str]:
    """textured_XX.png and wireframe_XX.png of preview camera ``index``; returns their relative paths."""
    return _put(store, prefix, EV.preview_pngs(mesh, index, n, renderer=EV.PreviewRenderer(mesh, normals=normals)))


@ray.remote
def turntable_task(mesh, normals, store: Store, prefix: str) -> list[str]:
    return _put(store, prefix, EV.turntable_gif(mesh, renderer=EV.PreviewRenderer(mesh, normals=normals)))


@ray.remote
def contact_sheet_task(mesh, frames, per_view: list[dict], store: Store, prefix: str) -> list[str]:
    return _put(store, prefix, EV.contact_sheet_png(mesh, frames, per_view))


@ray.remote
def quality_task(
    per_view: list[dict],
    failed_views: list[dict],
    mesh,
    frames,
    result: ReconstructionResult,
    store: Store,
    prefix: str,
) -> EV.EvaluationOutput:
    """Build quality.json (pipeline.evaluation.quality_document) and store it; returns its summary."""
    doc, out = EV.quality_document(per_view, failed_views, mesh, frames, result)
    _put(store, prefix, {EV.QUALITY_FILE: EV.quality_json(doc)})
    return out


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


def _quality_failed(message: str) -> dict:
    return {"code": QUALITY_FAILED, "message": message, "details": {}}


async def _fanout(
    *,
    refs: list,
    job_id: str,
    store: Store,
    input_key: str,
    prefix: str,
    result: ReconstructionResult,
    max_retries: int,
    num_cpus: float,
    n_previews: int,
    inputs: dict | None = None,
    on_quality=None,
) -> FanoutResult:
    """Metrics per view and previews in parallel, then quality.json. Never raises for a task failure.

    ``inputs``: the model replica's object refs (``mesh``, ``frames``, ``normals``), when it put them.
    ``on_quality(result)``: awaited once quality.json exists, before the remaining previews are
    awaited (``result.quality`` / ``error`` set, ``files`` not yet complete).
    """
    opts = {"max_retries": max_retries, "retry_exceptions": True, "num_cpus": num_cpus}
    out = FanoutResult()
    if await _reachable(inputs) and result.views:
        mesh, frames, normals = inputs["mesh"], inputs["frames"], inputs["normals"]
        names = list(result.views)
    else:
        try:
            mesh, frames, names = await _load_inputs(job_id, store, input_key, prefix, result, opts, refs)
        except Exception as e:
            out.error = _quality_failed(f"could not load the mesh or the views: {_error_text(e)}")
            return out
        normals = normals_task.options(name=f"{job_id}:normals", **opts).remote(mesh)
        refs.append(normals)

    preview_refs = _launch_previews(job_id, mesh, normals, n_previews, store, prefix, opts)
    refs += preview_refs
    per_view, failed = await _view_metrics(job_id, mesh, frames, names, opts, out, max_retries, refs)
    preview_refs.append(
        contact_sheet_task.options(name=f"{job_id}:contact_sheet", **opts).remote(mesh, frames, per_view, store, prefix)
    )
    quality_ref = quality_task.options(name=f"{job_id}:quality", **opts).remote(
        per_view, failed, mesh, frames, result, store, prefix
    )
    refs += [preview_refs[-1], quality_ref]
    await _collect_quality(job_id, quality_ref, out, failed, names, on_quality)
    for ref in preview_refs:
        try:
            out.files.extend(await ref)
        except Exception as e:
            out.warnings.append(f"a preview failed: {_error_text(e)}")
    return out


async def _collect_quality(job_id: str, quality_ref, out: FanoutResult, failed: list, names: list, on_quality) -> None:
    """quality.json's summary, error and warnings into ``out``; then ``on_quality(out)``, when given."""
    try:
        ev: EV.EvaluationOutput = await quality_ref
    except Exception as e:
        ev = None
        out.error = _quality_failed(f"quality.json could not be built: {_error_text(e)}")
    if ev is not None:
        out.quality = ev.quality
        out.files.append(EV.QUALITY_FILE)
        if ev.error:
            out.error = {
                "code": ev.error.get("code", QUALITY_FAILED),
                "message": ev.error.get("message", ""),
                "details": {},
            }
        elif failed:
            out.warnings.append(f"{len(failed)} of {len(names)} views have no metrics")
        if on_quality is not None:
            try:
                await on_quality(out)  # the record shows the quality while the last previews finish
            except Exception:  # showing it early is a courtesy; the final record carries it anyway
                logger.warning("could not record the quality early", exc_info=True, extra={"job_id": job_id})


async def _reachable(inputs: dict | None) -> bool:
    """Whether the replica's refs can still be read (their owner, the model replica, may be gone)."""
    if not inputs or not {"mesh", "frames", "normals"} <= set(inputs):
        return False
    try:
        await inputs["normals"]  # small; fails at once with OwnerDiedError when the replica is gone
    except Exception:
        return False
    return True


async def _load_inputs(job_id: str, store: Store, input_key: str, prefix: str, result, opts: dict, track: list):
    """(mesh ref, frames ref, view names) read from the store: the mesh read back, the frames prepared again."""
    mesh = load_mesh_task.options(name=f"{job_id}:load_mesh", **opts).remote(store, prefix)
    frames, names_ref = prepare_frames_task.options(name=f"{job_id}:prepare_frames", **opts).remote(
        store, input_key, result, EV.evaluation_config(result)
    )
    track += [mesh, frames, names_ref]
    names: list[str] = await names_ref
    return mesh, frames, names


def _launch_previews(job_id: str, mesh, normals, n: int, store: Store, prefix: str, opts: dict) -> list:
    # The turntable is the longest task: first, so it is not the last to finish.
    refs = [turntable_task.options(name=f"{job_id}:turntable", **opts).remote(mesh, normals, store, prefix)]
    refs += [
        preview_task.options(name=f"{job_id}:preview:{i:02d}", **opts).remote(mesh, normals, i, n, store, prefix)
        for i in range(n)
    ]
    return refs


async def _view_metrics(job_id, mesh, frames, names, opts, out: FanoutResult, max_retries: int, track: list):
    """(per-view metrics, failed views) of every view, each a task (``track`` collects the refs to cancel)."""
    refs = {
        name: evaluate_view_task.options(name=f"{job_id}:metrics:{name}", **opts).remote(mesh, frames, i)
        for i, name in enumerate(names)
    }
    track += refs.values()
    per_view: list[dict] = []
    failed: list[dict] = []
    for name, ref in refs.items():
        try:
            per_view.append(await ref)
        except Exception as e:
            failed.append({"view": name, "error": _error_text(e)})
            out.warnings.append(f"metrics of view {name!r} failed after {max_retries} retries: {_error_text(e)}")
    return per_view, failed
