"""The thin model server every model deployment shares.

A model replica takes a :class:`ModelRequest` (plain, serialisable), reads the upload
from the store, runs the pipeline in a worker thread (``asyncio.to_thread``) and
uploads the artifacts back to the store. It *streams* events to the caller::

    {"type": "progress", "stage": "bake_texture", "fraction": 0.62}   # any number
    {"type": "result", "result": {...result.json...}, "files": ["mesh.obj", ...]}   # or
    {"type": "error", "error": {"code": "MODEL_OOM", "message": "...", "details": {...}}}

Errors travel as data (the last event), never as exceptions, so nothing depends on
how Ray wraps exception types across a handle.

Cancellation: the pipeline polls ``should_cancel``, which is true once the cancel flag
``jobs/<id>/cancel`` exists in the store (polled at most every CANCEL_POLL_INTERVAL_S),
once the job's deadline passed, or once the caller dropped the stream.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import CanceledError, ModelOOMError, ReconError
from serve_app.config import ModelConfig, StoreConfig
from serve_app.experiments.overrides import runner_config_kwargs
from serve_app.experiments.resources import PeakMemory
from serve_app.store import Store, make_store

from . import constants as DC

logger = logging.getLogger("recon3d.model")

DEFAULT_RUNNER = "pipeline.reconstruct:reconstruct_bundle"
JOB_TIMEOUT_CODE = "JOB_TIMEOUT"
#: Error code of a run whose attempt was superseded (its job was retried elsewhere): it publishes nothing.
STALE_ATTEMPT_CODE = "STALE_ATTEMPT"

Runner = Callable[..., dict]


@dataclass(frozen=True)
class ModelRequest:
    """What crosses the handle: ids and store keys, never bytes or arrays."""

    job_id: str
    model: str
    preset: str
    input_key: str
    output_prefix: str
    cancel_key: str
    deadline: float
    """Unix time after which the run stops with JOB_TIMEOUT."""
    attempt: int = 1
    attempt_key: str | None = None
    """Store key holding the number of the attempt that owns ``output_prefix`` (fences a replaced attempt)."""
    overrides: dict | None = None
    """Config parameters over the preset, dotted keys (serve_app.experiments.overrides)."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelDeploymentConfig:
    """Everything a model replica needs: its model config, the store, and the resolved GPU count."""

    model: ModelConfig
    store: StoreConfig
    num_gpus: float


def resolve_runner(spec: str | None) -> Runner:
    """Import ``module:function`` (default: the library's reconstruct_bundle)."""
    module, _, attr = (spec or DEFAULT_RUNNER).partition(":")
    fn = getattr(importlib.import_module(module), attr)
    if not callable(fn):
        raise TypeError(f"runner {spec!r} is not callable")
    return fn


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


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, ModelOOMError)):
        return True
    name = type(e).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(e).lower()


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


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


