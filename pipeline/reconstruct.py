"""The reconstruction runner: named stages from an input bundle to exported files.

    read_bundle -> prepare_frames -> <the model's stages> -> export -> [evaluate -> quality.json] [previews]

A model's stages come from its registry entry (:mod:`pipeline.registry`), e.g. ``fusion``:
``reconstruct_geometry -> [refine_cameras -> refuse_geometry] -> [photo_refine] -> bake_texture``;
``nvdiffrec`` adds ``refine -> compare_refined``. Optional stages run when their configs
enable them (:class:`~pipeline.config.CameraRefineConfig`, :class:`~pipeline.config.PhotoRefineConfig`).

Progress is reported as (stage, overall fraction) through a callback, and cancellation is
polled between and inside stages, so the service can stop a job promptly. Evaluation is
:func:`pipeline.evaluation.evaluate_result`, the path the service's fan-out runs as Ray tasks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import __version__
from .bundle import BundleLimits, load_bundle
from .callbacks import CancelFn, ExportedFn, ProgressFn
from .config import ReconstructConfig, get_preset
from .errors import CanceledError
from .frames import PosedFrames
from .registry import EVALUATE_STAGES, EXPORT_STAGES, READ_STAGES, ModelSpec, Stage, get_model, model_names
from .result import MeshSummary, ReconstructionResult


def __getattr__(name: str):
    # MODELS follows the registry (a model registered later is listed too).
    if name == "MODELS":
        return model_names()
    raise AttributeError(name)


OUTPUT_FILES = ("mesh.obj", "material.mtl", "texture_kd.png", "mesh.glb", "result.json")


@dataclass
class ModelOutput:
    """What a model's pipeline function returns."""

    mesh: Any
    """The :class:`~pipeline.mesh.TexturedMesh` to export (None until the function sets it)."""
    frames: PosedFrames
    """The frames the mesh was made from (cameras refined when the model refined them)."""
    reports: dict[str, Any] = field(default_factory=dict)
    """result.json sections by key: ``geometry``, ``camera_refinement``, ``photo_refinement``, ``refine``."""
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    """Extra files the model wrote into the output folder (``loss.png``)."""


class StageRunner:
    """Times named stages, maps (stage, fraction within stage) to a monotone overall fraction, polls cancel."""

    def __init__(
        self,
        stages: list[Stage],
        callback: ProgressFn | None,
        should_cancel: CancelFn | None,
        out_dir: Path,
    ):
        total = sum(s.weight for s in stages)
        self._start: dict[str, float] = {}
        self._weight = {s.name: s.weight / total for s in stages}
        acc = 0.0
        for s in stages:
            self._start[s.name] = acc / total
            acc += s.weight
        self._callback = callback
        self._should_cancel = should_cancel
        self._last = 0.0
        self.out_dir = out_dir
        self.timings: dict[str, float] = {}

    def enabled(self, name: str) -> bool:
        """Whether the plan runs stage ``name`` (optional stages drop out of it)."""
        return name in self._weight

    def should_cancel(self) -> bool:
        return self._should_cancel is not None and bool(self._should_cancel())

    def check_cancel(self, stage: str | None = None) -> None:
        if self.should_cancel():
            if stage is None:
                raise CanceledError("the job was canceled")
            raise CanceledError(f"the job was canceled during {stage}", details={"stage": stage})

    def progress(self, name: str) -> ProgressFn:
        def report(_stage: str, fraction: float) -> None:
            self.check_cancel(name)
            overall = self._start[name] + self._weight[name] * min(max(fraction, 0.0), 1.0)
            if overall >= self._last and self._callback is not None:
                self._last = overall
                self._callback(name, overall)

        return report

    def run(self, name: str, fn, *args, **kw):
        """``fn(*args, **kw)`` as stage ``name``: cancel check, progress 0 and 1, timing."""
        self.check_cancel()
        report = self.progress(name)
        report(name, 0.0)
        t0 = time.perf_counter()
        value = fn(*args, **kw)
        self.timings[name] = round(time.perf_counter() - t0, 3)
        report(name, 1.0)
        return value


def plan_stages(spec: ModelSpec, cfg: ReconstructConfig, *, evaluate: bool, previews: bool) -> list[Stage]:
    """The stages one run goes through, in order."""
    model_stages = [s for s in spec.stages if s.enabled(cfg)]
    tail = [s for s in EVALUATE_STAGES if {"evaluate": evaluate, "previews": previews}[s.name]]
    return [*READ_STAGES, *model_stages, *EXPORT_STAGES, *tail]


def resolve_config(preset: str, device: str, config: ReconstructConfig | None) -> ReconstructConfig:
    """``config`` (with ``device`` when one is named) or the named preset on ``device``."""
    if config is None:
        return get_preset(preset, device=device)
    return replace(config, device=device) if device != "auto" else config


