"""Preview images of a result: shaded turnaround stills, hidden-line wireframes, a turntable GIF
and a contact sheet of input photo | re-render | difference per input view.

Preview cameras circle the object's bounding sphere at a fixed elevation, world +Y up,
starting in front (+Z) and stepping towards +X. Each image is a plain function of
(mesh, index), so the service can fan previews out as Ray tasks.
"""

from __future__ import annotations

import io
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import maximum_filter

from .camera import Camera, intrinsics_from_fov, look_at, project_points, row_norm
from .frames import PosedFrames, PosedView
from .mesh import TexturedMesh
from .metrics import image_metrics, map_views
from .render import Backend, Rasterization, make_rasterizer, rasterize_many
from .shading import shade_rgb

#: Number of turnaround stills (45-degree steps).
PREVIEW_VIEWS = 8
#: Camera elevation above the object's centre, degrees.
PREVIEW_ELEVATION_DEG = 20.0
#: Horizontal and vertical field of view of preview cameras, degrees.
PREVIEW_FOV_DEG = 35.0
#: The bounding sphere's radius times this fills the frame (a little white border).
PREVIEW_MARGIN = 1.08
#: Headlight shading: colour * (AMBIENT + DIFFUSE * |cos(normal, view ray)|).
AMBIENT = 0.35
DIFFUSE = 0.65
#: Stills are rendered at this many times their size and area-averaged down (anti-aliasing).
SUPERSAMPLE = 2
#: Wireframe line width in output pixels, and colours.
WIREFRAME_LINE_PX = 1.0
WIREFRAME_LINE_RGB = (25, 45, 110)
WIREFRAME_BASE_RGB = (215, 215, 215)
BACKGROUND_RGB = (255, 255, 255)
#: Turntable GIF defaults.
TURNTABLE_FRAMES = 36
TURNTABLE_RESOLUTION = 256
TURNTABLE_FRAME_MS = 80
#: Contact sheet: tile size (longest side, pixels) and the colour difference mapped to the hottest colour.
CONTACT_TILE_PX = 256
DIFF_FULL_SCALE = 0.5
#: Contact-sheet crops extend this fraction of the object's box size beyond it on each side.
CONTACT_PAD_FRACTION = 0.08
#: zlib level of the preview PNGs: level 6 (Pillow's default) took twice as long for 4-8% smaller files.
PNG_COMPRESS_LEVEL = 3
#: Shading normals are averaged across edges flatter than this, kept sharp across steeper ones, degrees.
CREASE_ANGLE_DEG = 45.0
#: Relative tolerance (of the bounding-box diagonal) for welding vertices before smoothing normals.
WELD_TOLERANCE = 1e-6


# ---------------------------------------------------------------- cameras


