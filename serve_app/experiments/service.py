"""The ingress side of experiments: submission, the run watcher and the database.

Runs are ordinary jobs (one model each, with ``overrides``): the scheduler queues,
retries and cancels them like any other job, and ``GET /jobs/{id}`` shows their progress.
:class:`ExperimentService` runs in the (single) ingress replica next to the scheduler. A
watcher task follows the runs' job records in memory; when a run's job ends it reads the
job's quality.json and result.json from the store, computes geometry metrics against the
dataset's ``gt/mesh.glb`` (a Ray task), copies the main outputs to
``experiments/<id>/runs/<slug>/`` and writes the row. A failed run is recorded with its error
code; it never fails the experiment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

from deployments.store import Store
from pipeline.bundle import load_bundle
from pipeline.errors import ReconError

from .. import errors as E
from ..auth import Principal, can_access
from ..jobs import TERMINAL, JobRecord, artifacts_prefix, new_job_id
from ..retention import experiment_files_due, experiment_record_due, orphan_ids
from ..submission import JobSubmitter
from .db import SNAPSHOT_KEY, ExperimentsDB, dumps, restore_snapshot
from .spec import GT_MESH, UPLOAD_DATASET, ExperimentSpec, InvalidExperimentError, resolve_dataset

logger = logging.getLogger("recon3d.experiments")

EXPERIMENTS_PREFIX = "experiments"
_EXPERIMENT_ID_RE = re.compile(r"^exp-[0-9]{13}-[0-9a-f]{8}$")
#: Folders and files of a dataset folder that are not sent to the model (ground truth, licences).
_DATASET_EXCLUDE_TOP = {"gt"}


class ExperimentNotFoundError(E.ServiceError):
    code = "EXPERIMENT_NOT_FOUND"


class ExperimentExpiredError(E.ServiceError):
    """The experiment's files (bundle copy, run outputs) passed ``artifact_ttl_s`` and were deleted."""

    code = "EXPERIMENT_EXPIRED"


def new_experiment_id() -> str:
    return f"exp-{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"


def valid_experiment_id(experiment_id: str) -> bool:
    return bool(_EXPERIMENT_ID_RE.match(experiment_id))


def experiment_key(experiment_id: str, *parts: str) -> str:
    return "/".join((EXPERIMENTS_PREFIX, experiment_id, *parts))


