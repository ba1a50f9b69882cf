"""The one model server every model deployment uses (the model comes from :mod:`pipeline.registry`).

A model replica takes a :class:`~deployments.protocol.ModelRequest` (plain, serialisable), reads
the upload from the store, runs the model's pipeline in a worker thread (``asyncio.to_thread``),
makes quality.json and the previews itself when the request asks for it (``evaluate``, one-node
clusters: :mod:`deployments.replica_evaluation`) and uploads the artifacts back to the store. It *streams* events to the caller (progress, then
one result or error: :mod:`deployments.protocol`).

Cancellation: the pipeline polls ``should_cancel``, which is true once the cancel flag
``jobs/<id>/cancel`` exists in the store (polled at most every CANCEL_POLL_INTERVAL_S),
once the job's deadline passed, or once the caller dropped the stream.

``build_model_deployment(cfg)`` binds one Serve deployment per registered model it is given;
the deployment's name is :func:`deployment_name` of the model.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pipeline.config import ReconstructConfig, get_preset
from pipeline.errors import CanceledError, ReconError
from pipeline.overrides import apply_overrides
from pipeline.registry import get_model
from pipeline.result import ReconstructionResult

from . import constants as DC
from . import protocol as P
from .config import ModelDeploymentConfig
from .replica_evaluation import evaluate_in_replica
from .resources import PeakMemory, release_free_heap
from .store import Store, make_store

logger = logging.getLogger("recon3d.model")

#: The library's runner: returns the typed result without writing result.json (the server writes it once).
DEFAULT_RUNNER = "pipeline.reconstruct:run_reconstruction"

#: ``reconstruct_bundle``'s signature; returns a ReconstructionResult, or result.json's content as a dict.
Runner = Callable[..., Any]


def deployment_name(model: str) -> str:
    """Serve deployment name of a model's server."""
    return f"{model}-model"


def resolve_runner(spec: str | None) -> Runner:
    """Import ``module:function`` (default: the library's run_reconstruction)."""
    module, _, attr = (spec or DEFAULT_RUNNER).partition(":")
    fn = getattr(importlib.import_module(module), attr)
    if not callable(fn):
        raise TypeError(f"runner {spec!r} is not callable")
    return fn


def resolve_run_config(req: P.ModelRequest, device: str) -> ReconstructConfig:
    """The run's config: the request's preset on ``device``, with its overrides applied."""
    return apply_overrides(get_preset(req.preset, device=device), req.overrides)


class CancelCheck:
    """``should_cancel`` for the pipeline: store flag (rate-limited), deadline, or local stop."""

    def __init__(self, store: Store, key: str, deadline: float, *, interval_s: float = DC.CANCEL_POLL_INTERVAL_S):
        self.store = store
        self.key = key
        self.deadline = deadline
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.reason: str | None = None
        self._next_poll = 0.0

    def __call__(self) -> bool:
        if self.reason is not None:
            return True
        if self.stop.is_set():
            self.reason = "dropped"
        elif time.time() > self.deadline:
            self.reason = "timeout"
        else:
            now = time.monotonic()
            if now >= self._next_poll:
                self._next_poll = now + self.interval_s
                try:
                    if self.store.exists(self.key):
                        self.reason = "canceled"
                except Exception:  # a flaky store must not kill the run; try again next poll
                    logger.warning("cancel flag poll failed", exc_info=True)
        return self.reason is not None


def set_compute_threads(requested: int | None) -> int:
    """Set torch's CPU thread count: ``requested``, or every core this process may use; returns it.

    Ray exports ``OMP_NUM_THREADS`` = the actor's ``num_cpus`` (at least 1) to its workers, so a
    replica reserving half a CPU would otherwise compute on one thread.
    """
    import os

    import torch

    n = requested or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    torch.set_num_threads(max(1, int(n)))
    return torch.get_num_threads()


