"""Batches: many bundles in one request, one job each, one id for all of them.

    POST /batches                 multipart: several `bundles` ZIP uploads, or one `archive` ZIP holding
                                  bundles (nested .zip files or top-level folders); `model`, `preset`,
                                  `overrides` (JSON) apply to every item. 202 {batch_id, items}.
    GET  /batches/{id}            aggregate status + progress, per-item status (job id, error code)
    GET  /batches/{id}/download   one ZIP: <item>/<model>/<file>, plus batch.json (409 until every item ended)

The batch record (``batches/<id>/batch.json`` in the store) holds only the item -> job id
map; status always comes from the jobs, so cancel, retries and TTL work per item as for any
job. More than ``batches.max_items`` bundles answer ``413 BATCH_TOO_LARGE`` before any is read.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import posixpath
import re
import tempfile
import time
import uuid
import zipfile

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask

from deployments.store import iter_file
from pipeline import constants as C
from pipeline.archive import ArchiveLimits, check_entries, copy_member, open_zip, read_member
from pipeline.bundle import VIEWS_DIR, load_bundle
from pipeline.errors import (
    InputTooLargeError,
    InvalidArchiveError,
    InvalidInputError,
    ReconError,
    UnsupportedMediaError,
)
from pipeline.overrides import parse_overrides_json, validate_overrides

from . import errors as E
from .auth import Principal, can_access, principal_of
from .jobs import TERMINAL, JobRecord, new_job_id, write_artifacts
from .quotas import check_quota
from .retention import batch_files_expired, batch_record_due
from .schemas import ErrorBody
from .submission import JobSubmitter, parse_models
from .uploads import UploadBudget, spool, temp_path, unlink_quietly

logger = logging.getLogger("recon3d.batches")

BATCHES_PREFIX = "batches"
_BATCH_ID_RE = re.compile(r"^batch-[0-9]{13}-[0-9a-f]{8}$")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
#: An archive of bundles may unpack to at most this many times the upload limit.
ARCHIVE_EXPANSION_LIMIT = 4
_ERRORS = {s: {"model": ErrorBody} for s in (404, 409, 410, 413, 415, 422, 429)}


class BatchTooLargeError(E.ServiceError):
    code = "BATCH_TOO_LARGE"


class BatchNotFoundError(E.ServiceError):
    code = "BATCH_NOT_FOUND"


class BatchNotReadyError(E.ServiceError):
    code = "BATCH_NOT_READY"


class BatchExpiredError(E.ServiceError):
    """Every item's files passed ``artifact_ttl_s`` and were deleted."""

    code = "BATCH_EXPIRED"


class BatchItem(BaseModel):
    index: int
    name: str = Field(description="Item name: the upload's file name (or folder in the archive), without .zip.")
    job_id: str


class BatchRecord(BaseModel):
    batch_id: str
    created_at: float = Field(default_factory=time.time)
    model: str
    preset: str
    overrides: dict = Field(default_factory=dict)
    items: list[BatchItem]
    owner: str | None = Field(None, description="Name of the API key that submitted the batch.")


def batch_key(batch_id: str) -> str:
    return f"{BATCHES_PREFIX}/{batch_id}/batch.json"


def _item_name(raw: str, taken: set[str]) -> str:
    base = posixpath.basename(raw.rstrip("/").replace("\\", "/"))
    base = re.sub(r"\.zip$", "", base, flags=re.IGNORECASE)
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).strip("._") or "item"
    name, k = base[:64], 2
    while name in taken:
        name, k = f"{base[:60]}-{k}", k + 1
    taken.add(name)
    return name