def git_commit(configured: str | None = None) -> str | None:
    """The commit the service runs: the setting, $RECON3D_GIT_COMMIT, or ``git rev-parse HEAD`` of the
    source tree (with ``-dirty`` when it has uncommitted changes); None when none of them is known."""
    if configured:
        return configured
    if os.environ.get("RECON3D_GIT_COMMIT"):
        return os.environ["RECON3D_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head + ("-dirty" if dirty else "") if head else None
    except (OSError, subprocess.SubprocessError):
        return None


def zip_dataset(path: Path) -> tuple[str, bool]:
    """A dataset bundle (folder or ZIP) as a ZIP file on disk for a job, without its ``gt/`` folder.

    Returns ``(zip_path, is_temporary)``: a ZIP dataset is used where it lies; a folder is written
    to a temporary file, streamed file by file (never whole in memory), that the caller removes.
    """
    if path.is_file():
        return str(path), False
    fd, tmp = tempfile.mkstemp(prefix="recon3d-dataset-", suffix=".zip")
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:  # PNGs are compressed
            for p in sorted(path.rglob("*")):
                rel = p.relative_to(path)
                if p.is_file() and rel.parts[0] not in _DATASET_EXCLUDE_TOP and not rel.parts[0].startswith("."):
                    zf.write(p, rel.as_posix())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp, True


def default_db_path(args) -> Path:
    s = args.experiments
    if s.db_path:
        return Path(s.db_path)
    if args.store.kind == "local":
        return Path(args.store.path) / "experiments.sqlite"
    return Path(tempfile.gettempdir()) / "recon3d" / "experiments.sqlite"


def _run_row(experiment_id: str, run, job_id: str, now: float) -> dict:
    """The database row of one queued run."""
    return {
        "experiment_id": experiment_id,
        "run_index": run.index,
        "slug": run.slug,
        "dataset": run.dataset,
        "model": run.model,
        "preset": run.preset,
        "overrides_json": dumps(run.overrides),
        "job_id": job_id,
        "status": "queued",
        "created_at": now,
    }


class ExperimentService:
    """Submission, watching and results of experiments (one per ingress replica)."""

    def __init__(self, jobs: JobSubmitter):
        self.jobs = jobs
        self.args = jobs.args
        self.settings = jobs.args.experiments
        self.store: Store = jobs.store
        self.db_path = default_db_path(self.args)
        snap = self.settings.snapshot
        self.snapshot_enabled = (self.args.store.kind != "local") if snap is None else snap
        self.db: ExperimentsDB | None = None
        self.commit: str | None = None
        #: job id -> (experiment id, run index) of runs being watched.
        self.watched: dict[str, tuple[str, int]] = {}
        self._tasks: list[asyncio.Task] = []
        self._finalizing: set[str] = set()
        self._marked_running: set[str] = set()
        self._last_snapshot = 0.0
        self._last_sweep = 0.0

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.snapshot_enabled and not self.db_path.exists():
            try:
                data = await asyncio.to_thread(self.store.get, SNAPSHOT_KEY)
                await asyncio.to_thread(restore_snapshot, self.db_path, data)
                logger.info("experiments database restored from the store snapshot")
            except KeyError:
                pass
        self.db = await asyncio.to_thread(ExperimentsDB, self.db_path)
        self.commit = await asyncio.to_thread(git_commit, self.settings.git_commit)
        await self.delete_orphans()
        for run in await asyncio.to_thread(self.db.open_runs):
            if run["job_id"]:
                self.watched[run["job_id"]] = (run["experiment_id"], run["run_index"])
        self._tasks.append(asyncio.create_task(self._watch(), name="experiments:watch"))
        logger.info(
            "experiments: database %s (schema applied %s), %d runs watched",
            self.db_path,
            self.db.applied,
            len(self.watched),
        )

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await self._snapshot(force=True)

    # ------------------------------------------------------------ submission

    async def submit(self, spec: ExperimentSpec, upload: str | None, owner: str | None = None) -> dict:
        """Validate the bundles, store them, create one job per run and the database rows.

        ``upload``: the path of the uploaded bundle ZIP, spooled to disk by the router (None: datasets).
        """
        self.jobs.check_queue_room(len(spec.runs))
        temporary: list[str] = []
        try:
            return await self._submit(spec, upload, owner, temporary)
        finally:
            for tmp in temporary:  # the store holds its own copy now (or the submission failed)
                Path(tmp).unlink(missing_ok=True)

    async def _submit(self, spec: ExperimentSpec, upload: str | None, owner: str | None, temporary: list[str]) -> dict:
        experiment_id = new_experiment_id()
        inputs = await self._inputs(spec, upload, temporary)
        bundle_key = experiment_key(experiment_id, "input", "bundle.zip") if upload is not None else None
        shared = await self._store_inputs(experiment_id, inputs, bundle_key)
        now = time.time()
        # The experiment's rows are written before any job is queued (they name the jobs' ids).
        rows = [_run_row(experiment_id, run, new_job_id(), now) for run in spec.runs]
        exp = {
            "experiment_id": experiment_id,
            "name": spec.name,
            "description": spec.description,
            "status": "running",
            "spec_json": dumps(spec.raw),
            "bundle_key": bundle_key,
            "git_commit": self.commit,
            "created_at": now,
            "owner": owner,
        }
        await asyncio.to_thread(self.db.create_experiment, exp, rows)
        await self._enqueue_runs(spec, rows, inputs, shared, owner)
        for row in rows:
            self.watched[row["job_id"]] = (experiment_id, row["run_index"])
        await self._snapshot()
        logger.info("experiment %s queued: %d runs", experiment_id, len(rows))
        return {"experiment_id": experiment_id, "status": "running", "runs": len(rows)}

    async def _inputs(self, spec: ExperimentSpec, upload: str | None, temporary: list[str]) -> dict[str, str]:
        """Dataset name -> the path of a bundle ZIP on disk for every dataset the runs use, validated
        when configured. Temporary ZIPs written here are appended to ``temporary`` for the caller to remove."""
        inputs: dict[str, str] = {}
        if upload is not None:
            inputs[UPLOAD_DATASET] = upload
        else:
            for ds in dict.fromkeys(r.dataset for r in spec.runs):
                path = resolve_dataset(self.settings.dataset_root, ds, "datasets")
                zip_path, is_temporary = await asyncio.to_thread(zip_dataset, path)
                if is_temporary:
                    temporary.append(zip_path)
                inputs[ds] = zip_path
        if self.args.validate_pixels:
            for ds, data in inputs.items():
                try:
                    await asyncio.to_thread(load_bundle, data)
                except ReconError as e:
                    raise InvalidExperimentError(
                        f"dataset {ds!r} is not a valid bundle: {e.message}",
                        details={
                            "key": "bundle" if ds == UPLOAD_DATASET else "datasets",
                            "dataset": ds,
                            "cause": e.code,
                            **e.details,
                        },
                    ) from None
        return inputs

    async def _store_inputs(self, experiment_id: str, inputs: dict[str, str], bundle_key: str | None) -> dict:
        """One copy of each dataset's bundle, shared by every run on it (not one per run): dataset -> key."""
        shared = {
            ds: bundle_key if ds == UPLOAD_DATASET else experiment_key(experiment_id, "input", f"dataset-{i}.zip")
            for i, ds in enumerate(inputs)
        }
        for ds, key in shared.items():
            await asyncio.to_thread(self.store.put_file, key, inputs[ds])  # a streamed copy
        return shared

    async def _enqueue_runs(self, spec: ExperimentSpec, rows: list[dict], inputs: dict, shared: dict, owner) -> None:
        """Queue one job per run (ids already in ``rows``), each on its dataset's shared copy."""
        counted: set[str] = set()
        for run, row in zip(spec.runs, rows, strict=True):
            # Quotas count a shared copy once: on the first job that uses it.
            data = inputs[run.dataset] if run.dataset not in counted else b""
            counted.add(run.dataset)
            await self.jobs.enqueue(
                data,
                models=[run.model],
                preset=run.preset,
                overrides=run.overrides,
                owner=owner,
                job_id=row["job_id"],
                input_ref=shared[run.dataset],
            )

    # ------------------------------------------------------------ watcher

    async def _watch(self) -> None:
        while True:
            try:
                await self.poll_once()
                if time.monotonic() - self._last_sweep >= self.args.sweep_interval_s:
                    self._last_sweep = time.monotonic()
                    await self.sweep_once()
                await self._snapshot()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("experiment watcher failed; retrying")
            await asyncio.sleep(self.settings.poll_interval_s)

    async def poll_once(self) -> None:
        """Move watched runs forward from their job records (running, then finalized at a terminal state)."""
        for job_id, (experiment_id, index) in list(self.watched.items()):
            if job_id in self._finalizing:
                continue
            rec = self.jobs.get_job(job_id)
            if rec is None:
                self.watched.pop(job_id, None)
                await asyncio.to_thread(
                    self.db.update_run,
                    experiment_id,
                    index,
                    status="failed",
                    error_code=E.JobNotFoundError.code,
                    error_message="the run's job was deleted before its metrics were recorded",
                    finished_at=time.time(),
                )
                await self._maybe_finish(experiment_id)
                continue
            run = next(iter(rec.runs.values()))
            if run.status in TERMINAL:
                self._finalizing.add(job_id)
                task = asyncio.create_task(self._finalize(job_id, experiment_id, index, rec))
                self._tasks.append(task)  # keep a reference until it ends
                task.add_done_callback(self._tasks.remove)
            elif run.status == "running" and job_id not in self._marked_running:
                self._marked_running.add(job_id)  # one write per run, not one per poll
                await asyncio.to_thread(
                    self.db.update_run, experiment_id, index, status="running", started_at=run.started_at
                )

    async def _finalize(self, job_id: str, experiment_id: str, index: int, rec: JobRecord) -> None:
        try:
            fields = await self._run_fields(experiment_id, index, rec)
            await asyncio.to_thread(self.db.update_run, experiment_id, index, **fields)
            self.watched.pop(job_id, None)
            self._marked_running.discard(job_id)
            await self._maybe_finish(experiment_id)
        except Exception:
            logger.exception("recording run %s of experiment %s failed", index, experiment_id)
        finally:
            self._finalizing.discard(job_id)

    async def _run_fields(self, experiment_id: str, index: int, rec: JobRecord) -> dict[str, Any]:
        from .results import run_metrics

        model, run = next(iter(rec.runs.items()))
        prefix = artifacts_prefix(rec.job_id, model)
        row = next(r for r in await asyncio.to_thread(self.db.runs, experiment_id) if r["run_index"] == index)

        def read_json(name: str) -> dict | None:
            if name not in run.files:
                return None
            try:
                return json.loads(self.store.get(f"{prefix}/{name}"))
            except (KeyError, ValueError):
                return None

        quality = await asyncio.to_thread(read_json, "quality.json")
        result = await asyncio.to_thread(read_json, "result.json")
        fields = run_metrics(quality, result)
        geometry = None
        if self.settings.geometry_metrics and "mesh.glb" in run.files and row["dataset"] != UPLOAD_DATASET:
            geometry = await self._geometry(row["dataset"], f"{prefix}/mesh.glb")
            if geometry is not None:
                fields.update(
                    f_score=geometry.get("f_score"),
                    chamfer_l1=geometry.get("chamfer_l1"),
                    geometry_json=dumps(geometry),
                )
        out_prefix = experiment_key(experiment_id, "runs", row["slug"])
        copied = await asyncio.to_thread(self._copy_outputs, prefix, out_prefix, run.files, geometry)
        fields.update(
            status=run.status,
            error_code=run.error.code if run.error else None,
            error_message=run.error.message if run.error else None,
            wall_s=(run.finished_at - run.started_at) if run.finished_at and run.started_at else None,
            git_commit=self.commit,
            output_prefix=out_prefix if copied else None,
            started_at=run.started_at,
            finished_at=run.finished_at or time.time(),
        )
        if fields.get("model_s") is None and run.timings_s:
            fields["model_s"] = run.timings_s.get("total")
        return fields

    def _copy_outputs(self, src: str, dst: str, files: list[str], geometry: dict | None) -> list[str]:
        copied = []
        for name in self.settings.copy_files:
            if name in files:
                self.store.put(f"{dst}/{name}", self.store.get(f"{src}/{name}"))
                copied.append(name)
        if geometry is not None:
            self.store.put(f"{dst}/geometry.json", json.dumps(geometry, indent=2).encode())
            copied.append("geometry.json")
        return copied

    async def _geometry(self, dataset: str, mesh_key: str) -> dict | None:
        """Geometry metrics against ``<dataset>/gt/mesh.glb`` in a Ray task; None without a GT or on failure."""
        try:
            gt = resolve_dataset(self.settings.dataset_root, dataset) / GT_MESH
        except InvalidExperimentError:
            return None
        if not gt.is_file():
            return None
        from .tasks import geometry_metrics_task

        try:
            return await geometry_metrics_task.options(
                num_cpus=self.args.fanout_num_cpus, name=f"geometry:{mesh_key}", max_retries=1
            ).remote(self.store, mesh_key, gt.read_bytes())
        except Exception as e:
            logger.warning("geometry metrics of %s failed: %s", mesh_key, e)
            return None

    async def _maybe_finish(self, experiment_id: str) -> None:
        runs = await asyncio.to_thread(self.db.runs, experiment_id)
        if all(r["status"] in TERMINAL for r in runs):
            await asyncio.to_thread(self.db.finish_experiment, experiment_id, time.time())
            await self._snapshot(force=True)
            logger.info("experiment %s finished", experiment_id)

    async def _snapshot(self, *, force: bool = False) -> None:
        if not self.snapshot_enabled or self.db is None or not self.db.dirty:
            return
        if not force and time.monotonic() - self._last_snapshot < self.settings.snapshot_interval_s:
            return
        self._last_snapshot = time.monotonic()
        data = await asyncio.to_thread(self.db.snapshot_bytes)
        await asyncio.to_thread(self.store.put, SNAPSHOT_KEY, data)

    # ------------------------------------------------------------ retention (serve_app/retention.py)

    async def sweep_once(self, *, now: float | None = None) -> int:
        """Delete the files of experiments ended ``artifact_ttl_s`` ago (then 410 EXPERIMENT_EXPIRED),
        and their rows ``record_ttl_s`` after that (then 404); returns how many experiments' files went."""
        now = time.time() if now is None else now
        n = 0
        for exp in await asyncio.to_thread(self.db.ended_experiments):
            experiment_id, files_expired_at = exp["experiment_id"], exp["files_expired_at"]
            if experiment_files_due(exp["finished_at"], files_expired_at, now, self.args.artifact_ttl_s):
                await asyncio.to_thread(self.store.delete_prefix, experiment_key(experiment_id))
                await asyncio.to_thread(self.db.mark_files_expired, experiment_id, now)
                logger.info("experiment %s: files expired", experiment_id)
                n += 1
            elif experiment_record_due(files_expired_at, now, self.args.record_ttl_s):
                await asyncio.to_thread(self.db.delete_experiment, experiment_id)
                logger.info("experiment %s: record expired", experiment_id)
        return n

    async def delete_orphans(self, *, now: float | None = None) -> list[str]:
        """What a crash left: ``experiments/<id>/`` folders without rows (the bundle is stored before
        the rows are written), unless a job that has not ended still reads its bundle copy."""
        keys = await asyncio.to_thread(self.store.list, EXPERIMENTS_PREFIX)
        known = await asyncio.to_thread(self.db.experiment_ids)
        in_use = {
            rec.input_ref.split("/")[1]
            for rec in self.jobs.book.jobs.values()
            if rec.input_ref and rec.input_ref.startswith(f"{EXPERIMENTS_PREFIX}/") and not rec.terminal
        }
        orphans = [e for e in orphan_ids(keys, known, prefix=EXPERIMENTS_PREFIX, now=now) if e not in in_use]
        for experiment_id in orphans:
            await asyncio.to_thread(self.store.delete_prefix, experiment_key(experiment_id))
            logger.info(
                "deleted the files of experiment %s, which has no record (an interrupted submission)", experiment_id
            )
        return orphans

    # ------------------------------------------------------------ reads

    async def experiment(self, experiment_id: str, principal: Principal | None = None) -> tuple[dict, list[dict]]:
        """The experiment and its runs; another key's experiment is as unknown as a missing one (404)."""
        exp = await asyncio.to_thread(self.db.experiment, experiment_id) if valid_experiment_id(experiment_id) else None
        if exp is not None and principal is not None and not can_access(principal, exp.get("owner")):
            exp = None
        if exp is None:
            raise ExperimentNotFoundError(f"no experiment {experiment_id!r}", details={"experiment_id": experiment_id})
        return exp, await asyncio.to_thread(self.db.runs, experiment_id)
