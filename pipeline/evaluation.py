"""The one evaluation path: a reconstruction result + its resolved config -> quality.json, previews, contact sheet.

:func:`evaluate_result` runs it in one process (the CLI, inside ``reconstruct_bundle``). The
service runs the same parts as Ray tasks (``serve_app/fanout.py``), one per view and one per
preview camera, and assembles them with the same functions:

    published_mesh, frames_for_result
                       ┬─ view_metrics(i) ... ──> quality_document ──> quality.json
                       └──────────────────────────> contact_sheet_png ──> previews/contact_sheet.png
    preview_pngs(i) ... , turntable_gif         ──> previews/

Both read the frames with the config the model resolved (``result.config``: preset plus
overrides) and the cameras it resolved (``result.cameras``), so the metrics see the model's
working resolution; no preset is resolved again. Every part returns file contents keyed by
their path relative to the output folder; the caller writes them (to disk or to a store).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import ReconstructConfig
from .frames import PosedFrames
from .mesh import TexturedMesh
from .result import QualitySummary, ReconstructionResult

QUALITY_FILE = "quality.json"
#: Files of a model's output that the mesh loader needs.
MESH_FILES = ("mesh.obj", "material.mtl", "texture_kd.png")
PREVIEWS_DIR = "previews"
#: Resolution of the per-index preview PNGs, pixels.
PREVIEW_RESOLUTION = 512
#: Preview cameras around the object (textured + wireframe PNG each).
PREVIEW_VIEWS = 8


@dataclass
class EvaluationOutput:
    files: dict[str, bytes] = field(default_factory=dict)
    """Relative path -> content of every file made (quality.json, previews/...)."""
    quality: QualitySummary | None = None
    error: dict | None = None
    """The quality report's error ({code, message}) when its status is failure."""
    warnings: list[str] = field(default_factory=list)


def published_mesh(read: Callable[[str], bytes]) -> TexturedMesh:
    """The mesh as the run published it (``read(name)`` gives each of :data:`MESH_FILES`; the
    material and texture may be absent (KeyError / FileNotFoundError) for a vertex-coloured mesh).

    Evaluation scores the delivered files, not the in-memory mesh: an OBJ keeps 7 significant
    digits, which moves depth errors in the 8th; reading it back keeps the CLI and the service
    on the same numbers.
    """
    from .export import load_mesh

    with tempfile.TemporaryDirectory(prefix="recon3d-mesh-") as tmp:
        for name in MESH_FILES:
            try:
                data = read(name)
            except (KeyError, FileNotFoundError):
                if name == MESH_FILES[0]:
                    raise
                continue
            (Path(tmp) / name).write_bytes(data)
        return load_mesh(Path(tmp) / "mesh.obj")


def evaluation_config(result: ReconstructionResult) -> ReconstructConfig:
    """The run's resolved config, on the CPU (evaluation never needs the model's GPU)."""
    return replace(result.resolved_config(), device="cpu")


def frames_for_result(src, result: ReconstructionResult, cfg: ReconstructConfig | None = None) -> PosedFrames:
    """The bundle's frames prepared exactly as the run did (its config, cameras and depth encodings)."""
    from .bundle import load_bundle
    from .prepare import prepare_frames

    return prepare_frames(load_bundle(src), cfg or evaluation_config(result), resolved=result.cameras)


def view_metrics(mesh: TexturedMesh, frames: PosedFrames, index: int, *, rasterizer=None) -> dict:
    """Metrics of view ``index`` (:func:`pipeline.metrics.evaluate_view`, depth clipped like the encoding).

    One render of the view at the working resolution gives PSNR, SSIM, depth error and IoU.
    ``rasterizer``: the mesh's (:func:`mesh_rasterizer`), when the caller scores several views.
    """
    return views_metrics(mesh, frames, [index], rasterizer=rasterizer)[0]


def views_metrics(
    mesh: TexturedMesh, frames: PosedFrames, indices: list[int] | None = None, *, rasterizer=None
) -> list[dict]:
    """:func:`view_metrics` of each of ``indices`` (default: every view), two at a time on the CPU."""
    from .metrics import METRICS_SUPERSAMPLE, evaluate_with, map_views, saturated_depth

    r = rasterizer if rasterizer is not None else mesh_rasterizer(mesh)
    far = saturated_depth(frames)
    views = [frames.views[i] for i in (range(len(frames.views)) if indices is None else indices)]
    return map_views(lambda v: evaluate_with(mesh, v, r, METRICS_SUPERSAMPLE, far), views, r)


def mesh_rasterizer(mesh: TexturedMesh):
    """The rasterizer every render of ``mesh`` in one process shares (embree builds its BVH once)."""
    from .render import make_rasterizer

    return make_rasterizer(mesh.vertices, mesh.faces)


def quality_document(
    per_view: list[dict],
    failed_views: list[dict],
    mesh: TexturedMesh,
    frames: PosedFrames,
    result: ReconstructionResult,
) -> tuple[dict, EvaluationOutput]:
    """quality.json's content (the report plus ``failed_views``) and its summary."""
    import json

    from .quality import build_quality_report

    report = build_quality_report(
        per_view,
        mesh=mesh,
        model=result.model,
        preset=result.preset,
        timings=dict(result.timings_s),
        camera_estimate=result.camera_estimate or frames.camera_estimate,  # the run's, not the re-read's
    )
    doc = json.loads(report.model_dump_json())
    doc["failed_views"] = failed_views
    out = EvaluationOutput(
        quality=QualitySummary(
            status=report.status, psnr=report.psnr, ssim=report.ssim, failed_views=[f["view"] for f in failed_views]
        )
    )
    if report.error is not None:
        out.error = {"code": report.error.code, "message": report.error.message}
    return doc, out