def split_archive(data, *, max_items: int, max_unpacked: int, to_files: bool = False) -> list[tuple[str, bytes]]:
    """(name, bundle ZIP bytes) of each bundle in an archive of bundles (bytes or a binary file).

    A bundle is a nested ``*.zip`` entry, or a top-level folder holding ``multi_views/``.
    Raises BATCH_TOO_LARGE above ``max_items`` (before anything is decompressed),
    INPUT_TOO_LARGE above ``max_unpacked`` bytes, INVALID_ARCHIVE when it holds no bundle.
    ``to_files``: each item is written to a temporary file instead, and its path is returned in
    place of the bytes (the caller unlinks them); nothing is held in memory but one chunk.
    """
    zf, all_infos = open_zip(data, "archive")
    # Sizes, ratios, count and names of every entry, before anything is inflated.
    check_entries(
        all_infos,
        ArchiveLimits(
            max_entries=C.MAX_ZIP_ENTRIES * max(1, max_items),
            max_member_bytes=max_unpacked,
            max_total_bytes=max_unpacked,
        ),
    )
    infos = [i for i in all_infos if not i.is_dir() and not i.filename.startswith(("__MACOSX/", "."))]
    nested = [i for i in infos if i.filename.lower().endswith(".zip")]
    folders: dict[str, list[zipfile.ZipInfo]] = {}
    if not nested:
        for i in infos:
            top, _, rest = i.filename.partition("/")
            if rest:
                folders.setdefault(top, []).append(i)
        folders = {k: v for k, v in folders.items() if any(x.filename.startswith(f"{k}/{VIEWS_DIR}/") for x in v)}
    n = len(nested) or len(folders)
    if n == 0:
        raise InvalidArchiveError(
            "the archive holds no bundle: put one .zip per bundle, or one folder per bundle with multi_views/ inside"
        )
    if n > max_items:
        raise BatchTooLargeError(
            f"the archive holds {n} bundles; a batch takes at most {max_items}",
            details={"items": n, "limit": max_items},
        )
    unpacked = sum(i.file_size for i in (nested or [x for v in folders.values() for x in v]))
    if unpacked > max_unpacked:
        raise InputTooLargeError(
            f"the archive unpacks to {unpacked} bytes; the limit is {max_unpacked}",
            details={"bytes": unpacked, "limit": max_unpacked},
        )
    taken: set[str] = set()
    if to_files:
        return _split_to_files(zf, nested, folders, taken, max_unpacked)
    if nested:
        return [(_item_name(i.filename, taken), read_member(zf, i, max_unpacked)) for i in nested]
    out = []
    for top, members in sorted(folders.items()):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
            for i in members:
                dst.writestr(i.filename[len(top) + 1 :], read_member(zf, i, max_unpacked))
        out.append((_item_name(top, taken), buf.getvalue()))
    return out


