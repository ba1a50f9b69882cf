"""The pipeline functions of the registered models (:mod:`pipeline.registry`).

Each takes ``(stages, frames, cfg)`` and returns a :class:`~pipeline.reconstruct.ModelOutput`:

* :func:`fusion_model` — ``reconstruct_geometry -> [refine_cameras -> refuse_geometry] -> [photo_refine]
  -> bake_texture``;
* :func:`nvdiffrec_model` — the fusion stages, then ``refine`` (on all views but the held-out ones)
  ``-> compare_refined`` (at the held-out views).

``stages.run(name, fn, ...)`` times a named stage, reports its progress and polls cancellation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ReconstructConfig
from .errors import ConvergenceError, ReconstructionFailedError
from .frames import PosedFrames
from .reconstruct import ModelOutput
from .reports import RefineReport

if TYPE_CHECKING:
    from .reconstruct import StageRunner

#: The refined mesh is returned only if its mean dihedral angle stays within this multiple of the fusion mesh's ...
ROUGHENING_RATIO = 1.5
#: ... or within this many degrees of it.
ROUGHENING_MIN_DEG = 5.0


def fusion_model(stages: StageRunner, frames: PosedFrames, cfg: ReconstructConfig) -> ModelOutput:
    """Depth fusion (with optional camera and photo-consistency refinement), then texture baking."""
    from .camera_refine import refine_cameras
    from .device import torch_device
    from .fusion import reconstruct_geometry
    from .photo_refine import refine_surface
    from .texture import bake_texture

    def fuse(name: str):
        return stages.run(
            name, reconstruct_geometry, frames, cfg, progress=stages.progress(name), should_cancel=stages.should_cancel
        )

    out = ModelOutput(mesh=None, frames=frames)
    vertices, faces, out.reports["geometry"] = fuse("reconstruct_geometry")
    out.reports["camera_refinement"] = None
    if stages.enabled("refine_cameras"):
        frames, camera_report = stages.run("refine_cameras", refine_cameras, vertices, faces, frames, cfg.camera_refine)
        out.frames, out.reports["camera_refinement"] = frames, camera_report
        if camera_report.applied and cfg.camera_refine.refuse:
            vertices, faces, out.reports["geometry"] = fuse("refuse_geometry")
    out.reports["photo_refinement"] = None
    if stages.enabled("photo_refine"):
        vertices, out.reports["photo_refinement"] = stages.run(
            "photo_refine",
            refine_surface,
            vertices,
            faces,
            frames,
            cfg.photo_refine,
            device=torch_device(cfg.device),
            progress=stages.progress("photo_refine"),
        )
    out.mesh = stages.run(
        "bake_texture", bake_texture, vertices, faces, frames, cfg.texture, progress=stages.progress("bake_texture")
    )
    return out


def nvdiffrec_model(stages: StageRunner, frames: PosedFrames, cfg: ReconstructConfig) -> ModelOutput:
    """The fusion model's mesh refined by differentiable rendering on all input views but
    ``cfg.refine.held_out_views``; the better of the two at the held-out views is returned."""
    from .refine import refine_mesh, write_loss_plot
    from .refine_selection import choose_held_out_views, split_frames

    out = fusion_model(stages, frames, cfg)
    fused = out.mesh
    held_out = choose_held_out_views(fused, out.frames, cfg.refine.held_out_views)
    training, _ = split_frames(out.frames, held_out)
    try:
        refined, report = stages.run(
            "refine",
            refine_mesh,
            fused,
            training,
            cfg.refine,
            device=cfg.device,
            progress=stages.progress("refine"),
            should_cancel=stages.should_cancel,
        )
    except ConvergenceError as e:
        # The fusion mesh stays the output; the failure is reported, not fatal.
        out.reports["refine"] = RefineReport(error=e.to_dict(), fallback="fusion")
        out.warnings.append(
            f"{e.code}: refinement did not converge ({e.details.get('reason')}); the fusion result is returned"
        )
        return out
    report = RefineReport.coerce(report)
    out.reports["refine"] = report
    if report.loss_curve:
        write_loss_plot(report, stages.out_dir / "loss.png")
        out.files.append("loss.png")
        out.mesh = stages.run(
            "compare_refined", compare_refined, fused, refined, out.frames, report, out.warnings,
            held_out=held_out, texture=cfg.texture,
        )  # fmt: skip
    else:
        out.mesh = refined
    return out


def compare_refined(
    fused, refined, frames, report: RefineReport, warnings: list[str], *, held_out: list[str] | tuple, texture
):
    """The fusion or the refined mesh, judged fairly at the ``held_out`` views (:func:`better_of`):
    both surfaces with their textures re-baked from the training views alone
    (:func:`pipeline.texture.rebake_texture`, TextureConfig ``texture``).

    Neither texture as it stands is fair there. The fusion texture was baked from every view, the
    held-out ones included, and re-renders their photos however wrong its surface is (on the mug
    30.0 dB at the held-out view, 18.9 dB baked without it); the refinement starts from that texture
    and keeps much of those photos (27.8 dB). Baked alike from the same views, the candidates
    differ only in their surfaces. (Refining from the training-view bake instead, and judging against
    it, made the refined texture itself fair, but then it lacks the held-out photos: 0.02-0.31 dB less at
    the orbit views of three validation objects.)

    Returned: ``fused`` (its full bake) when it wins; else ``refined`` with its optimised texture
    fitted by least squares to every view (:func:`pipeline.texture.refit_texture`), the held-out
    ones included. With no view held out, the input views judge the meshes as they are.
    """
    from .refine_selection import split_frames
    from .texture import rebake_texture, refit_texture

    training, judges = split_frames(frames, list(held_out))
    if not (judges.views and training.views):
        return better_of(fused, refined, frames, report, warnings)
    try:
        judged = (rebake_texture(fused, training, texture), rebake_texture(refined, training, texture))
    except ReconstructionFailedError as e:  # the training views see none of a surface: no fair judge
        report.returned = "fusion"
        warnings.append(f"REFINE_NO_GAIN: the refinement could not be judged ({e}); the fusion result is returned")
        return fused
    chosen = better_of(*judged, frames, report, warnings, held_out=held_out)
    return refit_texture(refined, frames, texture) if chosen is judged[1] else fused


def better_of(fused, refined, frames, report: RefineReport, warnings: list[str], *, held_out: list[str] | tuple = ()):
    """The refined mesh, unless it is much rougher than the fusion mesh, or scores a lower masked
    PSNR at the views that judge it: the ``held_out`` views (names; the refinement did not train
    on them), or every input view when none is held out.

    Rougher: its mean dihedral angle (:func:`pipeline.metrics.mean_dihedral_angle`) is more than
    :data:`ROUGHENING_RATIO` times the fusion mesh's and at least :data:`ROUGHENING_MIN_DEG`
    higher. That is a surface crumpled to fit the input views, which looks wrong from every other
    angle however well it scores at the inputs (Adam's steps did it: sneaker 10 -> 31 degrees,
    spot 15 -> 40; the default uniform steps stay within half a degree).

    Lower PSNR at held-out views: the refinement fitted the other views at their expense (on
    unseen objects it gained 0.8 dB at the inputs and 0.09 dB elsewhere). Without held-out views
    the input views judge: the refinement fits point-sampled renders, while the quality report
    area-averages its renders like the photos, and on a close surface (spot: 32.1 dB) the fit can
    trade one for the other.

    Records in ``report``: ``mean_dihedral_deg``, ``input_view_psnr`` (at the views it trained on),
    ``held_out_views`` (names), ``held_out_psnr`` (``{fusion, refined}``, or None when no view was
    held out), ``selected_by`` (``"held_out_views"`` or ``"input_views"``) and ``returned``.
    """
    from .metrics import mean_dihedral_angle, mean_masked_psnr
    from .refine_selection import split_frames

    rough = {"fusion": mean_dihedral_angle(fused.vertices, fused.faces)}
    rough["refined"] = mean_dihedral_angle(refined.vertices, refined.faces)
    report.mean_dihedral_deg = {k: round(v, 3) for k, v in rough.items()}
    training, judges = split_frames(frames, list(held_out))
    report.held_out_views = [v.name for v in judges.views]
    report.selected_by = "held_out_views" if judges.views else "input_views"
    report.held_out_psnr = None
    if (
        rough["refined"] > ROUGHENING_RATIO * rough["fusion"]
        and rough["refined"] - rough["fusion"] >= ROUGHENING_MIN_DEG
    ):
        report.returned = "fusion"
        warnings.append(
            f"REFINE_ROUGHENED: refinement crumpled the surface (mean dihedral angle {rough['fusion']:.1f} -> "
            f"{rough['refined']:.1f} degrees); the fusion result is returned"
        )
        return fused
    report.input_view_psnr = {
        "fusion": mean_masked_psnr(fused, training),
        "refined": mean_masked_psnr(refined, training),
    }
    if judges.views:
        report.held_out_psnr = {
            "fusion": mean_masked_psnr(fused, judges),
            "refined": mean_masked_psnr(refined, judges),
        }
        before, after, where = report.held_out_psnr["fusion"], report.held_out_psnr["refined"], "held-out views"
        better = before is None or (after is not None and after > before)
    else:
        before, after, where = report.input_view_psnr["fusion"], report.input_view_psnr["refined"], "input views"
        better = before is None or after is None or after >= before
    if better:
        report.returned = "refined"
        return refined
    report.returned = "fusion"
    warnings.append(
        f"REFINE_NO_GAIN: refinement lowered the masked PSNR at the {where} "
        f"({before:.2f} -> {after:.2f} dB); the fusion result is returned"
    )
    return fused
