"""Refinement by differentiable rendering on a tiny synthetic scene (CPU backend)."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import pipeline.refine as refine_mod
from pipeline.camera import default_rig
from pipeline.config import REFINE_PRESETS, RefineConfig
from pipeline.errors import CanceledError, ConvergenceError, ModelOOMError, ReconstructionFailedError
from pipeline.frames import PosedFrames, PosedView
from pipeline.mesh import TexturedMesh
from pipeline.metrics import evaluate_views, mean_dihedral_angle
from pipeline.refine import check_loss_health, has_converged, refine_depth_weight, refine_mesh, write_loss_plot
from pipeline.render import cuda_available, make_rasterizer
from pipeline.reports import RefineReport
from pipeline.shading import shade_rgb
from pipeline.synthetic import checker_texture, make_shape

WORK = 64  # working (depth) resolution of the synthetic views, pixels

TINY = RefineConfig(
    iterations=40,
    resolution=WORK,
    time_budget_s=120.0,
    convergence_tol=-1.0,  # never stop early: the test wants the full curve
    convergence_window=10,
    visibility_interval=4,
    lr_final_fraction=1.0,  # constant steps: 40 iterations leave no room for a decay
    lr_vertices=3e-3,  # the sphere's 6% scale error is a global move, and 40 steps are few
)


def _textured_sphere() -> TexturedMesh:
    m = make_shape("sphere")
    v = m.vertices.astype(np.float64)
    d = v / np.linalg.norm(v, axis=1, keepdims=True)
    uvs = 0.5 + 0.45 * d[:, :2]  # planar: front and back share the pattern
    return TexturedMesh(m.vertices, m.faces, uvs.astype(np.float32), checker_texture(64, tiles=4))


def _frames(gt: TexturedMesh) -> PosedFrames:
    cams = default_rig(2 * WORK, 2 * WORK)
    r = make_rasterizer(gt.vertices, gt.faces, backend="embree")
    views = []
    for name, cam in cams.items():
        dcam = cam.scaled(WORK, WORK)
        d = r.rasterize(dcam)
        views.append(
            PosedView(
                name=name,
                rgb=shade_rgb(gt, r.rasterize(cam)),
                camera=cam,
                depth=d.depth,
                mask=d.mask,
                depth_camera=dcam,
            )
        )
    return PosedFrames(views=views)


def _degraded(gt: TexturedMesh) -> TexturedMesh:
    tex = ndimage.gaussian_filter(gt.texture.astype(np.float32), sigma=(3, 3, 0)) * 0.85 + 20
    return replace(gt, vertices=(gt.vertices * 1.06).astype(np.float32), texture=np.clip(tex, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def scene():
    gt = _textured_sphere()
    return gt, _frames(gt), _degraded(gt)


def _masked_psnr(mesh, frames) -> float:
    return float(np.mean([v["psnr"] for v in evaluate_views(mesh, frames, backend="embree")]))


def test_refinement_reduces_loss_and_raises_psnr(scene):
    gt, frames, start = scene
    stages = []
    out, rep = refine_mesh(start, frames, TINY, device="cpu", progress=lambda s, f: stages.append((s, f)))
    curve = rep["loss_curve"]
    assert rep["iterations"] == len(curve) == TINY.iterations and rep["stop_reason"] == "iterations"
    assert np.mean(curve[-5:]) < 0.6 * np.mean(curve[:5])
    assert set(rep["terms"]) == {"photometric", "mask", "depth", "laplacian"}
    assert rep["backend"] == "embree" and rep["device"] == "cpu"
    # Same topology, UVs and frame; the sphere shrank back towards its true size.
    np.testing.assert_array_equal(out.faces, start.faces)
    np.testing.assert_array_equal(out.uvs, start.uvs)
    assert out.texture.dtype == np.uint8 and out.texture.shape == start.texture.shape
    r_true, r_start, r_out = (np.linalg.norm(m.vertices, axis=1).mean() for m in (gt, start, out))
    assert abs(r_out - r_true) < 0.5 * abs(r_start - r_true)
    assert _masked_psnr(out, frames) > _masked_psnr(start, frames) + 2.0
    fr = [f for _, f in stages]
    assert stages[0][0] == "refine" and fr == sorted(fr) and fr[-1] == 1.0
    assert isinstance(rep, RefineReport)
    assert json.loads(json.dumps(rep.to_dict())) == rep.to_dict()  # its JSON form is plain JSON


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU with nvdiffrast")
def test_refinement_on_cuda_matches_the_cpu_result(scene):
    """The same refinement on nvdiffrast: it converges like the CPU path and lands on a similar surface."""
    gt, frames, start = scene
    cpu, _ = refine_mesh(start, frames, TINY, device="cpu")
    out, rep = refine_mesh(start, frames, TINY, device="cuda")
    assert rep["backend"] == "nvdiffrast" and rep["device"].startswith("cuda")
    curve = rep["loss_curve"]
    assert np.mean(curve[-5:]) < 0.6 * np.mean(curve[:5])
    r_true, r_start, r_out = (np.linalg.norm(m.vertices, axis=1).mean() for m in (gt, start, out))
    assert abs(r_out - r_true) < 0.5 * abs(r_start - r_true)
    assert abs(_masked_psnr(out, frames) - _masked_psnr(cpu, frames)) < 1.5


def test_coarse_pass_runs_first_and_hands_over(scene):
    """A coarse pass at half the size starts the main pass; progress spans both, once, in order."""
    gt, frames, start = scene
    cfg = replace(TINY, iterations=20, coarse_resolution=WORK // 2, coarse_iterations=20, coarse_lr_vertices=3e-4)
    stages = []
    out, rep = refine_mesh(start, frames, cfg, device="cpu", progress=lambda s, f: stages.append(f))
    assert rep["coarse_pass"]["resolution"] == WORK // 2 and rep["coarse_pass"]["iterations"] == 20
    assert rep["resolution"] == WORK and rep["iterations"] == 20
    assert rep["time_s"] >= rep["coarse_pass"]["time_s"]
    assert stages == sorted(stages) and stages[-1] == 1.0 and 0.0 < stages[0] < 0.5
    assert _masked_psnr(out, frames) > _masked_psnr(start, frames) + 1.0
    # No coarse pass when it would not be coarser than the main one.
    _, rep2 = refine_mesh(start, frames, replace(cfg, coarse_resolution=WORK), device="cpu")
    assert "coarse_pass" not in rep2


def test_convergence_stops_early(scene):
    _, frames, start = scene
    cfg = replace(TINY, iterations=60, convergence_tol=0.2, convergence_window=4)
    _, rep = refine_mesh(start, frames, cfg, device="cpu")
    assert rep["stop_reason"] == "converged" and rep["iterations"] < 60


def test_time_budget_stops_the_loop(scene):
    _, frames, start = scene
    _, rep = refine_mesh(start, frames, replace(TINY, time_budget_s=0.0), device="cpu")
    assert rep["stop_reason"] == "time_budget" and rep["iterations"] == 0


def test_exploding_steps_raise_convergence_error(scene):
    _, frames, start = scene
    cfg = replace(TINY, lr_vertices=0.5, lr_texture=0.0, smoothing_steps=0, iterations=60, convergence_window=3)
    with pytest.raises(ConvergenceError) as ei:
        refine_mesh(start, frames, cfg, device="cpu")
    e = ei.value
    assert e.code == "MODEL_CONVERGENCE_FAILED" and e.details["reason"] in ("nan", "diverged")
    assert e.details["loss_tail"] and json.dumps(e.details)
    assert pickle.loads(pickle.dumps(e)).details == e.details


def test_nan_raises_convergence_error(scene):
    _, frames, start = scene
    v = start.vertices.copy()
    v[0] = np.nan
    with pytest.raises(ConvergenceError) as ei:
        refine_mesh(replace(start, vertices=v), frames, replace(TINY, iterations=5), device="cpu")
    assert ei.value.details["reason"] == "nan" and ei.value.details["iteration"] == 0


def test_loss_health_and_convergence_rules():
    assert check_loss_health([1.0, 0.9, float("nan")], 2) == "nan"
    assert check_loss_health([1.0, 0.9, float("inf")], 2) == "nan"
    assert check_loss_health([1.0, 1.0, 2.0, 2.0], 2) == "diverged"
    assert check_loss_health([1.0, 0.9, 0.8, 0.7], 2) is None
    assert has_converged([1.0, 1.0, 0.9999, 0.9999], 2, 1e-3)
    assert not has_converged([1.0, 1.0, 0.5, 0.5], 2, 1e-3)
    assert not has_converged([1.0], 2, 1e-3)


def test_depth_term_weight_follows_how_the_encoding_was_resolved():
    cfg = RefineConfig(depth_weight=10.0, estimated_depth_weight=0.5)
    fitted = PosedFrames(views=[], depth_encoding={"method": "hull_fit", "source": "estimated"})
    stated = PosedFrames(views=[], depth_encoding={"method": "given", "source": "transforms.json"})
    default = PosedFrames(views=[], depth_encoding={"method": "default"})
    assert refine_depth_weight(fitted, cfg) == 0.5
    assert refine_depth_weight(stated, cfg) == 10.0
    assert refine_depth_weight(default, cfg) == 10.0


def test_cancel_raises(scene):
    _, frames, start = scene
    with pytest.raises(CanceledError):
        refine_mesh(start, frames, TINY, device="cpu", should_cancel=lambda: True)


def test_untextured_mesh_is_rejected(scene):
    _, frames, start = scene
    with pytest.raises(ReconstructionFailedError, match="MODEL_FAILED"):
        refine_mesh(replace(start, texture=None), frames, TINY, device="cpu")


def test_out_of_memory_retries_once_at_half_resolution(scene, monkeypatch):
    _, frames, start = scene
    real = refine_mod._refine
    seen = []

    def oom_at_full(mesh, frames_, cfg, dev, progress, should_cancel, *, oom_retry):
        seen.append(cfg.resolution)
        if cfg.resolution == TINY.resolution:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(mesh, frames_, replace(cfg, iterations=2), dev, progress, should_cancel, oom_retry=oom_retry)

    monkeypatch.setattr(refine_mod, "_refine", oom_at_full)
    _, rep = refine_mesh(start, frames, TINY, device="cpu")
    assert seen == [WORK, WORK // 2] and rep["oom_retry"] and rep["resolution"] == WORK // 2

    def always_oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(refine_mod, "_refine", always_oom)
    with pytest.raises(ModelOOMError) as ei:
        refine_mesh(start, frames, replace(TINY, resolution=256), device="cpu")
    assert ei.value.code == "MODEL_OOM" and ei.value.details["retry_resolution"] == 128


def test_loss_plot_writes_png(tmp_path):
    rep = {"loss_curve": [1.0, 0.5, 0.3, 0.25], "terms": {"photometric": [0.5, 0.3, 0.2, 0.2]}, "backend": "embree"}
    write_loss_plot(rep, tmp_path / "loss.png")
    refine_mod._write_loss_plot_pil(rep["loss_curve"], tmp_path / "loss_pil.png")
    for name in ("loss.png", "loss_pil.png"):
        img = Image.open(tmp_path / name)
        assert img.size[0] >= 300 and np.asarray(img.convert("L")).min() < 128  # something was drawn


def test_presets_are_ordered():
    f, b, q = (REFINE_PRESETS[k] for k in ("fast", "balanced", "quality"))
    assert f.iterations < b.iterations < q.iterations
    assert f.resolution < b.resolution < q.resolution
    assert f.time_budget_s <= 180.0


def test_uv_seam_copies_move_together(scene):
    _, frames, start = scene
    # Split every vertex of the upper half's faces into a copy, as a UV atlas does along its seams.
    f = start.faces.copy()
    upper = start.vertices[f].mean(axis=1)[:, 1] > 0
    copies = np.unique(f[upper])
    remap = np.arange(len(start.vertices))
    remap[copies] = len(start.vertices) + np.arange(len(copies))
    f[upper] = remap[f[upper]]
    split = replace(
        start,
        vertices=np.concatenate([start.vertices, start.vertices[copies]]),
        faces=f.astype(np.int32),
        uvs=np.concatenate([start.uvs, start.uvs[copies]]),
    )
    out, _ = refine_mesh(split, frames, replace(TINY, iterations=10), device="cpu")
    np.testing.assert_array_equal(out.vertices[copies], out.vertices[len(start.vertices) :])
    assert np.abs(out.vertices - split.vertices).max() > 0  # it did move


def test_structural_term_matches_the_metric_ssim_and_has_gradients():
    from skimage.metrics import structural_similarity

    from pipeline.refine import ssim_map_torch, structural_loss

    rng = np.random.default_rng(0)
    a = rng.random((40, 48, 3))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    _, ref = structural_similarity(
        a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True
    )
    ours = ssim_map_torch(torch.tensor(a, dtype=torch.float32)[None], torch.tensor(b, dtype=torch.float32)[None])[0]
    r = 6  # the window radius: borders are padded differently
    assert np.abs(ours.numpy()[r:-r, r:-r] - ref.mean(-1)[r:-r, r:-r]).max() < 1e-4

    # The loss is computed in each view's region box and is zero for identical images.
    x = torch.tensor(np.stack([a, b]), dtype=torch.float32, requires_grad=True)
    region = torch.zeros((2, 40, 48), dtype=torch.bool)
    region[0, 5:20, 10:30] = True
    region[1, 20:35, 2:12] = True
    assert float(structural_loss(x.detach(), x.detach(), region)) == pytest.approx(0.0, abs=1e-4)
    loss = structural_loss(x, torch.tensor(np.stack([b, a]), dtype=torch.float32), region)
    loss.backward()
    assert float(loss.detach()) > 0 and x.grad.abs().sum() > 0
    assert x.grad[1, :5].abs().max() == 0  # far outside view 1's region box


def test_a_stall_settles_at_the_final_rate_before_stopping(scene):
    """Convergence with the step still large runs one window at the final rate, then stops."""
    _, frames, start = scene
    cfg = replace(TINY, iterations=200, convergence_tol=0.5, convergence_window=4, lr_final_fraction=0.1)
    _, rep = refine_mesh(start, frames, cfg, device="cpu")
    assert rep["stop_reason"] == "converged"
    k = rep["settled_from_iteration"]
    assert k is not None and rep["iterations"] == k + cfg.convergence_window
    # Near the end of the schedule a stall stops at once.
    _, rep2 = refine_mesh(start, frames, replace(cfg, lr_final_fraction=1.0), device="cpu")
    assert rep2["stop_reason"] == "converged" and rep2["settled_from_iteration"] is None


def test_the_better_of_fusion_and_refined_is_returned_by_the_reports_measure(scene):
    from pipeline.metrics import mean_masked_psnr
    from pipeline.models import better_of

    gt, frames, worse = scene
    # The same number quality.json reports: the mean of evaluate_views' masked PSNR.
    assert mean_masked_psnr(gt, frames) == pytest.approx(np.mean([v["psnr"] for v in evaluate_views(gt, frames)]))
    report, warnings = RefineReport(), []
    assert better_of(worse, gt, frames, report, warnings) is gt
    assert report["returned"] == "refined" and not warnings
    report, warnings = RefineReport(), []
    assert better_of(gt, worse, frames, report, warnings) is gt
    assert report["returned"] == "fusion" and warnings[0].startswith("REFINE_NO_GAIN")
    assert report["input_view_psnr"]["fusion"] > report["input_view_psnr"]["refined"] + 3.0


def test_a_crumpled_refinement_is_not_returned_however_well_it_scores(scene):
    from pipeline.metrics import mean_masked_psnr
    from pipeline.models import better_of

    gt, frames, worse = scene
    # The true texture on a surface jittered along its normals by 1% of the radius: it scores far
    # higher than the degraded start at the input views, but is crumpled.
    n = gt.vertices / np.linalg.norm(gt.vertices, axis=1, keepdims=True)
    jitter = np.random.default_rng(0).normal(0.0, 0.01, (len(n), 1))
    crumpled = replace(gt, vertices=(gt.vertices * (1.0 + jitter)).astype(np.float32))
    assert mean_masked_psnr(crumpled, frames) > mean_masked_psnr(worse, frames) + 3.0
    report, warnings = RefineReport(), []
    assert better_of(worse, crumpled, frames, report, warnings) is worse
    assert report["returned"] == "fusion" and warnings[0].startswith("REFINE_ROUGHENED")
    rough = report["mean_dihedral_deg"]
    assert rough["refined"] > 1.5 * rough["fusion"] and rough["refined"] > rough["fusion"] + 5.0


def test_refinement_keeps_a_smooth_surface_smooth(scene):
    """Where the geometry is already right, the photos constrain most vertices weakly. Adam moves
    each of those as far as the best-constrained one, and crumples the sphere; the default
    optimiser (UniformAdam) moves them in proportion to their gradients."""
    gt, frames, start = scene
    start = replace(start, vertices=gt.vertices)  # true geometry, degraded texture
    rough0 = mean_dihedral_angle(start.vertices, start.faces)
    rough = {}
    for optimizer in ("uniform_adam", "adam"):
        out, _ = refine_mesh(start, frames, replace(TINY, optimizer=optimizer, lr_vertices=3e-4), device="cpu")
        rough[optimizer] = mean_dihedral_angle(out.vertices, out.faces)
        if optimizer == "uniform_adam":
            assert _masked_psnr(out, frames) > _masked_psnr(start, frames) + 2.0
    assert RefineConfig().optimizer == "uniform_adam"
    assert rough["uniform_adam"] < rough0 + 1.5
    assert rough["adam"] > rough["uniform_adam"] + 2.0, rough


def test_smooth_parametrisation_makes_the_global_move_and_stays_smooth(scene):
    """The sphere's 6% scale error is a global move. Optimising offsets directly, uniform steps move
    the strongly pulled silhouette vertices first and roughen the sphere on the way; through
    (I + lambda L)^-1 every step is a smooth field, and the radius comes back."""
    gt, frames, start = scene
    r_true = np.linalg.norm(gt.vertices, axis=1).mean()
    err, rough = {}, {}
    for lam in (0.0, 100.0):
        cfg = replace(TINY, lr_vertices=1e-3, smoothing_steps=0, vertex_smoothness=lam)
        out, _ = refine_mesh(start, frames, cfg, device="cpu")
        err[lam] = abs(np.linalg.norm(out.vertices, axis=1).mean() - r_true)
        rough[lam] = mean_dihedral_angle(out.vertices, out.faces)
    r_err0 = abs(np.linalg.norm(start.vertices, axis=1).mean() - r_true)
    assert err[100.0] < 0.2 * r_err0 and err[100.0] < 0.5 * err[0.0], (r_err0, err)
    assert rough[100.0] < mean_dihedral_angle(start.vertices, start.faces) + 0.5 < rough[0.0], rough


def _cap_facing(gt: TexturedMesh, frames: PosedFrames, name: str) -> np.ndarray:
    """(V,) bool: the sphere's vertices that face view ``name`` head-on (the side views see them edge-on)."""
    cam = next(v.depth_camera for v in frames.views if v.name == name)
    to_cam = np.asarray(cam.center, dtype=np.float64) / np.linalg.norm(cam.center)
    n = gt.vertices / np.linalg.norm(gt.vertices, axis=1, keepdims=True)
    return n @ to_cam > 0.85