def _split_to_files(zf, nested, folders, taken: set[str], max_unpacked: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    try:
        for i in nested:
            path = temp_path()
            out.append((_item_name(i.filename, taken), path))
            with open(path, "wb") as dst:
                copy_member(zf, i, dst, max_unpacked)
        for top, members in sorted(folders.items()):
            path = temp_path()
            out.append((_item_name(top, taken), path))
            with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
                for i in members:
                    with dst.open(i.filename[len(top) + 1 :], "w", force_zip64=True) as f:
                        copy_member(zf, i, f, max_unpacked)
    except BaseException:
        unlink_quietly(*(p for _, p in out))
        raise
    return out


def _expires_at(jobs: list[JobRecord | None]) -> float | None:
    """When the last item's files expire: None until every remaining item job has ended."""
    left = [j for j in jobs if j is not None]
    if not left or any(j.expires_at is None for j in left):
        return None
    return max(j.expires_at for j in left)


def aggregate_status(statuses: list[str]) -> str:
    """queued / running while any item is; at the end succeeded (all), canceled (all), failed (none
    succeeded) or partial (some succeeded, some not)."""
    if any(s not in TERMINAL for s in statuses):
        return "running" if any(s != "queued" for s in statuses) else "queued"
    if all(s == "succeeded" for s in statuses):
        return "succeeded"
    if all(s == "canceled" for s in statuses):
        return "canceled"
    return "partial" if "succeeded" in statuses else "failed"


class BatchService:
    def __init__(self, jobs: JobSubmitter):
        self.jobs = jobs
        self.batches: dict[str, BatchRecord] = {}
        self._sweeper: asyncio.Task | None = None

    async def start(self) -> None:
        """Load the batch records, drop those whose jobs are all gone (a crash's leftovers too), and
        start the TTL sweep."""
        store = self.jobs.store
        for key in await asyncio.to_thread(store.list, BATCHES_PREFIX):
            if key.endswith("/batch.json"):
                try:
                    rec = BatchRecord.model_validate_json(await asyncio.to_thread(store.get, key))
                except (KeyError, ValueError):
                    continue
                self.batches[rec.batch_id] = rec
        await self.sweep_once()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="batches:sweep")

    def item_jobs(self, rec: BatchRecord) -> list[JobRecord | None]:
        """Each item's job record, None where it is gone (deleted, or past the record TTL)."""
        return [self.jobs.get_job(it.job_id) for it in rec.items]

    async def sweep_once(self, *, now: float | None = None) -> list[str]:
        """Delete the record of every batch none of whose jobs has a record left (serve_app/retention.py);
        returns their ids. A batch stores no files of its own: its items' files expire as jobs."""
        now = time.time() if now is None else now
        gone = [b for b, rec in self.batches.items() if batch_record_due(rec.created_at, self.item_jobs(rec), now)]
        for batch_id in gone:
            await asyncio.to_thread(self.jobs.store.delete_prefix, f"{BATCHES_PREFIX}/{batch_id}")
            self.batches.pop(batch_id, None)
        return gone

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.jobs.args.sweep_interval_s)
            try:
                await self.sweep_once()
            except Exception:
                logger.exception("batch sweep failed")

    def get(self, batch_id: str, principal: Principal | None = None) -> BatchRecord:
        """The batch; another key's batch is as unknown as a missing one (404)."""
        rec = self.batches.get(batch_id) if _BATCH_ID_RE.match(batch_id) else None
        if rec is not None and principal is not None and not can_access(principal, rec.owner):
            rec = None
        if rec is None:
            raise BatchNotFoundError(f"no batch {batch_id!r}", details={"batch_id": batch_id})
        return rec

    def view(self, rec: BatchRecord) -> dict:
        items, statuses, progress = [], [], []
        jobs = self.item_jobs(rec)
        for it, job in zip(rec.items, jobs, strict=True):
            status = job.status if job is not None else "failed"
            err = job.error.model_dump() if job is not None and job.error else None
            if job is None:
                err = {"code": E.JobNotFoundError.code, "message": "the item's job was deleted", "details": {}}
            statuses.append(status)
            progress.append(job.progress if job is not None else 100.0)
            items.append(
                {
                    "index": it.index,
                    "name": it.name,
                    "job_id": it.job_id,
                    "status": status,
                    "progress": job.progress if job is not None else None,
                    "error": err,
                    "links": {"job": f"/jobs/{it.job_id}"},
                }
            )
        counts: dict[str, int] = {}
        for s in statuses:
            counts[s] = counts.get(s, 0) + 1
        return {
            "batch_id": rec.batch_id,
            "status": aggregate_status(statuses),
            "progress": round(sum(progress) / max(len(progress), 1), 2),
            "counts": counts,
            "model": rec.model,
            "preset": rec.preset,
            "overrides": rec.overrides,
            "created_at": rec.created_at,
            "expired": batch_files_expired(jobs),
            "expires_at": _expires_at(jobs),
            "items": items,
            "links": {"self": f"/batches/{rec.batch_id}", "download": f"/batches/{rec.batch_id}/download"},
        }


router = APIRouter(tags=["batches"])
_service: BatchService | None = None


async def start_batches(jobs: JobSubmitter) -> BatchService:
    """Create the batch service (called from Ingress.__init__) and load its records."""
    global _service
    svc = BatchService(jobs)
    await svc.start()
    _service = svc
    return svc


def _svc() -> BatchService:
    if _service is None:
        raise E.NotReadyError("batches are starting")
    return _service


@router.post("/batches", status_code=202, responses=_ERRORS)
async def submit_batch(
    request: Request,
    bundles: list[UploadFile] | None = File(None, description="Bundle ZIPs, one per item."),
    archive: UploadFile | None = File(None, description="One ZIP holding bundles (nested ZIPs or folders)."),
    model: str = Form("fusion", description="Model of every item."),
    preset: str | None = Form(None, description="Preset of every item."),
    overrides: str | None = Form(
        None, description='JSON object of parameters over the preset, e.g. {"texture_size": 1024}.'
    ),
):
    svc = _svc()
    jobs = svc.jobs
    limit = jobs.args.batches.max_items
    if (bundles and archive is not None) or (not bundles and archive is None):
        raise E.InvalidRequestError("send several `bundles` files or one `archive`", details={"field": "bundles"})
    models = parse_models(model)
    if len(models) != 1:
        raise E.InvalidRequestError("a batch runs one model", details={"field": "model"})
    jobs.check_served(models)
    preset = jobs.resolve_preset(preset)
    checked = validate_overrides(parse_overrides_json(overrides))

    items: list[tuple[str, str]] = []  # (item name, path of its bundle ZIP on disk)
    try:
        return await _submit_items(request, svc, bundles, archive, limit, models[0], preset, checked, items)
    finally:
        unlink_quietly(*(p for _, p in items))