def quality_json(doc: dict) -> bytes:
    import json

    return json.dumps(doc, indent=2).encode()


@dataclass
class PreviewRenderer:
    """The mesh with what all its preview renders share in one process: rasterizer and shading normals."""

    mesh: TexturedMesh
    rasterizer: object = None
    normals: object = None

    def __post_init__(self):
        from .previews import corner_normals

        if self.rasterizer is None:
            self.rasterizer = mesh_rasterizer(self.mesh)
        if self.normals is None:
            self.normals = corner_normals(self.mesh.vertices, self.mesh.faces)


def preview_pngs(
    mesh: TexturedMesh, index: int, n: int, *, renderer: PreviewRenderer | None = None
) -> dict[str, bytes]:
    """``previews/textured_XX.png`` and ``previews/wireframe_XX.png`` of preview camera ``index`` of ``n``, from one render."""
    return previews_pngs(mesh, [index], n, renderer=renderer)


def previews_pngs(
    mesh: TexturedMesh, indices: list[int], n: int, *, renderer: PreviewRenderer | None = None
) -> dict[str, bytes]:
    """:func:`preview_pngs` of each of ``indices``, two at a time on the CPU."""
    from .metrics import map_views
    from .previews import png_bytes, preview_images

    rr = renderer or PreviewRenderer(mesh)

    def one(i: int) -> dict[str, bytes]:
        images = preview_images(
            mesh, i, n=n, resolution=PREVIEW_RESOLUTION, rasterizer=rr.rasterizer, normals=rr.normals
        )
        return {f"{PREVIEWS_DIR}/{kind}_{i:02d}.png": png_bytes(images[kind]) for kind in ("textured", "wireframe")}

    files: dict[str, bytes] = {}
    for f in map_views(one, list(indices), rr.rasterizer):
        files.update(f)
    return files


def turntable_gif(mesh: TexturedMesh, *, renderer: PreviewRenderer | None = None) -> dict[str, bytes]:
    """``previews/turntable.gif``."""
    from .previews import turntable_gif as gif

    rr = renderer or PreviewRenderer(mesh)
    return {f"{PREVIEWS_DIR}/turntable.gif": gif(mesh, rasterizer=rr.rasterizer, normals=rr.normals)}


def contact_sheet_png(
    mesh: TexturedMesh, frames: PosedFrames, per_view: list[dict] | None, *, rasterizer=None
) -> dict[str, bytes]:
    """``previews/contact_sheet.png``, labelled with the report's per-view metrics."""
    from .previews import contact_sheet, png_bytes

    r = rasterizer if rasterizer is not None else mesh_rasterizer(mesh)
    return {
        f"{PREVIEWS_DIR}/contact_sheet.png": png_bytes(contact_sheet(mesh, frames, per_view=per_view, rasterizer=r))
    }


def _no_stage(_name, fn, *args, **kw):
    return fn(*args, **kw)


def evaluate_result(
    mesh: TexturedMesh,
    frames: PosedFrames,
    result: ReconstructionResult,
    *,
    quality: bool = True,
    previews: bool = True,
    n_previews: int = PREVIEW_VIEWS,
    run=_no_stage,
) -> EvaluationOutput:
    """Every part in this process: per-view metrics -> quality.json, preview cameras, turntable, contact sheet.

    ``run(stage, fn, *args)`` wraps the two stages (``evaluate``, ``previews``); the reconstruction
    runner passes its own to time them and report progress. One rasterizer serves every render.
    """
    out = EvaluationOutput()
    per_view: list[dict] = []
    rasterizer = mesh_rasterizer(mesh)
    if quality:
        per_view, out = run("evaluate", _quality_part, mesh, frames, result, rasterizer)
    if previews:
        out.files.update(run("previews", _previews_part, mesh, frames, per_view, n_previews, rasterizer))
    return out


def _quality_part(mesh, frames, result, rasterizer) -> tuple[list[dict], EvaluationOutput]:
    per_view = views_metrics(mesh, frames, rasterizer=rasterizer)
    doc, out = quality_document(per_view, [], mesh, frames, result)
    out.files[QUALITY_FILE] = quality_json(doc)
    return per_view, out


def _previews_part(mesh, frames, per_view, n, rasterizer) -> dict[str, bytes]:
    renderer = PreviewRenderer(mesh, rasterizer)
    files = previews_pngs(mesh, list(range(n)), n, renderer=renderer)
    files.update(turntable_gif(mesh, renderer=renderer))
    files.update(contact_sheet_png(mesh, frames, per_view or None, rasterizer=rasterizer))
    return files


def preview_index(files: dict[str, bytes] | list[str]) -> dict[str, list[str]]:
    """Preview paths by kind (textured, wireframe, turntable, contact_sheet), as result.json lists them."""
    out: dict[str, list[str]] = {}
    for rel in sorted(files):
        if rel.startswith(PREVIEWS_DIR + "/"):
            name = rel.split("/", 1)[1]
            kind = name.rsplit(".", 1)[0].rstrip("0123456789").rstrip("_")
            out.setdefault(kind, []).append(rel)
    return out


def write_files(files: dict[str, bytes], out_dir: str | Path) -> list[str]:
    """Write ``files`` under ``out_dir``; returns their relative paths, sorted."""
    out_dir = Path(out_dir)
    for rel, data in files.items():
        p = out_dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return sorted(files)