def test_a_refinement_that_loses_at_the_held_out_view_is_not_returned(scene):
    """Better at the views it trained on, worse at the one held out: the fusion mesh is returned.
    Judged at the input views (no view held out), the same refinement would have been returned."""
    from pipeline.models import better_of

    gt, frames, _ = scene
    held = frames.views[0].name
    # "fusion": the true surface with a slightly tinted texture (a little off at every view).
    fused = replace(gt, texture=np.clip(gt.texture.astype(np.int16) + 25, 0, 255).astype(np.uint8))
    # "refined": exact, except that the cap facing the held-out view reads one wrong texel.
    uvs = gt.uvs.copy()
    uvs[_cap_facing(gt, frames, held)] = (0.01, 0.01)
    refined = replace(gt, uvs=uvs)
    report, warnings = RefineReport(), []
    assert better_of(fused, refined, frames, report, warnings, held_out=[held]) is fused
    assert report["returned"] == "fusion" and report["selected_by"] == "held_out_views"
    assert report["held_out_views"] == [held]
    assert report["held_out_psnr"]["fusion"] > report["held_out_psnr"]["refined"]
    assert report["input_view_psnr"]["refined"] > report["input_view_psnr"]["fusion"]  # the training views
    assert warnings[0].startswith("REFINE_NO_GAIN") and "held-out views" in warnings[0]
    report, warnings = RefineReport(), []
    assert better_of(fused, refined, frames, report, warnings) is refined  # what input views alone would pick
    assert report["selected_by"] == "input_views" and report["held_out_psnr"] is None
    # And one that also wins at the held-out view is returned.
    report, warnings = RefineReport(), []
    assert better_of(fused, gt, frames, report, warnings, held_out=[held]) is gt
    assert report["returned"] == "refined" and not warnings


