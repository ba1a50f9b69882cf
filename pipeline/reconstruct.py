"""The reconstruction pipeline: named stages from an input bundle to exported files.

    read_bundle -> prepare_frames -> reconstruct_geometry -> [refine_cameras -> reconstruct_geometry]
                -> photo_refine -> bake_texture -> export -> [evaluate -> quality.json] [previews]

``refine_cameras`` (estimated cameras only) and ``photo_refine`` run when their configs
enable them (:class:`~pipeline.config.CameraRefineConfig`, :class:`~pipeline.config.PhotoRefineConfig`).

Each model is a sequence of stages; :data:`MODELS` names them. Progress is reported
as (stage, overall fraction) through a callback, and cancellation is polled between
and inside stages, so the service can stop a job promptly.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from . import __version__
from .bundle import BundleLimits, load_bundle
from .callbacks import CancelFn, ProgressFn
from .config import ReconstructConfig, get_preset
from .errors import CanceledError, ConvergenceError, InvalidInputError

#: Relative cost of each stage, for an overall progress fraction that never goes backwards.
_STAGE_WEIGHTS: dict[str, float] = {
    "read_bundle": 0.05,
    "prepare_frames": 0.15,
    "reconstruct_geometry": 0.30,
    "refine_cameras": 0.10,
    "refuse_geometry": 0.15,
    "photo_refine": 0.15,
    "bake_texture": 0.25,
    "refine": 1.50,
    "compare_refined": 0.05,
    "export": 0.05,
    "evaluate": 0.10,
    "previews": 0.10,
}

#: Models served and run by the CLI: each is the fusion stages, plus refinement for ``nvdiffrec``.
MODELS: tuple[str, ...] = ("fusion", "nvdiffrec")

#: The refined mesh is returned only if its mean dihedral angle stays within this multiple of the fusion mesh's ...
ROUGHENING_RATIO = 1.5
#: ... or within this many degrees of it.
ROUGHENING_MIN_DEG = 5.0
OUTPUT_FILES = ("mesh.obj", "material.mtl", "texture_kd.png", "mesh.glb", "result.json")


class _Progress:
    """Maps (stage, fraction within stage) to a monotone overall fraction."""

    def __init__(self, stages: list[str], callback: ProgressFn | None, should_cancel: CancelFn | None):
        total = sum(_STAGE_WEIGHTS[s] for s in stages)
        self._start: dict[str, float] = {}
        acc = 0.0
        for s in stages:
            self._start[s] = acc / total
            acc += _STAGE_WEIGHTS[s]
        self._weight = {s: _STAGE_WEIGHTS[s] / total for s in stages}
        self._callback = callback
        self._should_cancel = should_cancel
        self._last = 0.0

    def check_cancel(self) -> None:
        if self._should_cancel is not None and self._should_cancel():
            raise CanceledError("the job was canceled")

    def stage(self, name: str) -> ProgressFn:
        def report(_stage: str, fraction: float) -> None:
            self.check_cancel()
            overall = self._start[name] + self._weight[name] * min(max(fraction, 0.0), 1.0)
            if overall >= self._last and self._callback is not None:
                self._last = overall
                self._callback(name, overall)

        return report


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
) -> dict:
    """Reconstruct one bundle and write the outputs into ``out_dir``.

    Writes ``mesh.obj``, ``material.mtl``, ``texture_kd.png``, ``mesh.glb`` and
    ``result.json``; with ``evaluate`` also ``quality.json``, and with ``previews``
    the ``previews/`` folder. All geometry is in the input cameras' world frame.

    Returns the content of ``result.json``. Raises :class:`~pipeline.errors.ReconError`
    subclasses: ``InvalidInputError`` for bad input, ``CanceledError`` when
    ``should_cancel()`` turned True, others for stage failures.
    """
    if model not in MODELS:
        raise InvalidInputError(
            f"unknown model {model!r}; choose one of {list(MODELS)}", code="UNKNOWN_MODEL", details={"model": model}
        )
    cfg = config or get_preset(preset, device=device)
    if config is not None and device != "auto":
        cfg = replace(cfg, device=device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    refine_cams = cfg.camera_refine.enabled and len(cfg.camera_refine.level_image_sizes) > 0
    stages = ["read_bundle", "prepare_frames", "reconstruct_geometry"]
    stages += ["refine_cameras", "refuse_geometry"] * refine_cams + ["photo_refine"] * cfg.photo_refine.enabled
    stages += ["bake_texture"] + ["refine", "compare_refined"] * (model == "nvdiffrec") + ["export"]
    stages += ["evaluate"] * evaluate + ["previews"] * previews
    prog = _Progress(stages, progress, should_cancel)
    timings: dict[str, float] = {}

    def run(name: str, fn, *args, **kw):
        prog.check_cancel()
        report = prog.stage(name)
        report(name, 0.0)
        t0 = time.perf_counter()
        value = fn(*args, **kw)
        timings[name] = round(time.perf_counter() - t0, 3)
        report(name, 1.0)
        return value

    from .camera_refine import refine_cameras
    from .export import export_mesh
    from .fusion import reconstruct_geometry
    from .photo_refine import refine_surface
    from .prepare import prepare_frames
    from .rig import torch_device
    from .texture import bake_texture

    t_start = time.perf_counter()
    fs = run("read_bundle", load_bundle, src, limits)
    frames = run("prepare_frames", prepare_frames, fs, cfg, progress=prog.stage("prepare_frames"))
    vertices, faces, geometry_report = run(
        "reconstruct_geometry",
        reconstruct_geometry,
        frames,
        cfg,
        progress=prog.stage("reconstruct_geometry"),
        should_cancel=should_cancel,
    )
    camera_report = None
    if refine_cams:
        frames, camera_report = run("refine_cameras", refine_cameras, vertices, faces, frames, cfg.camera_refine)
        if camera_report.get("applied") and cfg.camera_refine.refuse:
            vertices, faces, geometry_report = run(
                "refuse_geometry",
                reconstruct_geometry,
                frames,
                cfg,
                progress=prog.stage("refuse_geometry"),
                should_cancel=should_cancel,
            )
    photo_report = None
    if cfg.photo_refine.enabled:
        vertices, photo_report = run(
            "photo_refine",
            refine_surface,
            vertices,
            faces,
            frames,
            cfg.photo_refine,
            device=torch_device(cfg.device),
            progress=prog.stage("photo_refine"),
        )
    mesh = run("bake_texture", bake_texture, vertices, faces, frames, cfg.texture, progress=prog.stage("bake_texture"))
    refine_report = None
    warnings: list[str] = []
    if model == "nvdiffrec":
        from .refine import refine_mesh, write_loss_plot

        fused_mesh = mesh
        try:
            mesh, refine_report = run(
                "refine",
                refine_mesh,
                mesh,
                frames,
                cfg.refine,
                device=cfg.device,
                progress=prog.stage("refine"),
                should_cancel=should_cancel,
            )
        except ConvergenceError as e:
            # The fusion mesh stays the output; the failure is reported, not fatal.
            refine_report = {"error": e.to_dict(), "fallback": "fusion"}
            warnings.append(
                f"{e.code}: refinement did not converge ({e.details.get('reason')}); the fusion result is returned"
            )
        if refine_report.get("loss_curve"):
            write_loss_plot(refine_report, out / "loss.png")
            mesh = run("compare_refined", _better_of, fused_mesh, mesh, frames, refine_report, warnings)
    files = run("export", export_mesh, mesh, out)

    result = {
        "recon3d_version": __version__,
        "model": model,
        "preset": cfg.preset,
        "device": cfg.device,
        "views": [v.name for v in frames.views],
        "camera_estimate": frames.camera_estimate,
        "cameras": frames.resolved_views(),
        "depth_encoding": frames.depth_encoding,
        "geometry": geometry_report,
        "camera_refinement": camera_report,
        "photo_refinement": photo_report,
        "mesh": {
            "vertices": int(len(mesh.vertices)),
            "faces": int(len(mesh.faces)),
            "texture_size": int(mesh.texture.shape[0]) if mesh.texture is not None else 0,
        },
        "warnings": list(fs.warnings) + list(frames.warnings) + warnings,
        "timings_s": timings,
        "config": cfg.to_dict(),
        "files": sorted(Path(p).name for p in files.values()),
    }
    if refine_report is not None:
        result["refine"] = refine_report
        if (out / "loss.png").exists():
            result["files"].append("loss.png")

    if evaluate:
        from .metrics import evaluate_views
        from .quality import build_quality_report

        def _evaluate():
            per_view = evaluate_views(mesh, frames)
            return build_quality_report(
                per_view,
                mesh=mesh,
                model=model,
                preset=cfg.preset,
                timings=timings,
                camera_estimate=frames.camera_estimate,
            )

        report = run("evaluate", _evaluate)
        (out / "quality.json").write_text(report.model_dump_json(indent=2))
        result["quality"] = {"status": report.status, "psnr": report.psnr, "ssim": report.ssim}
        result["files"].append("quality.json")

    if previews:
        from .previews import write_previews

        written = run("previews", write_previews, mesh, out, frames)
        result["previews"] = written

    timings["total"] = round(time.perf_counter() - t_start, 3)
    result["timings_s"] = timings
    (out / "result.json").write_text(json.dumps(result, indent=2, default=_json_default))
    return result


def _better_of(fused, refined, frames, report: dict, warnings: list[str]):
    """The refined mesh, unless it is much rougher than the fusion mesh, or scores a lower masked
    PSNR at the input views.

    Rougher: its mean dihedral angle (:func:`pipeline.metrics.mean_dihedral_angle`) is more than
    :data:`ROUGHENING_RATIO` times the fusion mesh's and at least :data:`ROUGHENING_MIN_DEG`
    higher. That is a surface crumpled to fit the input views, which looks wrong from every other
    angle however well it scores at the inputs (Adam's steps did it: sneaker 10 -> 31 degrees,
    spot 15 -> 40; the default uniform steps stay within half a degree).

    Lower PSNR: the refinement fits point-sampled renders, while the quality report area-averages
    its renders like the photos; on a surface that is already close (spot: 32.1 dB), the fit can
    trade one for the other and lose 0.5 dB by the report's measure.

    Records both meshes' values and the choice in ``report`` (``mean_dihedral_deg``,
    ``input_view_psnr``, ``returned``).
    """
    from .metrics import mean_dihedral_angle, mean_masked_psnr

    rough = {"fusion": mean_dihedral_angle(fused.vertices, fused.faces)}
    rough["refined"] = mean_dihedral_angle(refined.vertices, refined.faces)
    report["mean_dihedral_deg"] = {k: round(v, 3) for k, v in rough.items()}
    if (
        rough["refined"] > ROUGHENING_RATIO * rough["fusion"]
        and rough["refined"] - rough["fusion"] >= ROUGHENING_MIN_DEG
    ):
        report["returned"] = "fusion"
        warnings.append(
            f"REFINE_ROUGHENED: refinement crumpled the surface (mean dihedral angle {rough['fusion']:.1f} -> "
            f"{rough['refined']:.1f} degrees); the fusion result is returned"
        )
        return fused
    before, after = mean_masked_psnr(fused, frames), mean_masked_psnr(refined, frames)
    report["input_view_psnr"] = {"fusion": before, "refined": after}
    if before is None or after is None or after >= before:
        report["returned"] = "refined"
        return refined
    report["returned"] = "fusion"
    warnings.append(
        f"REFINE_NO_GAIN: refinement lowered the masked PSNR at the input views "
        f"({before:.2f} -> {after:.2f} dB); the fusion result is returned"
    )
    return fused


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