def bounding_sphere(vertices: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre (3,) float64 (the bounding-box centre) and radius of a sphere holding all (V, 3) vertices."""
    v = np.asarray(vertices, dtype=np.float64)
    if len(v) == 0:
        return np.zeros(3), 1.0
    center = (v.max(0) + v.min(0)) / 2.0
    radius = float(np.linalg.norm(v - center, axis=1).max())
    return center, max(radius, 1e-6)


def preview_camera(
    index: int,
    n: int = PREVIEW_VIEWS,
    *,
    elevation_deg: float = PREVIEW_ELEVATION_DEG,
    resolution: int = 512,
    center,
    radius: float,
    distance: float | None = None,
    fov_deg: float = PREVIEW_FOV_DEG,
) -> Camera:
    """Camera ``index`` of ``n`` evenly spaced around the object (``center`` (3,), bounding ``radius``).

    Azimuth ``index * 360 / n`` degrees from +Z towards +X, ``elevation_deg`` above the
    centre, looking at the centre with world +Y up in the image. ``distance`` from the
    centre defaults to the one at which the bounding sphere (times :data:`PREVIEW_MARGIN`)
    fits the square frame; :func:`fit_distance` gives a tighter one for a given mesh.
    """
    direction = _orbit_directions(n, elevation_deg)[index % n]
    if distance is None:
        distance = radius * PREVIEW_MARGIN / math.sin(math.radians(fov_deg) / 2.0)
    c = np.asarray(center, dtype=np.float64)
    eye = c + distance * direction
    return Camera(
        K=intrinsics_from_fov(fov_deg, resolution, resolution),
        cam_to_world=look_at(eye, c, (0.0, 1.0, 0.0)),
        width=resolution,
        height=resolution,
        name=f"preview_{index:02d}",
    )


def _orbit_directions(n: int, elevation_deg: float) -> np.ndarray:
    """(n, 3) unit directions from the centre to the preview cameras."""
    az = 2.0 * np.pi * np.arange(n) / n
    el = math.radians(elevation_deg)
    return np.stack([np.sin(az) * math.cos(el), np.full(n, math.sin(el)), np.cos(az) * math.cos(el)], axis=-1)


def fit_distance(
    vertices: np.ndarray,
    center,
    n: int = PREVIEW_VIEWS,
    *,
    elevation_deg: float = PREVIEW_ELEVATION_DEG,
    fov_deg: float = PREVIEW_FOV_DEG,
) -> float:
    """The smallest camera distance at which every (V, 3) vertex stays inside all ``n`` orbit views.

    One distance for the whole orbit keeps the scale constant from view to view. With
    camera axes (x, y) and the direction ``d`` from the centre to the camera, a point
    ``p`` (relative to the centre) fits when ``D >= p.d + max(|p.x|, |p.y|) / t``,
    ``t = tan(fov / 2) / PREVIEW_MARGIN``.
    """
    p = np.asarray(vertices, dtype=np.float64) - np.asarray(center, dtype=np.float64)
    if len(p) == 0:
        return 1.0
    t = math.tan(math.radians(fov_deg) / 2.0) / PREVIEW_MARGIN
    best = 0.0
    for d in _orbit_directions(n, elevation_deg):
        R = look_at(d, (0.0, 0.0, 0.0), (0.0, 1.0, 0.0))[:3, :3]
        pc = p @ R  # columns: camera x (right), y (down), z (forward = -d)
        need = -pc[:, 2] + np.maximum(np.abs(pc[:, 0]), np.abs(pc[:, 1])) / t
        best = max(best, float(need.max()))
    return max(best, 1e-6)


def _orbit(mesh: TexturedMesh, n: int, elevation_deg: float) -> dict:
    """preview_camera keyword arguments shared by all views of one orbit."""
    center, radius = bounding_sphere(mesh.vertices)
    distance = fit_distance(mesh.vertices, center, n, elevation_deg=elevation_deg)
    return {"center": center, "radius": radius, "distance": distance, "elevation_deg": elevation_deg}


def _camera_for(mesh: TexturedMesh, index: int, n: int, resolution: int, elevation_deg: float) -> Camera:
    return preview_camera(index, n, resolution=resolution, **_orbit(mesh, n, elevation_deg))


# ---------------------------------------------------------------- shading


def corner_normals(vertices: np.ndarray, faces: np.ndarray, *, crease_deg: float = CREASE_ANGLE_DEG) -> np.ndarray:
    """(F, 3, 3) float32 unit normals at each face corner, smooth across soft edges and sharp across creases.

    A corner averages the area-weighted normals of the faces around its vertex (vertices
    at the same position count as one, so UV seams stay invisible) whose normal is within
    ``crease_deg`` of its own face's: a cube keeps flat faces, a sphere looks smooth.
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if len(v) == 0 or len(f) == 0:
        return np.zeros((len(f), 3, 3), np.float32)
    tol = WELD_TOLERANCE * max(float(np.linalg.norm(v.max(0) - v.min(0))), 1e-12)
    _, weld = np.unique(np.round(v / tol).astype(np.int64), axis=0, return_inverse=True)
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])  # length = 2 * area
    fu = fn / np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-300)
    corner_vertex = weld.ravel()[f].ravel()  # (3F,) welded vertex of each corner
    corner_face = np.repeat(np.arange(len(f)), 3)
    # All (corner, corner) pairs sharing a welded vertex: sum of valence^2 pairs, a few per corner.
    order = np.argsort(corner_vertex, kind="stable")
    _, start, count = np.unique(corner_vertex[order], return_index=True, return_counts=True)
    group_of = np.repeat(np.arange(len(start)), count)  # group of each sorted corner
    n_per = count[group_of]
    i = np.repeat(order, n_per)
    offsets = np.arange(n_per.sum()) - np.repeat(np.cumsum(n_per) - n_per, n_per)
    j = order[np.repeat(start[group_of], n_per) + offsets]
    fi, fj = corner_face[i], corner_face[j]
    keep = (fu[fi] * fu[fj]).sum(-1) >= math.cos(math.radians(crease_deg))
    acc = np.zeros((3 * len(f), 3))
    np.add.at(acc, i[keep], fn[fj[keep]])
    acc /= np.maximum(np.linalg.norm(acc, axis=1, keepdims=True), 1e-300)
    return acc.reshape(-1, 3, 3).astype(np.float32)