class ModelServer:
    """Serves one registered model (``cfg.model.name``); the Serve class is made by :func:`build_model_deployment`."""

    def __init__(self, cfg: ModelDeploymentConfig, *, runner: Runner | None = None):
        self.cfg = cfg
        #: Compute slots (created on the replica's event loop at the first request).
        self._compute_slots: asyncio.Semaphore | None = None
        self.spec = get_model(cfg.model.name)
        self.model_name = self.spec.name
        self.store = make_store(cfg.store)
        self.runner = runner or resolve_runner(cfg.model.runner)
        self.device = cfg.model.device
        if self.device == "auto" and cfg.num_gpus == 0:
            self.device = "cpu"  # no GPU reserved: never grab one that belongs to another replica
        self.compute_threads = set_compute_threads(cfg.model.compute_threads)

    @classmethod
    def get_deployment_options(cls, cfg: ModelDeploymentConfig) -> dict:
        """Serve options owned by the model: resources, concurrency, shutdown, autoscaling."""
        m = cfg.model
        num_cpus = m.num_cpus if m.num_cpus is not None else get_model(m.name).num_cpus
        actor_options: dict[str, Any] = {"num_gpus": cfg.num_gpus, "num_cpus": num_cpus}
        if m.resources:
            actor_options["resources"] = dict(m.resources)
        return {
            "name": deployment_name(m.name),
            "ray_actor_options": actor_options,
            "max_ongoing_requests": m.max_ongoing_requests,
            "graceful_shutdown_timeout_s": m.graceful_shutdown_timeout_s,
            "health_check_period_s": DC.MODEL_HEALTH_CHECK_PERIOD_S,
            "health_check_timeout_s": DC.MODEL_HEALTH_CHECK_TIMEOUT_S,
            "autoscaling_config": autoscaling_options(m.autoscaling),
        }

    # ------------------------------------------------------------ handle methods

    async def run(self, request: dict) -> AsyncIterator[dict]:
        """Run one job; yields progress events, then exactly one result or error event."""
        req = P.ModelRequest(**request)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = CancelCheck(self.store, req.cancel_key, req.deadline)

        def progress(stage: str, fraction: float) -> None:
            loop.call_soon_threadsafe(events.put_nowait, P.ProgressEvent(stage, fraction).to_dict())

        def on_quality(quality: dict | None, error: dict | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, P.QualityEvent(quality, error).to_dict())

        # One compute slot per ongoing request, held until the worker THREAD ends, not the request:
        # Serve frees a canceled request at once, while its thread computes on to its next checkpoint.
        if self._compute_slots is None:
            self._compute_slots = asyncio.Semaphore(self.cfg.model.max_ongoing_requests)
        await self._compute_slots.acquire()
        try:
            work = asyncio.ensure_future(asyncio.to_thread(self._run_then_release, req, progress, cancel, on_quality))
        except BaseException:
            self._compute_slots.release()
            raise
        work.add_done_callback(lambda _: self._compute_slots.release())
        try:
            # First event at once: the caller learns a replica took the job (it may have waited for a scale-up).
            yield P.ProgressEvent("started", 0.0).to_dict()
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({work, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                break
            while not events.empty():
                yield events.get_nowait()
            yield work.result()
        finally:
            # The caller went away (or Serve canceled the request): stop the thread at its next checkpoint.
            # The next request of this replica waits for the compute slot, i.e. for this thread to end.
            cancel.stop.set()

    async def info(self) -> dict:
        """Device facts for /health."""
        return await asyncio.to_thread(self._info_sync)

    async def check_health(self) -> None:
        try:
            await asyncio.to_thread(self.store.exists, "health-probe")
            if self.cfg.num_gpus > 0:
                import torch

                if not torch.cuda.is_available():
                    raise RuntimeError("this replica reserved a GPU but CUDA is not available")
        except Exception:
            logger.exception("health check failed", extra={"model": self.model_name})
            raise

    # ------------------------------------------------------------ work (worker thread)

    def _run_sync(self, req: P.ModelRequest, progress, cancel: CancelCheck, on_quality) -> dict:
        """The model run, the evaluation when the request asks for it (``req.evaluate``), result.json, the upload."""
        t0 = time.perf_counter()
        work_dir = Path(tempfile.mkdtemp(prefix=f"recon3d-{req.job_id}-"))
        try:
            out = work_dir / "out"
            src = self.store.get(req.input_key)
            exported: dict = {}
            result = self._reconstruct(req, src, out, progress, cancel, exported)
            evaluation = None
            if req.evaluate:
                evaluation = evaluate_in_replica(
                    out, result, exported.get("frames"), lambda: src, n_previews=req.preview_views,
                    progress=progress, should_cancel=cancel, on_quality=on_quality,
                )  # fmt: skip
            result.write(out)
            if not self._owns_output(req):
                return P.ErrorEvent(
                    P.STALE_ATTEMPT,
                    f"attempt {req.attempt} was superseded by a retry; its output is discarded",
                    {"attempt": req.attempt},
                ).to_dict()
            files = self._publish(req, out)
            elapsed = round(time.perf_counter() - t0, 3)
            return P.ResultEvent(result, files, elapsed, exported.get("inputs") or None, evaluation).to_dict()
        except Exception as e:
            return self._error_event(e, req, cancel).to_dict()
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)

    def _run_then_release(self, req: P.ModelRequest, progress, cancel: CancelCheck, on_quality) -> dict:
        """:meth:`_run_sync`, then the heap it freed handed back: the next run's peak starts from what this one left."""
        try:
            return self._run_sync(req, progress, cancel, on_quality)
        finally:
            release_free_heap()

    def _reconstruct(
        self, req: P.ModelRequest, src: bytes, out: Path, progress, cancel: CancelCheck, exported: dict
    ) -> ReconstructionResult:
        """Run the model into ``out``; the typed result, with the run's resources added (not yet written).

        A runner that takes ``on_exported`` hands over the frames as soon as the mesh files exist:
        ``exported["frames"]`` when this replica evaluates (``req.evaluate``), else ``exported["inputs"]``,
        the fan-out's object refs (:func:`put_evaluation_inputs`).
        """
        cfg = resolve_run_config(req, self.device)
        mem = PeakMemory(self.device).start()
        extra = {}
        if _accepts(self.runner, "on_exported"):
            extra["on_exported"] = lambda frames, folder: exported.update(_exported(req, frames, folder))
        returned = self.runner(
            src, out, model=req.model, preset=req.preset, device=self.device, config=cfg,
            progress=progress, should_cancel=cancel, evaluate=False, previews=False, **extra,
        )  # fmt: skip
        resources = mem.stop()
        if cancel():  # the last checkpoint may have passed; don't publish a canceled job's files
            raise CanceledError("the job was canceled")
        if isinstance(returned, ReconstructionResult):
            result = returned
        elif returned:  # a custom runner's dict: the request names what it may leave out
            result = ReconstructionResult.from_dict({"model": req.model, "preset": req.preset, **returned})
        else:
            result = ReconstructionResult.read(out / "result.json")
        if not result.config:
            result.config = cfg.to_dict()  # a custom runner: record what it was given
        result.resources = resources  # peak memory of this run (experiments database)
        return result

    def _publish(self, req: P.ModelRequest, out: Path) -> list[str]:
        """Replace whatever an interrupted earlier attempt left (same keys: a retry is idempotent)."""
        self.store.delete_prefix(req.output_prefix)
        files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        for rel in files:
            self.store.put_file(f"{req.output_prefix}/{rel}", out / rel)
        return files

    def _error_event(self, e: Exception, req: P.ModelRequest, cancel: CancelCheck) -> P.ErrorEvent:
        if isinstance(e, CanceledError):
            if cancel.reason == "timeout":
                return P.ErrorEvent(P.JOB_TIMEOUT, "the job ran past its time limit", {"deadline": req.deadline})
            return P.ErrorEvent(e.code, e.message, dict(e.details))
        if isinstance(e, ReconError):
            return P.ErrorEvent(P.MODEL_OOM if P.is_oom(e) else e.code, e.message, dict(e.details))
        logger.exception("model run failed", extra={"job_id": req.job_id, "model": req.model}, exc_info=e)
        return P.ErrorEvent(P.MODEL_OOM if P.is_oom(e) else P.MODEL_FAILED, f"{type(e).__name__}: {e}", {})

    def _owns_output(self, req: P.ModelRequest) -> bool:
        """Whether this attempt may publish to ``output_prefix`` (the scheduler records the current one)."""
        if req.attempt_key is None:
            return True
        try:
            return int(self.store.get(req.attempt_key)) == req.attempt
        except KeyError:
            return True
        except ValueError:
            return True

    def _info_sync(self) -> dict:
        out: dict[str, Any] = {
            "model": self.model_name,
            "device": self.device,
            "num_gpus": self.cfg.num_gpus,
            "compute_threads": self.compute_threads,
            "gpus": [],
        }
        try:
            import torch

            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    p = torch.cuda.get_device_properties(i)
                    out["gpus"].append({"index": i, "name": p.name, "memory_total_bytes": int(p.total_memory)})
        except Exception as e:  # torch missing or broken driver: report, don't fail /health
            out["gpu_error"] = str(e)
        return out


def _accepts(fn, name: str) -> bool:
    """Whether ``fn`` takes the keyword argument ``name``."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _exported(req: P.ModelRequest, frames, folder: Path) -> dict:
    """What the replica keeps once the mesh files exist: the frames, or the fan-out's object refs."""
    return {"frames": frames} if req.evaluate else {"inputs": put_evaluation_inputs(frames, folder)}


def put_evaluation_inputs(frames, folder: Path) -> dict:
    """Object refs of the published mesh (read back from ``folder``, as the fan-out scores it), the
    frames it was made from and the previews' corner normals: the fan-out's tasks share them, and
    nothing is read or decoded again (:mod:`serve_app.fanout`).

    Empty outside a Ray worker or driver (a server built in-process, as tests and the CLI do):
    ``ray.put`` would otherwise start a local cluster nobody shuts down, and the fan-out reads
    the published files instead."""
    import ray

    if not ray.is_initialized():
        return {}

    from pipeline import evaluation as EV
    from pipeline.previews import corner_normals

    mesh = EV.published_mesh(lambda name: (Path(folder) / name).read_bytes())
    return {
        "mesh": ray.put(mesh),
        "frames": ray.put(frames),
        "normals": ray.put(corner_normals(mesh.vertices, mesh.faces)),
    }


def autoscaling_options(a) -> dict:
    """Serve's ``autoscaling_config`` of an :class:`~deployments.config.AutoscalingConfig`."""
    out = {
        "min_replicas": a.min_replicas,
        "initial_replicas": a.initial_replicas if a.initial_replicas is not None else a.min_replicas,
        "max_replicas": a.max_replicas,
        "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s,
    }
    if a.downscale_to_zero_delay_s is not None:
        out["downscale_to_zero_delay_s"] = a.downscale_to_zero_delay_s
    return out


def build_model_deployment(
    cfg: ModelDeploymentConfig,
    *,
    override_serve_options: dict | None = None,
    deployment_cls: type[ModelServer] | None = None,
) -> Any:
    """Bind the model's deployment: options from ``get_deployment_options(cfg)``, then the overrides."""
    from ray import serve

    cls = deployment_cls or ModelServer
    options = {**cls.get_deployment_options(cfg), **(override_serve_options or {})}
    logger.info("%s deployment options: %s", cfg.model.name, options)
    return serve.deployment(cls).options(**options).bind(cfg)
