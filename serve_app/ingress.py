"""The HTTP ingress: FastAPI through ``@serve.ingress`` (OpenAPI at /docs).

The ingress validates uploads, persists them with a job record, and hands the job to
the :class:`~serve_app.scheduler.JobScheduler` that runs in this replica. Heavy work
(decoding images for validation, building ZIPs, store I/O) runs in worker threads;
reconstruction runs in the model deployments and the fan-out in Ray tasks.

The scheduler holds the queue in this replica's memory, so the ingress runs as ONE
replica (``num_replicas=1``); every state change is written through to the store.
"""

import asyncio
import json
import mimetypes
import os
import posixpath
import re
import tempfile
import time
import zipfile

import ray
from fastapi import Body, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.background import BackgroundTask

from deployments.model_server import deployment_name
from deployments.store import iter_file, make_store
from pipeline import __version__
from pipeline.bundle import DEPTH_DIR, TRANSFORMS_FILE, VIEWS_DIR, BundleLimits, load_bundle
from pipeline.errors import UnsupportedMediaError
from pipeline.overrides import parse_overrides_json, validate_overrides

from . import constants as SC
from . import errors as E
from . import ui
from .auth import (
    AuthMiddleware,
    bearer_key,
    can_access,
    check_bind,
    load_keys,
    principal_of,
    serve_http_host,
    webhook_secret,
)
from .batches import router as batches_router
from .batches import start_batches
from .config import AppArgs
from .experiments.router import router as experiments_router
from .experiments.router import start_experiments
from .jobs import (
    TERMINAL,
    JobBook,
    JobRecord,
    artifacts_prefix,
    write_artifacts,
)
from .limits import BodyLimitMiddleware
from .logging import configure_json_logging, job_logger
from .metrics import ServiceMetrics
from .middleware import add_exception_handling
from .quotas import check_quota
from .scheduler import JobScheduler
from .schemas import CancelAccepted, CancelRequest, ErrorBody, JobAccepted, JobList, JobView, job_view, links_for
from .submission import JobSubmitter, parse_models
from .uploads import UploadBudget, add_member, read_small, spool, temp_path, unlink_quietly
from .webhooks import check_webhook_url

#: Seconds the confirm token of a two-step cancel stays valid.
CANCEL_CONFIRM_TTL_S = 300.0
#: Seconds /health waits for each model deployment's info().
HEALTH_INFO_TIMEOUT_S = 5.0
#: Largest page of GET /jobs.
MAX_PAGE = 200

_JOB_ID_RE = re.compile(r"^[0-9]{13}-[0-9a-f]{10}$")
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")

_ERRORS = {s: {"model": ErrorBody} for s in (404, 409, 410, 413, 415, 422, 429, 503)}

app = FastAPI(
    title="Recon3D",
    version=__version__,
    description="Multi-view photos + depth renders in, a textured mesh in the cameras' frame out. "
    "Every error has the shape {error: {code, message, details}, request_id}; codes are listed in docs/API.md.",
    docs_url="/docs",
)
add_exception_handling(app)


# A running byte count over every request body (chunked ones too): 413 past max_upload_bytes.
app.add_middleware(BodyLimitMiddleware, limit_of=lambda scope: getattr(app.state, "max_upload_bytes", None))
# Outermost: a request without a valid key is answered 401 before its body is read.
app.add_middleware(
    AuthMiddleware,
    state_of=lambda: (getattr(app.state, "api_keys", None), getattr(app.state, "open_paths", [])),
)
app.include_router(experiments_router)
app.include_router(batches_router)


# ---------------------------------------------------------------- upload helpers


def _safe_name(filename: str | None, field: str) -> str:
    name = posixpath.basename((filename or "").replace("\\", "/"))
    if not _SAFE_NAME_RE.match(name):
        raise E.InvalidRequestError(
            f"{field} file name {filename!r} is not a plain file name", details={"field": field, "file": filename}
        )
    return name


def _check_magic(data: bytes, magics: tuple[bytes, ...], what: str, name: str) -> None:
    if not any(data.startswith(m) for m in magics):
        raise UnsupportedMediaError(f"{name} is not {what}", details={"file": name, "expected": what})


def _zip_artifacts(store, rec: JobRecord) -> str:
    """Write the job's artifacts into a temporary ZIP (``<model>/<file>``); returns its path."""
    fd, path = tempfile.mkstemp(prefix=f"recon3d-{rec.job_id}-", suffix=".zip")
    os.close(fd)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        write_artifacts(zf, store, rec)
    return path