async def _submit_items(request, svc, bundles, archive, limit, model, preset, checked, items) -> JSONResponse:
    """Spool the bundles to temporary files (``items`` collects them), check them, record, queue."""
    jobs = svc.jobs
    if bundles:
        if len(bundles) > limit:
            raise BatchTooLargeError(
                f"{len(bundles)} bundles sent; a batch takes at most {limit}",
                details={"items": len(bundles), "limit": limit},
            )
        taken: set[str] = set()
        budget = UploadBudget(jobs.args.max_upload_bytes)
        for f in bundles:
            path = await asyncio.to_thread(spool, f.file, budget, f.filename)
            items.append((_item_name(f.filename or "item", taken), path))
            with open(path, "rb") as fh:
                if not fh.read(4).startswith(_ZIP_MAGIC):
                    raise UnsupportedMediaError(f"{f.filename} is not a ZIP archive", details={"file": f.filename})
    else:
        if not (await archive.read(4)).startswith(_ZIP_MAGIC):
            raise UnsupportedMediaError("archive is not a ZIP archive", details={"file": archive.filename})
        await archive.seek(0)
        items += await asyncio.to_thread(
            split_archive,
            archive.file,
            max_items=limit,
            max_unpacked=ARCHIVE_EXPANSION_LIMIT * jobs.args.max_upload_bytes,
            to_files=True,
        )
    jobs.check_queue_room(len(items))
    check_quota(
        jobs.args.quotas,
        jobs.book,
        principal_of(request),
        jobs=len(items),
        new_bytes=sum(os.path.getsize(p) for _, p in items),
    )
    if jobs.args.validate_pixels:
        for name, data in items:
            try:
                await asyncio.to_thread(load_bundle, data)
            except ReconError as e:
                cls = type(e) if isinstance(e, InvalidInputError) else InvalidInputError
                raise cls(f"item {name!r}: {e.message}", code=e.code, details={**e.details, "item": name}) from None

    batch_id = f"batch-{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"
    owner = principal_of(request).name
    rec = BatchRecord(batch_id=batch_id, model=model, preset=preset, overrides=checked, items=[], owner=owner)
    rec.items = [BatchItem(index=i, name=name, job_id=new_job_id()) for i, (name, _) in enumerate(items)]
    # The batch record first: a crash while its jobs are queued leaves a batch that names them, not orphans.
    await asyncio.to_thread(jobs.store.put, batch_key(batch_id), rec.model_dump_json(indent=1).encode())
    for item, (_, data) in zip(rec.items, items, strict=True):
        await jobs.enqueue(data, models=[model], preset=preset, overrides=checked, owner=owner, job_id=item.job_id)
    svc.batches[batch_id] = rec
    body = svc.view(rec)
    return JSONResponse(body, status_code=202, headers={"Location": body["links"]["self"]})


@router.get("/batches/{batch_id}", responses=_ERRORS)
async def get_batch(request: Request, batch_id: str):
    svc = _svc()
    return svc.view(svc.get(batch_id, principal_of(request)))


def _zip_batch(svc: BatchService, rec: BatchRecord, view: dict) -> str:
    store = svc.jobs.store
    fd, path = tempfile.mkstemp(prefix=f"recon3d-{rec.batch_id}-", suffix=".zip")
    os.close(fd)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("batch.json", json.dumps(view, indent=2))
        for it in rec.items:
            job = svc.jobs.get_job(it.job_id)
            if job is None or job.expired:
                continue
            write_artifacts(zf, store, job, prefix=f"{it.name}/")
    return path


@router.get("/batches/{batch_id}/download", responses={200: {"content": {"application/zip": {}}}, **_ERRORS})
async def download_batch(request: Request, batch_id: str):
    """Every item's files as ``<item>/<model>/<file>`` and the batch view as ``batch.json``."""
    svc = _svc()
    rec = svc.get(batch_id, principal_of(request))
    view = svc.view(rec)
    if view["expired"]:
        raise BatchExpiredError(
            f"the files of every item of batch {batch_id} passed their TTL and were deleted",
            details={"batch_id": batch_id, "expires_at": view["expires_at"]},
        )
    if view["status"] in ("queued", "running"):
        raise BatchNotReadyError(
            f"batch {batch_id} is {view['status']}; download once every item has ended",
            details={"counts": view["counts"]},
        )
    path = await asyncio.to_thread(_zip_batch, svc, rec, view)
    return StreamingResponse(
        iter_file(path),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="recon3d-{batch_id}.zip"'},
        background=BackgroundTask(os.unlink, path),
    )
