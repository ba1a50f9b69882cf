"""HTTP routes of experiments (included into the ingress app with ``app.include_router``).

POST /experiments                    JSON or YAML body, or multipart `spec` (+ `bundle` ZIP)
GET  /experiments                    newest first
GET  /experiments/compare?ids=a,b    one table over several experiments (+ per-experiment summary)
GET  /experiments/{id}               status, counts and the results table (CSV: ?format=csv or Accept: text/csv)
GET  /experiments/{id}/plot.png      PSNR against time, Pareto front ringed
GET  /experiments/{id}/download      ZIP: runs/<slug>/{mesh.glb, quality.json, result.json, geometry.json},
                                     results.csv, plot.png
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import zipfile

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from deployments.store import STREAM_CHUNK_BYTES
from pipeline.errors import InputTooLargeError, UnsupportedMediaError

from .. import errors as E
from ..auth import principal_of
from ..config import known_models
from ..quotas import check_quota
from ..schemas import ErrorBody
from ..submission import JobSubmitter
from ..uploads import UploadBudget, read_small, spool, unlink_quietly
from .results import plot_png, rows_to_csv, table_rows
from .service import ExperimentExpiredError, ExperimentService
from .spec import expand_spec, parse_spec_text

#: Largest experiment spec (JSON or YAML text, body or `spec` part); one of max_runs runs takes a few KiB.
MAX_SPEC_BYTES = 1024 * 1024
#: Experiments one compare request may name.
MAX_COMPARE = 20
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", "text/plain")
_ERRORS = {s: {"model": ErrorBody} for s in (404, 410, 413, 415, 422, 429)}

router = APIRouter(tags=["experiments"])

#: The service of this ingress replica (set by :func:`start_experiments`).
_service: ExperimentService | None = None


async def start_experiments(jobs: JobSubmitter) -> ExperimentService:
    """Create and start the experiment service (called from Ingress.__init__)."""
    global _service
    svc = ExperimentService(jobs)
    await svc.start()
    _service = svc
    return svc


def _svc() -> ExperimentService:
    if _service is None:
        raise E.NotReadyError("experiments are starting")
    return _service


def _wants_csv(request: Request, fmt: str | None) -> bool:
    if fmt is not None:
        if fmt not in ("json", "csv"):
            raise E.InvalidRequestError(f"format must be json or csv, not {fmt!r}", details={"field": "format"})
        return fmt == "csv"
    return "text/csv" in request.headers.get("accept", "")


def _links(experiment_id: str) -> dict[str, str]:
    base = f"/experiments/{experiment_id}"
    return {"self": base, "csv": f"{base}?format=csv", "plot": f"{base}/plot.png", "download": f"{base}/download"}


def _summary(exp: dict, runs: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for r in runs:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {
        "experiment_id": exp["experiment_id"],
        "name": exp["name"],
        "description": exp["description"],
        "status": exp["status"],
        "created_at": exp["created_at"],
        "finished_at": exp["finished_at"],
        "git_commit": exp["git_commit"],
        "expired": exp.get("files_expired_at") is not None,
        "runs_total": len(runs),
        "counts": counts,
        "links": _links(exp["experiment_id"]),
    }


async def _read_body(request: Request, cap: int) -> bytes:
    """The request body, read chunk by chunk with a running count: 413 INPUT_TOO_LARGE past ``cap``."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise InputTooLargeError(f"the experiment spec is over {cap} bytes", details={"limit": cap})
    return bytes(body)