def test_held_out_views_are_split_from_training_and_the_refinement_never_sees_them(scene, monkeypatch, tmp_path):
    import pipeline.models as models
    from pipeline.config import ReconstructConfig
    from pipeline.reconstruct import ModelOutput
    from pipeline.refine_selection import choose_held_out_views, shared_surface_fraction, split_frames

    gt, frames, worse = scene
    shared = shared_surface_fraction(worse, frames)
    assert shared.shape == (len(frames.views),) and ((shared >= 0) & (shared <= 1)).all()
    held = choose_held_out_views(worse, frames, 1)
    assert held == [frames.views[int(np.argmax(shared))].name]
    assert choose_held_out_views(worse, frames, 0) == []
    assert choose_held_out_views(worse, replace(frames, views=frames.views[:2]), 1) == []  # too few to spare one
    train, judge = split_frames(frames, held)
    assert [v.name for v in judge.views] == held and len(train.views) == len(frames.views) - 1
    assert held[0] not in {v.name for v in train.views}

    seen = {}

    def fake_refine(mesh, frames_in, cfg, **kw):
        seen["views"] = [v.name for v in frames_in.views]
        return gt, {"loss_curve": [1.0, 0.5], "terms": {}}

    class Stages:
        out_dir = tmp_path

        def run(self, name, fn, *a, **k):
            return fn(*a, **k)

        def progress(self, name):
            return None

        should_cancel = None

    monkeypatch.setattr(models, "fusion_model", lambda stages, fr, cfg: ModelOutput(mesh=worse, frames=fr))
    monkeypatch.setattr(refine_mod, "refine_mesh", fake_refine)
    out = models.nvdiffrec_model(Stages(), frames, ReconstructConfig(preset="fast"))
    assert seen["views"] == [v.name for v in train.views]
    assert out.reports["refine"]["held_out_views"] == held
    np.testing.assert_array_equal(out.mesh.vertices, gt.vertices)  # the refined surface, its texture refitted