class ModelServer:
    """Base of the model deployments (the Serve class is made by ``build_<model>_deployment``)."""

    #: Model id served; subclasses set it.
    model_name: str = ""
    #: Whether this model runs on a GPU when one is there (drives ``num_gpus``).
    uses_gpu: bool = True

    def __init__(self, cfg: ModelDeploymentConfig, *, runner: Runner | None = None):
        self.cfg = cfg
        #: Compute slots (created on the replica's event loop at the first request).
        self._compute_slots: asyncio.Semaphore | None = None
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
        a = m.autoscaling
        actor_options: dict[str, Any] = {"num_gpus": cfg.num_gpus, "num_cpus": m.num_cpus}
        if m.resources:
            actor_options["resources"] = dict(m.resources)
        initial = a.initial_replicas if a.initial_replicas is not None else a.min_replicas
        autoscaling = {
            "min_replicas": a.min_replicas,
            "initial_replicas": initial,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
        }
        if a.downscale_to_zero_delay_s is not None:
            autoscaling["downscale_to_zero_delay_s"] = a.downscale_to_zero_delay_s
        return {
            "name": f"{cls.model_name}-model",
            "ray_actor_options": actor_options,
            "max_ongoing_requests": m.max_ongoing_requests,
            "graceful_shutdown_timeout_s": m.graceful_shutdown_timeout_s,
            "health_check_period_s": DC.MODEL_HEALTH_CHECK_PERIOD_S,
            "health_check_timeout_s": DC.MODEL_HEALTH_CHECK_TIMEOUT_S,
            "autoscaling_config": autoscaling,
        }

    # ------------------------------------------------------------ handle methods

    async def run(self, request: dict) -> AsyncIterator[dict]:
        """Run one job; yields progress events, then exactly one result or error event."""
        req = ModelRequest(**request)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = CancelCheck(self.store, req.cancel_key, req.deadline)

        def progress(stage: str, fraction: float) -> None:
            loop.call_soon_threadsafe(
                events.put_nowait, {"type": "progress", "stage": stage, "fraction": float(fraction)}
            )

        # One compute slot per ongoing request, held until the worker THREAD ends, not the request:
        # Serve frees a canceled request at once, while its thread computes on to its next checkpoint.
        if self._compute_slots is None:
            self._compute_slots = asyncio.Semaphore(self.cfg.model.max_ongoing_requests)
        await self._compute_slots.acquire()
        try:
            work = asyncio.ensure_future(asyncio.to_thread(self._run_sync, req, progress, cancel))
        except BaseException:
            self._compute_slots.release()
            raise
        work.add_done_callback(lambda _: self._compute_slots.release())
        try:
            # First event at once: the caller learns a replica took the job (it may have waited for a scale-up).
            yield {"type": "progress", "stage": "started", "fraction": 0.0}
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

    def _run_sync(self, req: ModelRequest, progress, cancel: CancelCheck) -> dict:
        t0 = time.perf_counter()
        work_dir = Path(tempfile.mkdtemp(prefix=f"recon3d-{req.job_id}-"))
        try:
            src = self.store.get(req.input_key)
            out = work_dir / "out"
            extra = runner_config_kwargs(req.preset, self.device, req.overrides)
            mem = PeakMemory(self.device).start()
            result = self.runner(
                src,
                out,
                model=req.model,
                preset=req.preset,
                device=self.device,
                progress=progress,
                should_cancel=cancel,
                evaluate=False,
                previews=False,
                **extra,
            )
            resources = mem.stop()
            if cancel():  # the last checkpoint may have passed; don't publish a canceled job's files
                raise CanceledError("the job was canceled")
            result_path = out / "result.json"
            result = json.loads(result_path.read_text()) if result_path.is_file() else _json_safe(result or {})
            result["resources"] = resources  # peak memory of this run (experiments database)
            result_path.parent.mkdir(parents=True, exist_ok=True)
            result_path.write_text(json.dumps(result, indent=2))
            if not self._owns_output(req):
                return {
                    "type": "error",
                    "error": {
                        "code": STALE_ATTEMPT_CODE,
                        "message": f"attempt {req.attempt} was superseded by a retry; its output is discarded",
                        "details": {"attempt": req.attempt},
                    },
                }
            # Replace whatever an interrupted earlier attempt left behind (same keys: a retry is idempotent).
            self.store.delete_prefix(req.output_prefix)
            files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
            for rel in files:
                self.store.put_file(f"{req.output_prefix}/{rel}", out / rel)
            return {"type": "result", "result": result, "files": files, "elapsed_s": round(time.perf_counter() - t0, 3)}
        except CanceledError as e:
            if cancel.reason == "timeout":
                err = {
                    "code": JOB_TIMEOUT_CODE,
                    "message": "the job ran past its time limit",
                    "details": {"deadline": req.deadline},
                }
            else:
                err = e.to_dict()
            return {"type": "error", "error": err}
        except ReconError as e:
            if _is_oom(e):
                return {"type": "error", "error": {"code": "MODEL_OOM", "message": e.message, "details": e.details}}
            return {"type": "error", "error": e.to_dict()}
        except Exception as e:
            logger.exception("model run failed", extra={"job_id": req.job_id, "model": req.model})
            code = "MODEL_OOM" if _is_oom(e) else "MODEL_FAILED"
            return {"type": "error", "error": {"code": code, "message": f"{type(e).__name__}: {e}", "details": {}}}
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)

    def _owns_output(self, req: ModelRequest) -> bool:
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


def bind_model_deployment(
    cls: type[ModelServer], cfg: ModelDeploymentConfig, override_serve_options: dict | None = None
) -> Any:
    """``serve.deployment(cls)`` with ``cls.get_deployment_options(cfg)`` merged with the overrides, bound to ``cfg``."""
    from ray import serve

    options = {**cls.get_deployment_options(cfg), **(override_serve_options or {})}
    logger.info("%s deployment options: %s", cls.model_name, options)
    return serve.deployment(cls).options(**options).bind(cfg)