def headlight(rast: Rasterization, cam: Camera, normals: np.ndarray) -> np.ndarray:
    """(H, W) float32 shading factor AMBIENT + DIFFUSE * |cos| between the surface normal and the optical axis (0 off the mesh).

    A directional light along the viewing axis: with narrow preview lenses it is
    indistinguishable from a point light at the camera and needs no per-pixel rays.
    ``normals`` : (F, 3, 3) float unit corner normals (:func:`corner_normals`); |cos| lights both
    sides of open surfaces.
    """
    corner_index = np.arange(3 * len(normals)).reshape(-1, 3)
    n = rast.interpolate(np.asarray(normals, np.float32).reshape(-1, 3), corner_index)
    n /= np.maximum(row_norm(n), 1e-12)[..., None]
    forward = cam.cam_to_world[:3, 2].astype(np.float32)
    cos = np.abs(n @ forward)
    return np.where(rast.mask, AMBIENT + DIFFUSE * cos, 0.0).astype(np.float32)


def edge_distance_px(
    rast: Rasterization, cam: Camera, vertices: np.ndarray, faces: np.ndarray, *, offset: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """(H, W) float32: distance in pixels from each pixel centre to the nearest edge of its visible triangle.

    Only the triangle that is visible at a pixel is considered, so edges hidden behind
    other surfaces are never near any pixel: this is the hidden-line removal. Background is +inf.
    ``offset``: (row, column) of ``rast``'s first pixel in ``cam``'s image, when it is a crop.
    """
    H, W = rast.tri_id.shape
    out = np.full((H, W), np.inf, np.float32)
    m = rast.mask
    if not m.any():
        return out
    uv, _ = project_points(cam.K, cam.world_to_cam, np.asarray(vertices, dtype=np.float64))
    ii, jj = np.nonzero(m)
    p = np.stack([jj + offset[1] + 0.5, ii + offset[0] + 0.5], axis=-1)
    corners = np.asarray(faces, dtype=np.int64)[rast.tri_id[m]]  # (M, 3)
    best = np.full(len(p), np.inf)
    for k in range(3):
        # One edge's endpoints at a time: no (M, 3, 2) array of every corner.
        a, b = uv[corners[:, k]], uv[corners[:, (k + 1) % 3]]
        e = b - a
        length = row_norm(e)
        cross = np.abs(e[:, 0] * (p[:, 1] - a[:, 1]) - e[:, 1] * (p[:, 0] - a[:, 0]))
        # A pixel lies inside its triangle, so the distance to the edge's line is the distance to the edge.
        d = np.where(length > 1e-9, cross / np.maximum(length, 1e-9), row_norm(p - a))
        best = np.minimum(best, d)
    out[m] = best
    return out


def _shrink(img: np.ndarray, factor: int) -> np.ndarray:
    """Area-average an (H, W, C) float image by an integer factor."""
    if factor == 1:
        return img
    H, W, C = img.shape
    blocks = img.reshape(H // factor, factor, W // factor, factor, C)
    # `blocks.mean(axis=(1, 3))` written out, summing in its order (bit-identical), ~4x faster.
    acc = blocks[:, 0, :, 0]
    for i in range(factor):
        for j in range(factor):
            if i or j:
                acc = acc + blocks[:, i, :, j]
    return acc / np.asarray(factor * factor, dtype=acc.dtype)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _preview_images(
    mesh: TexturedMesh,
    cam: Camera,
    rasterizer,
    normals: np.ndarray,
    *,
    supersample: int,
    line_px: float,
    textured: bool = True,
    wireframe: bool = True,
    rast: Rasterization | None = None,
) -> dict[str, np.ndarray]:
    """Render ``cam`` once at ``supersample`` times its size; return ``textured`` and/or ``wireframe`` uint8 images.

    ``rast``: that render, when the caller already has it (:func:`pipeline.render.rasterize_many`).
    """
    s = max(int(supersample), 1)
    big = cam.scaled(cam.width * s, cam.height * s)
    rast = rast if rast is not None else rasterizer.rasterize(big)
    reach = 2 * math.ceil(s * line_px / 2.0) + 1  # the wireframe's dilation of silhouette lines, pixels
    kinds = [k for k, on in (("textured", textured), ("wireframe", wireframe)) if on]
    out = {k: np.empty((cam.height, cam.width, 3), np.uint8) for k in kinds}
    for img in out.values():
        img[:] = np.asarray(BACKGROUND_RGB, np.uint8)
    # Shade only the mesh's box: every image is exactly the background farther out (a bg-coloured
    # block averages to bg, and lines reach at most `reach` pixels past the silhouette).
    box = _block_box(rast.mask, reach + s, s)
    if box is None:
        return out
    crop = Rasterization(rast.tri_id[box], rast.bary[box], rast.depth[box])
    shade = headlight(crop, big, normals)[..., None]
    bg = np.asarray(BACKGROUND_RGB, np.float32)
    small = tuple(slice(b.start // s, b.stop // s) for b in box)
    if textured:
        col = shade_rgb(mesh, crop).astype(np.float32)
        img = np.where(crop.mask[..., None], col * shade, bg)
        out["textured"][small] = _to_uint8(_shrink(img, s))
    if wireframe:
        base = np.where(crop.mask[..., None], np.asarray(WIREFRAME_BASE_RGB, np.float32) * shade, bg)
        offset = (box[0].start, box[1].start)
        d = edge_distance_px(crop, big, mesh.vertices, mesh.faces, offset=offset) / s  # output pixels
        alpha = np.clip(line_px / 2.0 + 0.5 - d, 0.0, 1.0)  # one pixel of soft falloff
        # Silhouette edges have no triangle outside them: extend lines half a width into the background.
        alpha = np.where(crop.mask, alpha, maximum_filter(alpha, size=reach))[..., None]
        img = base * (1.0 - alpha) + np.asarray(WIREFRAME_LINE_RGB, np.float32) * alpha
        out["wireframe"][small] = _to_uint8(_shrink(img, s))
    return out


def _block_box(mask: np.ndarray, margin: int, s: int) -> tuple[slice, slice] | None:
    """The box of an (H, W) bool mask grown by ``margin``, widened to whole s x s blocks (H, W multiples of s)."""
    from .masks import mask_box

    box = mask_box(mask, margin)
    if box is None:
        return None
    return tuple(slice(b.start // s * s, -(-b.stop // s) * s) for b in box)


def preview_images(
    mesh: TexturedMesh,
    index: int,
    *,
    n: int = PREVIEW_VIEWS,
    resolution: int = 512,
    elevation_deg: float = PREVIEW_ELEVATION_DEG,
    supersample: int = SUPERSAMPLE,
    line_px: float = WIREFRAME_LINE_PX,
    kinds: tuple[str, ...] = ("textured", "wireframe"),
    rasterizer=None,
    normals: np.ndarray | None = None,
    backend: Backend = "auto",
) -> dict[str, np.ndarray]:
    """Preview camera ``index`` of ``n`` (:func:`preview_camera`) rendered once; returns each of ``kinds``
    (``textured``: :func:`render_preview`, ``wireframe``: :func:`render_wireframe`), (resolution, resolution, 3) uint8.

    ``rasterizer`` (:func:`pipeline.render.make_rasterizer` of the mesh) and ``normals``
    (:func:`corner_normals`) are built when not given; callers rendering many views pass them.
    """
    cam = _camera_for(mesh, index, n, resolution, elevation_deg)
    r = rasterizer if rasterizer is not None else make_rasterizer(mesh.vertices, mesh.faces, backend=backend)
    normals = normals if normals is not None else corner_normals(mesh.vertices, mesh.faces)
    return _preview_images(
        mesh, cam, r, normals, supersample=supersample, line_px=line_px,
        textured="textured" in kinds, wireframe="wireframe" in kinds,
    )  # fmt: skip


def render_preview(
    mesh: TexturedMesh,
    index: int,
    *,
    n: int = PREVIEW_VIEWS,
    resolution: int = 512,
    elevation_deg: float = PREVIEW_ELEVATION_DEG,
    supersample: int = SUPERSAMPLE,
    backend: Backend = "auto",
) -> np.ndarray:
    """(resolution, resolution, 3) uint8: the textured mesh with headlight shading, seen by :func:`preview_camera`."""
    return preview_images(
        mesh, index, n=n, resolution=resolution, elevation_deg=elevation_deg, supersample=supersample,
        kinds=("textured",), backend=backend,
    )["textured"]  # fmt: skip


def render_wireframe(
    mesh: TexturedMesh,
    index: int,
    *,
    n: int = PREVIEW_VIEWS,
    resolution: int = 512,
    elevation_deg: float = PREVIEW_ELEVATION_DEG,
    supersample: int = SUPERSAMPLE,
    line_px: float = WIREFRAME_LINE_PX,
    backend: Backend = "auto",
) -> np.ndarray:
    """(resolution, resolution, 3) uint8: visible triangle edges drawn over a grey shaded render.

    Hidden lines are removed: an edge is drawn only where it borders the triangle visible at a pixel.
    """
    return preview_images(
        mesh, index, n=n, resolution=resolution, elevation_deg=elevation_deg, supersample=supersample,
        line_px=line_px, kinds=("wireframe",), backend=backend,
    )["wireframe"]  # fmt: skip


def png_bytes(img: np.ndarray | Image.Image) -> bytes:
    """PNG file content of an (H, W, 3) uint8 image at :data:`PNG_COMPRESS_LEVEL`."""
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(
        buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )
    return buf.getvalue()


# ---------------------------------------------------------------- files


def turntable_gif(
    mesh: TexturedMesh,
    frames: int = TURNTABLE_FRAMES,
    *,
    resolution: int = TURNTABLE_RESOLUTION,
    elevation_deg: float = PREVIEW_ELEVATION_DEG,
    frame_ms: int = TURNTABLE_FRAME_MS,
    rasterizer=None,
    normals: np.ndarray | None = None,
    backend: Backend = "auto",
) -> bytes:
    """A looping GIF of ``frames`` shaded views, one full turn around +Y (file content).

    Every frame is cast in one render pass (:func:`pipeline.render.rasterize_many`, two halves of
    the turn at once); frames are shaded and reduced to their palette two at a time (Pillow's own adaptive palette, the
    conversion its GIF writer would make, so the file is the same).
    """
    r = rasterizer if rasterizer is not None else make_rasterizer(mesh.vertices, mesh.faces, backend=backend)
    normals = normals if normals is not None else corner_normals(mesh.vertices, mesh.faces)
    orbit = _orbit(mesh, frames, elevation_deg)
    cams = [preview_camera(i, frames, resolution=resolution, **orbit) for i in range(frames)]
    # One render pass for every frame, its two halves at once.
    halves = [cams[: frames // 2], cams[frames // 2 :]]
    rasts = [rast for half in map_views(lambda cs: rasterize_many(r, cs), halves, r) for rast in half]

    def frame(i: int) -> Image.Image:
        img = _preview_images(
            mesh, cams[i], r, normals, supersample=1, line_px=WIREFRAME_LINE_PX, wireframe=False, rast=rasts[i]
        )
        return Image.fromarray(img["textured"]).convert("P", palette=Image.Palette.ADAPTIVE)

    images = map_views(frame, list(range(frames)), r)
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0, disposal=1)
    return buf.getvalue()


def write_turntable_gif(
    mesh: TexturedMesh,
    path: str | Path,
    frames: int = TURNTABLE_FRAMES,
    *,
    resolution: int = TURNTABLE_RESOLUTION,
    elevation_deg: float = PREVIEW_ELEVATION_DEG,
    frame_ms: int = TURNTABLE_FRAME_MS,
    backend: Backend = "auto",
) -> Path:
    """Write :func:`turntable_gif` to ``path``. Returns the path."""
    data = turntable_gif(
        mesh, frames, resolution=resolution, elevation_deg=elevation_deg, frame_ms=frame_ms, backend=backend
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def diff_heatmap(pred_rgb: np.ndarray, ref_rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 heat map of the mean absolute colour difference inside ``mask`` (black outside).

    Black (0) -> red -> yellow -> white (:data:`DIFF_FULL_SCALE` of the colour range or more).
    """
    d = np.abs(pred_rgb.astype(np.float32) - ref_rgb.astype(np.float32)).mean(-1) / 255.0
    t = np.clip(d / DIFF_FULL_SCALE, 0.0, 1.0) * np.asarray(mask, bool)
    stops = np.array([[0, 0, 0], [200, 20, 20], [255, 200, 0], [255, 255, 255]], np.float32)
    x = t * (len(stops) - 1)
    k = np.minimum(x.astype(np.int64), len(stops) - 2)
    f = (x - k)[..., None]
    return _to_uint8(stops[k] * (1 - f) + stops[k + 1] * f)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _crop_box(view: PosedView, vertices: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) working-resolution pixels around the input mask and the projected mesh, padded."""
    cam = view.depth_camera
    boxes = []
    ys, xs = np.nonzero(view.mask)
    if len(xs):
        boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    if len(vertices):
        uv, z = project_points(cam.K, cam.world_to_cam, np.asarray(vertices, dtype=np.float64))
        uv = uv[z > 0]
        if len(uv):
            boxes.append((*uv.min(0), *uv.max(0)))
    if not boxes:
        return 0, 0, cam.width, cam.height
    b = np.array(boxes, dtype=np.float64)
    x0, y0, x1, y1 = b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()
    pad = CONTACT_PAD_FRACTION * max(x1 - x0, y1 - y0)
    x0, y0 = max(int(math.floor(x0 - pad)), 0), max(int(math.floor(y0 - pad)), 0)
    x1, y1 = min(int(math.ceil(x1 + pad)), cam.width), min(int(math.ceil(y1 + pad)), cam.height)
    if x1 <= x0 or y1 <= y0:
        return 0, 0, cam.width, cam.height
    return x0, y0, x1, y1


def crop_camera(cam: Camera, x0: int, y0: int, x1: int, y1: int) -> Camera:
    """The camera that sees only the pixel box [x0, x1) x [y0, y1) of ``cam``."""
    K = cam.K.copy()
    K[0, 2] -= x0
    K[1, 2] -= y0
    return replace(cam, K=K, width=int(x1 - x0), height=int(y1 - y0))


def contact_tiles(
    mesh: TexturedMesh, view: PosedView, rasterizer, *, tile: int = CONTACT_TILE_PX, supersample: int = SUPERSAMPLE
) -> dict[str, np.ndarray]:
    """Input photo, re-render and difference heat map of one view, cropped to the object.

    Returns ``ref``, ``pred``, ``diff`` (h, w, 3) uint8 with max(h, w) == ``tile``, and the
    masks ``ref_mask``, ``pred_mask`` (h, w) bool. The render is anti-aliased like the photo.
    """
    x0, y0, x1, y1 = _crop_box(view, mesh.vertices)
    scale = tile / max(x1 - x0, y1 - y0)
    w, h = max(round((x1 - x0) * scale), 1), max(round((y1 - y0) * scale), 1)
    s = max(int(supersample), 1)
    cam = crop_camera(view.depth_camera, x0, y0, x1, y1).scaled(w * s, h * s)
    rast = rasterizer.rasterize(cam)
    pred = _to_uint8(_shrink(shade_rgb(mesh, rast).astype(np.float32), s))
    pred_mask = _shrink(rast.mask[..., None].astype(np.float32), s)[..., 0] >= 0.5
    # The photo may be larger than the working resolution: crop the same box at its scale.
    fx, fy = view.rgb.shape[1] / view.depth_camera.width, view.rgb.shape[0] / view.depth_camera.height
    ref = np.asarray(
        Image.fromarray(view.rgb).resize((w, h), Image.Resampling.BOX, box=(x0 * fx, y0 * fy, x1 * fx, y1 * fy))
    )
    ref_mask = (
        np.asarray(
            Image.fromarray(np.asarray(view.mask, np.uint8) * 255).resize(
                (w, h), Image.Resampling.NEAREST, box=(x0, y0, x1, y1)
            )
        )
        > 0
    )
    return {
        "ref": ref,
        "pred": pred,
        "diff": diff_heatmap(pred, ref, ref_mask | pred_mask),
        "ref_mask": ref_mask,
        "pred_mask": pred_mask,
    }


def contact_sheet(
    mesh: TexturedMesh,
    frames: PosedFrames,
    *,
    per_view: list[dict] | None = None,
    tile: int = CONTACT_TILE_PX,
    rasterizer=None,
    backend: Backend = "auto",
) -> Image.Image:
    """One row per input view: input photo | re-render | |difference| heat map, cropped to the object and labelled.

    Labels carry each view's masked PSNR / SSIM: from ``per_view`` (the report's numbers,
    matched by name) when given, else computed on the tiles themselves.
    """
    r = rasterizer if rasterizer is not None else make_rasterizer(mesh.vertices, mesh.faces, backend=backend)
    metrics_by_name = {m["name"]: m for m in per_view or []}
    rows = []
    for view, t in zip(
        frames.views, map_views(lambda v: contact_tiles(mesh, v, r, tile=tile), frames.views, r), strict=True
    ):
        m = metrics_by_name.get(view.name)
        note = ""
        if m is None:
            m = image_metrics(t["pred"], t["pred_mask"], t["ref"], t["ref_mask"])
            note = " (on the tile)"
        psnr, ssim = m.get("psnr"), m.get("ssim")
        label = f"{view.name}: PSNR {psnr:.1f} dB, SSIM {ssim:.3f}{note}" if psnr is not None else f"{view.name}: empty"
        rows.append((label, [t["ref"], t["pred"], t["diff"]]))

    font = _font(14)
    label_h, gap = 22, 4
    header = ["input", "re-render", "|difference|"]
    w_tile = max(t.shape[1] for _, ts in rows for t in ts)
    h_tile = max(t.shape[0] for _, ts in rows for t in ts)
    W = 3 * w_tile + 4 * gap
    H = label_h + len(rows) * (label_h + h_tile + gap) + gap
    sheet = Image.new("RGB", (W, H), (240, 240, 240))
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(header):
        draw.text((gap + c * (w_tile + gap) + 4, 4), name, fill=(0, 0, 0), font=font)
    y = label_h
    for label, tiles in rows:
        draw.text((gap + 4, y + 3), label, fill=(0, 0, 0), font=font)
        y += label_h
        for c, t in enumerate(tiles):
            # Centre tiles of a different aspect in their cell.
            sheet.paste(
                Image.fromarray(t),
                (gap + c * (w_tile + gap) + (w_tile - t.shape[1]) // 2, y + (h_tile - t.shape[0]) // 2),
            )
        y += h_tile + gap
    return sheet


def write_contact_sheet(
    mesh: TexturedMesh,
    frames: PosedFrames,
    path: str | Path,
    *,
    per_view: list[dict] | None = None,
    tile: int = CONTACT_TILE_PX,
    backend: Backend = "auto",
) -> Path:
    """Write :func:`contact_sheet` as a PNG to ``path``. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(contact_sheet(mesh, frames, per_view=per_view, tile=tile, backend=backend)))
    return path


def write_previews(
    mesh: TexturedMesh,
    out_dir: str | Path,
    frames: PosedFrames | None = None,
    *,
    n: int = PREVIEW_VIEWS,
    resolution: int = 512,
    gif_frames: int = TURNTABLE_FRAMES,
    per_view: list[dict] | None = None,
    backend: Backend = "auto",
) -> dict[str, list[str]]:
    """Write ``previews/`` under ``out_dir``; returns file paths relative to ``out_dir`` by kind.

    Kinds: ``textured`` (textured_XX.png), ``wireframe`` (wireframe_XX.png), ``turntable``
    (turntable.gif) and, with ``frames``, ``contact_sheet`` (contact_sheet.png).
    """
    out_dir = Path(out_dir)
    folder = out_dir / "previews"
    folder.mkdir(parents=True, exist_ok=True)
    r = make_rasterizer(mesh.vertices, mesh.faces, backend=backend)
    normals = corner_normals(mesh.vertices, mesh.faces)
    orbit = _orbit(mesh, n, PREVIEW_ELEVATION_DEG)
    written: dict[str, list[str]] = {"textured": [], "wireframe": []}

    def still(i: int) -> dict[str, str]:
        cam = preview_camera(i, n, resolution=resolution, **orbit)
        imgs = _preview_images(mesh, cam, r, normals, supersample=SUPERSAMPLE, line_px=WIREFRAME_LINE_PX)
        paths = {}
        for kind in ("textured", "wireframe"):
            p = folder / f"{kind}_{i:02d}.png"
            Image.fromarray(imgs[kind]).save(p, compress_level=PNG_COMPRESS_LEVEL)
            paths[kind] = str(p.relative_to(out_dir))
        return paths

    for paths in map_views(still, list(range(n)), r):
        for kind, p in paths.items():
            written[kind].append(p)
    gif = write_turntable_gif(mesh, folder / "turntable.gif", gif_frames, backend=backend)
    written["turntable"] = [str(gif.relative_to(out_dir))]
    if frames is not None:
        sheet = write_contact_sheet(mesh, frames, folder / "contact_sheet.png", per_view=per_view, backend=backend)
        written["contact_sheet"] = [str(sheet.relative_to(out_dir))]
    return written