async def _read_spec(request: Request, upload_limit: int, temps: list[str]) -> tuple[dict, str | None]:
    """The spec, and the path of the uploaded bundle ZIP (spooled to a temporary file, which
    ``temps`` collects for the caller to unlink) or None. Every file part counts against one
    budget of ``upload_limit`` bytes, as a job upload does (serve_app/uploads.py)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form()
        spec = form.get("spec")
        if spec is None:
            raise E.InvalidRequestError("multipart experiments need a `spec` field or file", details={"field": "spec"})
        budget = UploadBudget(upload_limit)
        text = (
            await asyncio.to_thread(read_small, spec.file, budget, "spec", MAX_SPEC_BYTES)
            if hasattr(spec, "file")
            else spec
        )
        bundle = form.get("bundle")
        path = None
        if bundle is not None:
            if not hasattr(bundle, "file"):
                raise E.InvalidRequestError("`bundle` must be a file upload", details={"field": "bundle"})
            path = await asyncio.to_thread(spool, bundle.file, budget, bundle.filename)
            temps.append(path)
            with open(path, "rb") as fh:
                if not fh.read(4).startswith(_ZIP_MAGIC):
                    raise UnsupportedMediaError("bundle is not a ZIP archive", details={"file": bundle.filename})
        return parse_spec_text(text), path
    if ctype in ("application/json", "", *_YAML_TYPES):
        return parse_spec_text(await _read_body(request, MAX_SPEC_BYTES)), None
    raise UnsupportedMediaError(
        f"send the spec as application/json, application/yaml or multipart/form-data, not {ctype!r}",
        details={"content_type": ctype},
    )


@router.post("/experiments", status_code=202, responses=_ERRORS)
async def submit_experiment(request: Request):
    """Queue every run of a spec (see serve_app/experiments/spec.py) as a job; 202 {experiment_id, runs}."""
    svc = _svc()
    temps: list[str] = []
    try:
        return await _submit(request, svc, temps)
    finally:
        unlink_quietly(*temps)


async def _submit(request: Request, svc: ExperimentService, temps: list[str]) -> JSONResponse:
    doc, upload = await _read_spec(request, svc.jobs.args.max_upload_bytes, temps)
    spec = expand_spec(
        doc,
        known_models=known_models(),
        served_models=svc.jobs.served,
        max_runs=svc.settings.max_runs,
        has_upload=upload is not None,
    )
    who = principal_of(request)
    check_quota(  # the runs share one stored copy of an uploaded bundle
        svc.jobs.args.quotas,
        svc.jobs.book,
        who,
        jobs=len(spec.runs),
        new_bytes=os.path.getsize(upload) if upload else 0,
    )
    body = await svc.submit(spec, upload, owner=who.name)
    body["links"] = _links(body["experiment_id"])
    return JSONResponse(body, status_code=202, headers={"Location": body["links"]["self"]})


@router.get("/experiments")
async def list_experiments(request: Request, limit: int = Query(50, ge=1, le=200), offset: int = Query(0, ge=0)):
    svc = _svc()
    who = principal_of(request)
    exps = await asyncio.to_thread(svc.db.experiments, limit, offset, owner=None if who.admin else who.name)
    items = []
    for exp in exps:
        runs = await asyncio.to_thread(svc.db.runs, exp["experiment_id"])
        items.append(_summary(exp, runs))
    return {"items": items, "limit": limit, "offset": offset}


@router.get("/experiments/compare", responses=_ERRORS)
async def compare_experiments(
    request: Request,
    ids: str = Query(description="Comma-separated experiment ids."),
    format: str | None = Query(None, description="json (default) or csv."),
):
    """One table over several experiments (Pareto marked per experiment and dataset), plus a summary of each."""
    svc = _svc()
    names = list(dict.fromkeys(i.strip() for i in ids.split(",") if i.strip()))
    if not 1 <= len(names) <= MAX_COMPARE:
        raise E.InvalidRequestError(f"ids must name 1 to {MAX_COMPARE} experiments", details={"field": "ids"})
    rows, summaries = [], []
    for experiment_id in names:
        exp, runs = await svc.experiment(experiment_id, principal_of(request))
        table = table_rows(runs)
        rows += table
        done = [r for r in table if r["psnr"] is not None]
        summaries.append(
            {
                **_summary(exp, runs),
                "best_psnr": max((r["psnr"] for r in done), default=None),
                "median_model_s": statistics.median([r["model_s"] for r in done if r["model_s"] is not None])
                if any(r["model_s"] is not None for r in done)
                else None,
                "pareto": [r["slug"] for r in table if r["pareto"]],
            }
        )
    if _wants_csv(request, format):
        return PlainTextResponse(rows_to_csv(rows), media_type="text/csv")
    return {"experiments": summaries, "runs": rows}


@router.get("/experiments/{experiment_id}", responses=_ERRORS)
async def get_experiment(
    request: Request, experiment_id: str, format: str | None = Query(None, description="json or csv.")
):
    svc = _svc()
    exp, runs = await svc.experiment(experiment_id, principal_of(request))
    rows = table_rows(runs)
    if _wants_csv(request, format):
        return PlainTextResponse(
            rows_to_csv(rows),
            media_type="text/csv",
            headers={"Content-Disposition": f'inline; filename="{experiment_id}.csv"'},
        )
    expires_at = exp["finished_at"] + svc.args.artifact_ttl_s if exp["finished_at"] is not None else None
    return {
        **_summary(exp, runs),
        "expires_at": expires_at,
        "pareto": [r["slug"] for r in rows if r["pareto"]],
        "runs": rows,
    }


@router.get("/experiments/{experiment_id}/plot.png", responses={200: {"content": {"image/png": {}}}, **_ERRORS})
async def experiment_plot(request: Request, experiment_id: str):
    svc = _svc()
    exp, runs = await svc.experiment(experiment_id, principal_of(request))
    png = await asyncio.to_thread(
        plot_png, table_rows(runs), title=f"{exp['name']} ({experiment_id}): PSNR vs model time"
    )
    return Response(png, media_type="image/png")


def _zip_experiment(svc: ExperimentService, exp: dict, rows: list[dict]) -> str:
    fd, path = tempfile.mkstemp(prefix=f"recon3d-{exp['experiment_id']}-", suffix=".zip")
    os.close(fd)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("results.csv", rows_to_csv(rows))
        zf.writestr("plot.png", plot_png(rows, title=exp["name"]))
        prefix = f"experiments/{exp['experiment_id']}/"
        for key in svc.store.list(f"{prefix}runs"):
            zf.writestr(key[len(prefix) :], svc.store.get(key))
    return path


def _iter_file(path: str):
    with open(path, "rb") as f:
        while chunk := f.read(STREAM_CHUNK_BYTES):
            yield chunk


@router.get("/experiments/{experiment_id}/download", responses={200: {"content": {"application/zip": {}}}, **_ERRORS})
async def download_experiment(request: Request, experiment_id: str):
    svc = _svc()
    exp, runs = await svc.experiment(experiment_id, principal_of(request))
    if exp.get("files_expired_at") is not None:
        raise ExperimentExpiredError(
            f"the files of experiment {experiment_id} passed their TTL and were deleted",
            details={"experiment_id": experiment_id, "expired_at": exp["files_expired_at"]},
        )
    path = await asyncio.to_thread(_zip_experiment, svc, exp, table_rows(runs))
    return StreamingResponse(
        _iter_file(path),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{experiment_id}.zip"'},
        background=BackgroundTask(os.unlink, path),
    )