def _check_input_parts(bundle, views, depth_renders) -> None:
    """One `bundle` ZIP, or `views` + `depth_renders` files: 422 for both or neither."""
    if bundle is not None and (views or depth_renders):
        raise E.InvalidRequestError(
            "send either `bundle` or `views` + `depth_renders`, not both", details={"field": "bundle"}
        )
    if bundle is None and not views:
        raise E.InvalidRequestError(
            "no input: send `views` + `depth_renders` files, or one `bundle` ZIP", details={"field": "views"}
        )


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------- the deployment


@serve.ingress(app)
class Ingress:
    """Routes of the Recon3D API. ``model_handles`` maps model name -> model deployment handle."""

    async def __init__(self, args: dict, model_handles: dict):
        self.args = AppArgs.model_validate(args)
        configure_json_logging()
        keys = load_keys(self.args.auth)
        check_bind(await asyncio.to_thread(serve_http_host), keys)  # no keys: loopback only, or refuse
        app.state.api_keys = keys
        app.state.open_paths = list(self.args.auth.open_paths)
        app.state.max_upload_bytes = self.args.max_upload_bytes
        self.store = make_store(self.args.store)
        self.book = JobBook(self.store)
        self.metrics = ServiceMetrics()
        self.handles = dict(model_handles)
        self.scheduler = JobScheduler(self.args, self.store, self.book, self.handles, self.metrics)
        self.submitter = JobSubmitter(
            self.args, self.store, self.book, self.scheduler, served=list(self.handles), metrics=self.metrics
        )
        await self.scheduler.start()
        await start_experiments(self.submitter)
        await start_batches(self.submitter)

    # ------------------------------------------------------------ helpers

    def _job(self, job_id: str, request: Request) -> JobRecord:
        rec = self.book.get(job_id) if _JOB_ID_RE.match(job_id) else None
        if rec is None or not can_access(principal_of(request), rec.owner):  # another key's job is unknown
            raise E.JobNotFoundError(f"no job {job_id!r}", details={"job_id": job_id})
        return rec

    def _view(self, rec: JobRecord) -> JobView:
        pos = self.scheduler.queue_position(rec.job_id)
        wait = self.scheduler.estimated_wait_s(rec.job_id) if pos is not None else None
        return job_view(rec, pos, wait)

    async def __del__(self):
        """Serve's graceful shutdown (redeploy, serve.delete): finish or re-queue in-flight runs."""
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            await scheduler.drain()

    def _artifacts_available(self, rec: JobRecord) -> None:
        if rec.expired:
            raise E.JobExpiredError(
                f"the artifacts of job {rec.job_id} expired and were deleted", details={"expired_at": rec.expires_at}
            )
        if not rec.terminal or not any(r.files for r in rec.runs.values()):
            raise E.JobNotReadyError(
                f"job {rec.job_id} is {rec.status} and has no artifacts yet; wait for a terminal state",
                details={"status": rec.status},
            )

    async def _assemble_bundle(self, bundle, views, depth_renders, transforms, temps: list[str]) -> str:
        """Path of a temporary bundle ZIP built from the upload's parts (each counted against the budget)."""
        budget = UploadBudget(self.args.max_upload_bytes)
        cap = BundleLimits().max_file_bytes
        if bundle is not None:
            path = await asyncio.to_thread(spool, bundle.file, budget, bundle.filename)
            temps.append(path)
            with open(path, "rb") as fh:
                _check_magic(fh.read(8), _ZIP_MAGIC, "a ZIP archive", bundle.filename or "bundle")
            if transforms is not None:  # add (or replace) transforms.json at the bundle root
                tdata = await asyncio.to_thread(read_small, transforms.file, budget, transforms.filename, cap)
                path = await asyncio.to_thread(add_member, path, TRANSFORMS_FILE, tdata)
                temps.append(path)
            return path
        path = temp_path()
        temps.append(path)
        seen: set[str] = set()
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:  # PNG/JPEG are compressed already
            for field, folder, uploads in (
                ("views", VIEWS_DIR, views),
                ("depth_renders", DEPTH_DIR, depth_renders or []),
            ):
                for f in uploads:
                    name = _safe_name(f.filename, field)
                    content = await asyncio.to_thread(read_small, f.file, budget, name, cap)
                    _check_magic(content, _IMAGE_MAGIC, "a PNG or JPEG image", name)
                    key = f"{folder}/{name}"
                    if key in seen:
                        raise E.InvalidRequestError(
                            f"{field} has {name!r} twice", details={"field": field, "file": name}
                        )
                    seen.add(key)
                    await asyncio.to_thread(zf.writestr, key, content)
                    del content
            if transforms is not None:
                tdata = await asyncio.to_thread(read_small, transforms.file, budget, transforms.filename, cap)
                if not tdata.lstrip()[:1] == b"{":
                    raise UnsupportedMediaError(
                        "transforms is not a JSON object", details={"file": transforms.filename}
                    )
                await asyncio.to_thread(zf.writestr, TRANSFORMS_FILE, tdata)
        return path

    # ------------------------------------------------------------ jobs

    @app.post("/jobs", status_code=202, response_model=JobAccepted, responses=_ERRORS)
    async def submit_job(
        self,
        request: Request,
        views: list[UploadFile] | None = File(None, description="Photos, matched to depth renders by file name."),
        depth_renders: list[UploadFile] | None = File(None, description="Depth renders named like their views."),
        bundle: UploadFile | None = File(None, description="A whole bundle as one ZIP (instead of views)."),
        transforms: UploadFile | None = File(None, description="Optional transforms.json (NeRF convention)."),
        model: str = Form("fusion", description="Model, or several comma-separated."),
        preset: str | None = Form(None, description="fast, balanced or quality."),
        webhook_url: str | None = Form(None, description="POSTed a JSON summary on the terminal state."),
        overrides: str | None = Form(
            None, description='JSON object of config parameters over the preset, e.g. {"texture_size": 1024}.'
        ),
    ):
        models = parse_models(model)
        self.submitter.check_served(models)
        preset = self.submitter.resolve_preset(preset)  # UNKNOWN_PRESET (422) lists the valid names
        checked_overrides = validate_overrides(parse_overrides_json(overrides))  # INVALID_OVERRIDES (422)
        wh_secret = None
        if webhook_url is not None:  # 422 for a bad URL or an address inside the network (SSRF)
            await check_webhook_url(webhook_url, self.args.webhooks)
            key = bearer_key(request) if app.state.api_keys else None
            wh_secret = webhook_secret(key) if key else None
        self.submitter.check_queue_room()
        _check_input_parts(bundle, views, depth_renders)
        who = principal_of(request)
        check_quota(self.args.quotas, self.book, who, jobs=1)
        temps: list[str] = []  # the bundle is assembled on disk (serve_app/uploads.py), never whole in memory
        try:
            path = await self._assemble_bundle(bundle, views, depth_renders, transforms, temps)
            check_quota(self.args.quotas, self.book, who, new_bytes=os.path.getsize(path))
            if self.args.validate_pixels:
                fs = await asyncio.to_thread(load_bundle, path)
                n_views = len(fs.views)
                del fs
            else:
                n_views = None

            rid = getattr(request.state, "request_id", None)
            job_id = await self.submitter.enqueue(
                path,
                models=models,
                preset=preset,
                overrides=checked_overrides,
                webhook_url=webhook_url,
                webhook_secret=wh_secret,
                request_id=rid,
                owner=who.name,
            )
        finally:
            unlink_quietly(*temps)
        job_logger(job_id).info(
            "job queued" + (f" ({n_views} views)" if n_views else ""),
            extra={"request_id": rid, "model": ",".join(models), "status": "queued"},
        )
        body = JobAccepted(job_id=job_id, status="queued", links=links_for(job_id))
        return JSONResponse(body.model_dump(), status_code=202, headers={"Location": f"/jobs/{job_id}"})

    @app.get("/jobs", response_model=JobList)
    async def list_jobs(
        self,
        request: Request,
        status: str | None = Query(None, description="queued, running, succeeded, failed or canceled."),
        limit: int = Query(50, ge=1, le=MAX_PAGE),
        offset: int = Query(0, ge=0),
    ):
        if status is not None and status not in {"queued", "running", *TERMINAL}:
            raise E.InvalidRequestError(f"unknown status filter {status!r}", details={"field": "status"})
        who = principal_of(request)
        recs = [r for r in self.book.list(status) if can_access(who, r.owner)]
        page = recs[offset : offset + limit]
        nxt = offset + limit if offset + limit < len(recs) else None
        return JobList(
            items=[self._view(r) for r in page], total=len(recs), limit=limit, offset=offset, next_offset=nxt
        )

    @app.get("/jobs/{job_id}", response_model=JobView, responses=_ERRORS)
    async def get_job(self, request: Request, job_id: str):
        return self._view(self._job(job_id, request))

    @app.get("/jobs/{job_id}/events", responses=_ERRORS)
    async def job_events(self, request: Request, job_id: str):
        """Server-Sent Events: `progress` on every change, then one `end` with the full job at a terminal state."""
        self._job(job_id, request)

        async def stream():
            last = None
            while True:
                changed = self.book.changed_event(job_id)
                rec = self.book.get(job_id)
                if rec is None:
                    yield _sse("end", {"job_id": job_id, "status": "deleted"})
                    return
                view = self._view(rec)
                snap = {
                    "job_id": job_id,
                    "status": view.status,
                    "progress": view.progress,
                    "stage": view.stage,
                    "queue_position": view.queue_position,
                    "estimated_wait_s": view.estimated_wait_s,
                    "models": {
                        m: {"status": r.status, "progress": r.progress, "stage": r.stage}
                        for m, r in view.models.items()
                    },
                }
                if snap != last:
                    yield _sse("progress", snap)
                    last = snap
                if rec.terminal:
                    yield _sse("end", view.model_dump(mode="json"))
                    return
                try:
                    await asyncio.wait_for(changed.wait(), SC.SSE_KEEPALIVE_S)
                except TimeoutError:
                    yield ": keep-alive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/jobs/{job_id}/download", responses={200: {"content": {"application/zip": {}}}, **_ERRORS})
    async def download(self, request: Request, job_id: str):
        rec = self._job(job_id, request)
        self._artifacts_available(rec)
        path = await asyncio.to_thread(_zip_artifacts, self.store, rec)
        return StreamingResponse(
            iter_file(path),
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="recon3d-{job_id}.zip"'},
            background=BackgroundTask(os.unlink, path),
        )

    @app.get("/jobs/{job_id}/files/{path:path}", responses=_ERRORS)
    async def get_file(
        self,
        request: Request,
        job_id: str,
        path: str,
        redirect: bool = Query(False, description="307 to a presigned URL (S3)."),
    ):
        rec = self._job(job_id, request)
        norm = posixpath.normpath(path) if path else ""
        if not path or "\\" in path or path.startswith("/") or norm != path or ".." in path.split("/"):
            raise E.InvalidPathError(f"file path {path!r} is not a plain relative path", details={"path": path})
        self._artifacts_available(rec)
        model, _, rel = path.partition("/")
        run = rec.runs.get(model)
        if run is None or rel not in run.files:
            raise E.FileNotFoundInJobError(
                f"job {job_id} has no file {path!r}",
                details={"path": path, "files": {m: r.files for m, r in rec.runs.items()}},
            )
        key = f"{artifacts_prefix(job_id, model)}/{rel}"
        if redirect:
            url = await asyncio.to_thread(self.store.presigned_url, key)
            if url:
                return Response(status_code=307, headers={"Location": url})
        media = mimetypes.guess_type(rel)[0] or "application/octet-stream"
        if rel.endswith(".glb"):
            media = "model/gltf-binary"
        size = await asyncio.to_thread(self.store.size, key)
        return StreamingResponse(self.store.iter_bytes(key), media_type=media, headers={"Content-Length": str(size)})

    @app.post("/jobs/{job_id}/cancel", status_code=202, response_model=CancelAccepted, responses=_ERRORS)
    async def cancel_job(self, request: Request, job_id: str, body: CancelRequest | None = Body(None)):
        """Two steps: the first call answers 409 CANCEL_CONFIRMATION_REQUIRED with a token; repeat with {"confirm": true}."""
        rec = self._job(job_id, request)
        if rec.terminal:
            raise E.JobFinishedError(f"job {job_id} is already {rec.status}", details={"status": rec.status})
        body = body or CancelRequest()
        if rec.cancel_requested:
            return CancelAccepted(job_id=job_id, status=rec.status, cancel_requested=True)
        if not body.confirm or not rec.cancel_token_valid(body.token):
            token = rec.issue_cancel_token(CANCEL_CONFIRM_TTL_S)
            await self.book.save(rec)
            raise E.CancelConfirmationRequiredError(
                f"canceling stops job {job_id} ({rec.status}, {rec.progress:.0f}%); "
                'to confirm, POST again with {"confirm": true}',
                details={
                    "confirm_token": token,
                    "expires_in_s": CANCEL_CONFIRM_TTL_S,
                    "confirm_body": {"confirm": True, "token": token},
                },
            )
        await self.scheduler.cancel(rec)
        job_logger(job_id).info("cancel confirmed", extra={"status": rec.status})
        return JSONResponse(
            CancelAccepted(job_id=job_id, status=rec.status, cancel_requested=True).model_dump(), status_code=202
        )

    @app.delete("/jobs/{job_id}", status_code=204, responses=_ERRORS)
    async def delete_job(self, request: Request, job_id: str):
        rec = self._job(job_id, request)
        if not rec.terminal:
            raise E.JobNotReadyError(
                f"job {job_id} is {rec.status}; cancel it first (POST /jobs/{job_id}/cancel)",
                details={"status": rec.status},
            )
        await self.scheduler.delete(rec)
        return Response(status_code=204)

    # ------------------------------------------------------------ service

    @app.get("/health")
    async def health(self):
        """Ray cluster resources, GPUs of the model replicas, and each Serve deployment's state."""
        out: dict = {"status": "ok", "version": __version__, "ray": {}, "gpus": [], "deployments": {}, "models": {}}
        try:
            out["ray"] = {
                "initialized": ray.is_initialized(),
                "nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
                "resources": ray.cluster_resources(),
                "available": ray.available_resources(),
            }
        except Exception as e:
            out["status"] = "degraded"
            out["ray"] = {"error": str(e)}
        running: dict[str, int] = {}  # deployment name -> RUNNING replicas (this app)
        try:
            st = await asyncio.to_thread(serve.status)
            this_app = serve.get_replica_context().app_name
            for app_name, a in st.applications.items():
                for d_name, d in a.deployments.items():
                    if app_name == this_app:
                        running[d_name] = int((d.replica_states or {}).get("RUNNING", 0))
                    out["deployments"][f"{app_name}/{d_name}"] = {
                        "status": str(getattr(d.status, "value", d.status)),
                        "replicas": {str(k): v for k, v in (d.replica_states or {}).items()},
                        "message": d.message,
                    }
        except Exception as e:
            out["deployments"] = {"error": str(e)}
        for m, h in self.handles.items():
            if running.get(deployment_name(m), self.scheduler.replicas.get(m)) == 0:
                # Scaled to zero: a probe would wake a (GPU) replica just to answer /health.
                out["models"][m] = {"status": "scaled_to_zero", "replicas": 0}
                continue
            try:
                info = await asyncio.wait_for(h.info.remote(), HEALTH_INFO_TIMEOUT_S)
                out["models"][m] = {"status": "ok", **info}
                out["gpus"] += [{**g, "model": m} for g in info.get("gpus", [])]
            except Exception as e:
                out["models"][m] = {"status": "unavailable", "error": f"{type(e).__name__}: {e}"}
                out["status"] = "degraded"
        out["jobs"] = {s: self.book.count(s) for s in ("queued", "running")}
        return out

    # ------------------------------------------------------------ the web page (serve_app/ui.py)

    def _ui_file(self, rel: str):
        found = ui.static_file(rel) if self.args.ui.enabled else None
        if found is None:
            raise E.NotFoundError(f"no page file {rel!r}", details={"path": rel})
        path, content_type = found
        return FileResponse(path, media_type=content_type, headers=ui.headers_for(rel, content_type))

    @app.get("/", include_in_schema=False)
    async def ui_root(self):
        return self._ui_file(ui.INDEX_FILE)

    @app.get("/ui", include_in_schema=False)
    async def ui_index(self):
        return self._ui_file(ui.INDEX_FILE)

    @app.get("/ui/settings.json", include_in_schema=False)
    async def ui_settings(self):
        if not self.args.ui.enabled:
            raise E.NotFoundError("the web page is off (ui.enabled: false)", details={"path": "settings.json"})
        return ui.page_settings(
            models=sorted(self.handles),
            default_preset=self.args.default_preset,
            max_upload_bytes=self.args.max_upload_bytes,
            dashboard_url=self.args.ui.dashboard_url,
            grafana_url=self.args.ui.grafana_url,
            version=__version__,
        )

    @app.get("/ui/{rel:path}", include_in_schema=False)
    async def ui_file(self, rel: str):
        return self._ui_file(rel)

    @app.get("/ready", responses={503: {"model": ErrorBody}})
    async def ready(self):
        if not self.scheduler.recovered:
            raise E.NotReadyError("the job scheduler is still recovering jobs")
        return {"ready": True, "models": sorted(self.handles), "time": time.time()}