def reconstruct_bundle(
    src: str | Path | bytes,
    out_dir: str | Path,
    *,
    model: str = "fusion",
    preset: str = "balanced",
    device: str = "auto",
    config: ReconstructConfig | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    evaluate: bool = True,
    previews: bool = True,
    limits: BundleLimits | None = None,
    on_exported: ExportedFn | None = None,
) -> dict:
    """Reconstruct one bundle and write the outputs into ``out_dir``.

    Writes ``mesh.obj``, ``material.mtl``, ``texture_kd.png``, ``mesh.glb`` and
    ``result.json``; with ``evaluate`` also ``quality.json``, and with ``previews``
    the ``previews/`` folder. All geometry is in the input cameras' world frame.

    Returns the content of ``result.json``. Raises :class:`~pipeline.errors.ReconError`
    subclasses: ``InvalidInputError`` for bad input (``UNKNOWN_MODEL`` for a model the
    registry lacks), ``CanceledError`` when ``should_cancel()`` turned True, others for
    stage failures.
    """
    result = run_reconstruction(
        src, out_dir, model=model, preset=preset, device=device, config=config, progress=progress,
        should_cancel=should_cancel, evaluate=evaluate, previews=previews, limits=limits, on_exported=on_exported,
    )  # fmt: skip
    result.write(out_dir)
    return result.to_dict()


def run_reconstruction(
    src: str | Path | bytes,
    out_dir: str | Path,
    *,
    model: str = "fusion",
    preset: str = "balanced",
    device: str = "auto",
    config: ReconstructConfig | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    evaluate: bool = True,
    previews: bool = True,
    limits: BundleLimits | None = None,
    on_exported: ExportedFn | None = None,
) -> ReconstructionResult:
    """:func:`reconstruct_bundle` without writing result.json: the typed result, for a caller that adds to it.

    ``on_exported(frames, out_dir)`` is called once the mesh files are written, with the frames
    the mesh was made from (what :func:`pipeline.evaluation.evaluate_result` scores it against).
    """
    spec = get_model(model)
    cfg = resolve_config(preset, device, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = StageRunner(plan_stages(spec, cfg, evaluate=evaluate, previews=previews), progress, should_cancel, out)

    t_start = time.perf_counter()
    fs = stages.run("read_bundle", load_bundle, src, limits)
    frames = _prepare(stages, fs, cfg)
    output: ModelOutput = spec.resolve()(stages, frames, cfg)
    from .export import export_mesh

    files = stages.run("export", export_mesh, output.mesh, out)
    if on_exported is not None:
        on_exported(output.frames, out)
    result = _result(spec, cfg, fs, output, files, stages.timings, out)
    if evaluate or previews:
        _evaluate(stages, output, result, evaluate=evaluate, previews=previews)
    stages.timings["total"] = round(time.perf_counter() - t_start, 3)
    result.timings_s = stages.timings
    return result


def _prepare(stages: StageRunner, fs, cfg: ReconstructConfig) -> PosedFrames:
    from .prepare import prepare_frames

    return stages.run("prepare_frames", prepare_frames, fs, cfg, progress=stages.progress("prepare_frames"))


def _result(
    spec: ModelSpec, cfg: ReconstructConfig, fs, output: ModelOutput, files: dict, timings, out: Path
) -> ReconstructionResult:
    mesh, frames = output.mesh, output.frames
    return ReconstructionResult(
        recon3d_version=__version__,
        model=spec.name,
        preset=cfg.preset,
        device=cfg.device,
        config=cfg.to_dict(),
        views=[v.name for v in frames.views],
        camera_estimate=frames.camera_estimate,
        cameras=frames.resolved_views(),
        depth_encoding=frames.depth_encoding,
        geometry=output.reports.get("geometry"),
        camera_refinement=output.reports.get("camera_refinement"),
        photo_refinement=output.reports.get("photo_refinement"),
        refine=output.reports.get("refine"),
        mesh=MeshSummary(
            vertices=int(len(mesh.vertices)),
            faces=int(len(mesh.faces)),
            texture_size=int(mesh.texture.shape[0]) if mesh.texture is not None else 0,
        ),
        warnings=list(fs.warnings) + list(frames.warnings) + output.warnings,
        timings_s=dict(timings),
        files=sorted(Path(p).name for p in files.values()) + [f for f in output.files if (out / f).exists()],
    )


def _evaluate(
    stages: StageRunner, output: ModelOutput, result: ReconstructionResult, *, evaluate: bool, previews: bool
):
    """The evaluation path (:func:`pipeline.evaluation.evaluate_result`) in this process, as two timed stages."""
    from .evaluation import QUALITY_FILE, evaluate_result, preview_index, published_mesh, write_files

    mesh = published_mesh(lambda name: (stages.out_dir / name).read_bytes())
    ev = evaluate_result(mesh, output.frames, result, quality=evaluate, previews=previews, run=stages.run)
    write_files(ev.files, stages.out_dir)
    if evaluate:
        result.quality = ev.quality
        result.files.append(QUALITY_FILE)
    if previews:
        result.previews = preview_index(ev.files)
