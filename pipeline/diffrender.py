"""Differentiable rendering of a UV-textured mesh: gradients reach vertex positions and texels.

One interface, two backends, both returning a :class:`DiffRender` for a batch of
cameras of one size:

- ``nvdiffrast`` (CUDA): rasterize -> interpolate -> texture -> antialias. The
  antialiased coverage carries silhouette gradients.
- ``embree`` (CPU): exact visibility (the triangle id per pixel centre) comes from
  :class:`pipeline.render.EmbreeRasterizer` and has no gradient. It is refreshed by
  :meth:`CpuDiffRenderer.update_visibility` every few steps, because the mesh moves
  little between steps. Each step recomputes, in torch, the barycentrics of every
  covered pixel centre from the *projected* vertices of its triangle (so gradients
  reach the vertices), interpolates UVs perspective-correctly and samples the
  texture bilinearly with ``grid_sample`` (so gradients reach the texels).

Both backends take ``sample_offsets``: sub-pixel sample positions whose mean is the
pixel's colour. The refinement passes the quality report's 2 x 2 positions, so it fits
the image the report measures (:func:`pipeline.shading.shade_rgb_antialiased`): fitted to
pixel centres alone, a texture finer than the pixels is free between them, and the
report's render shows that as speckle. On the CPU the samples stay in the face that
covers the pixel centre, and outline pixels keep their centre sample (their samples would
run off the face; an antialiased outline needs coverage the CPU path does not have);
nvdiffrast rasterises and antialiases once per sample.

Silhouette gradients on CPU: a hard coverage has none, so the renderer also returns
*contour samples*: points on the mesh's visible silhouette edges (edges between a
front- and a back-facing face, found at each visibility refresh and kept only where
they lie on the rendered mask's boundary), as differentiable pixel positions.
:func:`silhouette_loss` looks the target mask's signed distance up at those points;
summed with each sample's edge length, it approximates the area between the two
silhouettes, the same quantity the CUDA path's squared coverage error measures.
We chose this over blurring the coverage because a blur only has gradients within
its radius and smears the colour term, while the distance lookup pulls an edge
that is several pixels off straight to the target outline.

UV atlases split vertices along their seams. Callers that move vertices must move the
copies together (``pipeline.refine`` optimises welded positions, see :func:`pipeline.mesh.weld_vertices`),
and the CPU renderer finds outline edges on the welded surface so a seam never reads as
an open boundary.

Conventions (docs/conventions.md): cameras in OpenCV axes, pixel centres at +0.5,
image row 0 at the top, UV v = 0 at the texture's bottom row, texture row 0 at the top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .camera import Camera, pixel_rays
from .masks import mask_box
from .mesh import edge_adjacency
from .render import EmbreeRasterizer, clip_space, cuda_available

DiffBackend = Literal["auto", "embree", "nvdiffrast"]

#: Contour samples per pixel of silhouette-edge length (CPU backend).
CONTOUR_SAMPLES_PER_PX = 1.0
#: A contour sample is kept when the rendered mask is empty this far outside it and covered this far inside, pixels.
CONTOUR_PROBE_PX = 1.0
#: Screen-space triangle area (pixels squared) below which a pixel's barycentrics are not trusted.
MIN_SCREEN_AREA_PX2 = 1e-10
#: Scale of the pseudo-Huber penalty on contour distances, pixels.
CONTOUR_HUBER_PX = 1.0
#: CPU visibility refreshes cast rays only within the previous silhouette's box grown by this, pixels.
VISIBILITY_BOX_MARGIN_PX = 8


@dataclass
class DiffRender:
    """A differentiable render of C views of size (H, W); torch tensors on the renderer's device.

    Attributes
    ----------
    rgb : (C, H, W, 3) float, colour in [0, 1] composited over a white background
    coverage : (C, H, W) float, antialiased coverage on CUDA, hard 0/1 (no gradient) on CPU
    depth : (C, H, W) float, z-depth along the optical axis, scene units, 0 on background
    mask : (C, H, W) bool, pixel centres covered by the mesh
    contour_xy : (M, 2) float or None, CPU only: pixel positions of visible silhouette samples
    contour_view : (M,) long or None, the view of each contour sample
    contour_len : (M,) float or None, edge length each sample stands for, pixels
    pixels : (N,) long or None, CPU only: the covered pixels' rows in the (C * H * W) frame
    pixel_depth : (N,) float or None, CPU only: ``depth`` at those pixels (losses over covered
        pixels need not touch the whole frame)
    """

    rgb: torch.Tensor
    coverage: torch.Tensor
    depth: torch.Tensor
    mask: torch.Tensor
    contour_xy: torch.Tensor | None = None
    contour_view: torch.Tensor | None = None
    contour_len: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    pixel_depth: torch.Tensor | None = None


def _camera_tensors(cameras: list[Camera], dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, 3, 3) K and (C, 4, 4) world_to_cam of a camera list."""
    K = torch.as_tensor(np.stack([c.K for c in cameras]), dtype=dtype, device=device)
    w2c = torch.as_tensor(np.stack([c.world_to_cam for c in cameras]), dtype=dtype, device=device)
    return K, w2c


def project_flat(
    vertices: torch.Tensor, K: torch.Tensor, w2c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project (V, 3) world vertices into C cameras ((C, 3, 3) K, (C, 4, 4) world_to_cam).

    Returns pixel x, pixel y (pixel centres at +0.5) and z-depth along each optical axis, each a
    contiguous (C * V,) tensor, camera-major.
    """
    pc = torch.einsum("cij,vj->civ", w2c[:, :3, :3], vertices) + w2c[:, :3, 3, None]  # (C, 3, V)
    z = pc[:, 2]
    zs = z.clamp(min=1e-9)
    x = K[:, 0, 0, None] * pc[:, 0] / zs + K[:, 0, 1, None] * pc[:, 1] / zs + K[:, 0, 2, None]
    y = K[:, 1, 1, None] * pc[:, 1] / zs + K[:, 1, 2, None]
    return x.reshape(-1), y.reshape(-1), z.reshape(-1)


def sample_texture_torch(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Differentiable bilinear lookup, the same convention as :func:`pipeline.shading.sample_texture`.

    Parameters
    ----------
    texture : (T, S, C) float, row 0 at the top
    uv : (N, 2) float, v = 0 at the bottom row; coordinates outside [0, 1] wrap (glTF's
        default repeat, as the numpy sampler does), and the border texels clamp inside

    Returns
    -------
    (N, C) float
    """
    return sample_texture_grid_channels(texture, texture_grid(uv)).T


def texture_grid(uv: torch.Tensor) -> torch.Tensor:
    """(1, 1, N, 2) ``grid_sample`` coordinates of (N, 2) UVs (wrapped as :func:`sample_texture_torch` does).

    One grid serves every texture layer sampled at the same UVs (:func:`sample_texture_grid_channels`).
    """
    # align_corners=False puts -1 / +1 on the outer texel edges, so texel centres sit at
    # (k + 0.5) / size as in the numpy sampler; y = +1 is the last (bottom) row, where v = 0.
    u, v = wrap_outside_unit(uv).unbind(-1)
    return torch.stack([u * 2.0 - 1.0, 1.0 - v * 2.0], dim=-1)[None, None]


def sample_texture_grid_channels(texture: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup of a (T, S, C) texture at a (1, 1, N, 2) grid, channels first: (C, N).

    The samples are split into two batches of the same texture (an expand, no copy): the CPU
    grid_sample kernel runs one thread per batch entry, and the refinement runs on two cores.
    """
    n = grid.shape[2]
    half = n // 2
    tex = texture.permute(2, 0, 1)[None]
    if half == 0 or n % 2:
        return F.grid_sample(tex, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0, :]
    out = F.grid_sample(
        tex.expand(2, -1, -1, -1), grid.reshape(2, 1, half, 2), mode="bilinear", padding_mode="border",
        align_corners=False,
    )  # fmt: skip
    return out[:, :, 0, :].permute(1, 0, 2).reshape(out.shape[1], n)


def wrap_outside_unit(uv: torch.Tensor) -> torch.Tensor:
    """Texture coordinates outside [0, 1] wrapped into it (repeat); those inside are unchanged."""
    outside = (uv < 0.0) | (uv > 1.0)
    return torch.where(outside, uv - torch.floor(uv.detach()), uv)


def sample_at_views(images: torch.Tensor, view: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup of (C, H, W) images at (M, 2) pixel positions in views (M,); (M,) out, border-clamped."""
    C, H, W = images.shape
    # Stack the views vertically into one (C*H, W) image; samples near a view's top or
    # bottom row clamp to it below rather than reading the neighbouring view.
    y = (xy[:, 1].clamp(0.5, H - 0.5) + view.to(xy.dtype) * H) / (C * H) * 2.0 - 1.0
    x = xy[:, 0] / W * 2.0 - 1.0
    grid = torch.stack([x, y], dim=-1)[None, None]
    out = F.grid_sample(
        images.reshape(1, 1, C * H, W), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return out[0, 0, 0]


def silhouette_loss(render: DiffRender, target_mask: torch.Tensor, target_sdf: torch.Tensor) -> torch.Tensor:
    """Area between the rendered and the target silhouettes, in pixels, summed over views.

    CUDA: sum of squared differences between antialiased coverage and the target mask.
    CPU: sum over contour samples of edge length times a pseudo-Huber of the target's
    signed distance there (pixels); both approximate the area of the symmetric difference.

    Parameters
    ----------
    target_mask : (C, H, W) bool
    target_sdf : (C, H, W) float, from :func:`pipeline.masks.signed_distance_px`
    """
    if render.contour_xy is None:
        return ((render.coverage - target_mask.to(render.coverage.dtype)) ** 2).sum()
    if render.contour_xy.shape[0] == 0:
        return render.rgb.new_zeros(())
    d = sample_at_views(target_sdf.to(render.contour_xy.dtype), render.contour_view, render.contour_xy)
    h = CONTOUR_HUBER_PX
    return (render.contour_len * (torch.sqrt(d * d + h * h) - h)).sum()


class CpuDiffRenderer:
    """CPU backend: embree visibility, torch barycentrics, texture and depth.

    Parameters
    ----------
    faces : (F, 3) int
    uvs : (V, 2) float, texture coordinates, v = 0 at the bottom row
    cameras : C cameras of one size (W, H)
    device : torch device of the outputs (CPU in practice)
    weld : (V,) int or None, the id of each vertex's position (UV-seam copies share one, see
        :func:`pipeline.mesh.weld_vertices`); vertices with one id must always be given the same position
    """

    name = "embree"

    def __init__(self, faces: np.ndarray, uvs: np.ndarray, cameras: list[Camera], *, device="cpu", weld=None):
        _check_cameras(cameras)
        self.cameras = list(cameras)
        self.device = torch.device(device)
        self.faces_np = np.ascontiguousarray(faces, dtype=np.int64)
        self.faces = torch.as_tensor(self.faces_np, device=self.device)
        self.uvs = torch.as_tensor(np.asarray(uvs, dtype=np.float64), device=self.device)
        self.width, self.height = cameras[0].width, cameras[0].height
        # Outline edges are found on the welded surface: UV seams split vertices, and a split
        # edge would otherwise look like an open boundary.
        n_v = int(self.faces_np.max()) + 1 if len(self.faces_np) else 0
        weld = np.arange(n_v) if weld is None else np.asarray(weld, dtype=np.int64)
        self._faces_welded = weld[self.faces_np]
        self._representative = np.zeros(int(weld.max()) + 1 if len(weld) else 0, np.int64)
        self._representative[weld] = np.arange(len(weld))
        self._edges, self._edge_faces, _ = edge_adjacency(self._faces_welded)
        self._vis: dict | None = None
        self._camera_cache: dict = {}
        self._dirs: list[np.ndarray | None] = [None] * len(self.cameras)
        self._boxes: list[tuple[slice, slice] | None] | None = None

    def update_visibility(self, vertices) -> None:
        """Re-run exact visibility and silhouette-edge detection at the current vertices ((V, 3), no gradient).

        After the first call, rays are cast only in each view's previous silhouette box grown by
        :data:`VISIBILITY_BOX_MARGIN_PX` (the mesh moves a fraction of a pixel per step); a hit on
        the box's edge means the silhouette may reach past it, and that view is cast again whole.
        """
        v = _to_numpy(vertices)
        rast = EmbreeRasterizer(v, self.faces_np)
        H, W = self.height, self.width
        views, pixels, face_ids, masks = [], [], [], []
        for i in range(len(self.cameras)):
            tri = self._cast_view(rast, i)
            hit = np.flatnonzero(tri >= 0)
            views.append(np.full(len(hit), i, np.int64))
            pixels.append(hit)
            face_ids.append(tri[hit])
            masks.append((tri >= 0).reshape(H, W))
        masks = np.stack(masks)
        a, b, t, length, cview = self._contour_samples(v, masks)
        # Pixels whose four neighbours are covered too: only these take sub-pixel samples
        # (an outline pixel's samples would run off its face into the background).
        inner = masks.copy()
        inner[:, 1:] &= masks[:, :-1]
        inner[:, :-1] &= masks[:, 1:]
        inner[:, :, 1:] &= masks[:, :, :-1]
        inner[:, :, :-1] &= masks[:, :, 1:]
        view_all, pixel_all = np.concatenate(views), np.concatenate(pixels)
        dev = self.device
        self._vis = {
            "view": torch.as_tensor(view_all, device=dev),
            "pixel": torch.as_tensor(pixel_all, device=dev),
            "inner": torch.as_tensor(inner.reshape(len(masks), -1)[view_all, pixel_all], device=dev),
            "face": torch.as_tensor(np.concatenate(face_ids), device=dev),
            "mask": torch.as_tensor(masks, device=dev),
            "contour": tuple(torch.as_tensor(x, device=dev) for x in (a, b, t, length, cview)),
            "constants": {},  # filled by _step_constants
        }
        self._boxes = [mask_box(m, VISIBILITY_BOX_MARGIN_PX) for m in masks]

    def _cast_view(self, rast: EmbreeRasterizer, i: int) -> np.ndarray:
        """(H * W,) int64 triangle id per pixel centre of view ``i`` (-1: background)."""
        H, W = self.height, self.width
        if self._dirs[i] is None:  # pixel rays never change: compute once, in float32 as embree takes them
            _, d = pixel_rays(self.cameras[i])
            self._dirs[i] = np.ascontiguousarray(d, dtype=np.float32).reshape(H, W, 3)
        dirs = self._dirs[i]
        origin = np.asarray(self.cameras[i].center, dtype=np.float32)
        box = self._boxes[i] if self._boxes is not None else None
        if box is not None:
            r0, r1, c0, c1 = box[0].start, box[0].stop, box[1].start, box[1].stop
            d = np.ascontiguousarray(dirs[r0:r1, c0:c1].reshape(-1, 3))
            sub = rast.cast_ids(np.broadcast_to(origin, d.shape), d).reshape(r1 - r0, c1 - c0)
            hit = sub >= 0
            # A hit on an edge of the box that is not the image's edge: the silhouette may continue outside.
            leaks = (
                (r0 > 0 and hit[0].any())
                or (r1 < H and hit[-1].any())
                or (c0 > 0 and hit[:, 0].any())
                or (c1 < W and hit[:, -1].any())
            )
            if not leaks:
                tri = np.full((H, W), -1, np.int64)
                tri[r0:r1, c0:c1] = sub
                return tri.reshape(-1)
        d = dirs.reshape(-1, 3)
        return rast.cast_ids(np.broadcast_to(origin, d.shape), d)

    def _contour_samples(self, v: np.ndarray, masks: np.ndarray):
        """Silhouette-edge samples on the rendered outline: (edge end a, end b, t, length px, view), each (M,)."""
        faces, edges, ef, rep = self._faces_welded, self._edges, self._edge_faces, self._representative
        tri = v[self.faces_np]
        fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        centroid = tri.mean(axis=1)
        out = [[], [], [], [], []]
        for i, cam in enumerate(self.cameras):
            facing = ((cam.center[None] - centroid) * fn).sum(-1) > 0
            f0 = facing[ef[:, 0]]
            # An open boundary edge counts as an outline piece when its one face is seen from the front.
            f1 = np.where(ef[:, 1] >= 0, facing[ef[:, 1].clip(0)], False)
            sil = np.flatnonzero(f0 != f1)
            if len(sil) == 0:
                continue
            pc = v @ cam.world_to_cam[:3, :3].T + cam.world_to_cam[:3, 3]
            z = np.maximum(pc[:, 2], 1e-9)
            xy = np.stack(
                [
                    cam.K[0, 0] * pc[:, 0] / z + cam.K[0, 1] * pc[:, 1] / z + cam.K[0, 2],
                    cam.K[1, 1] * pc[:, 1] / z + cam.K[1, 2],
                ],
                -1,
            )
            a, b = edges[sil, 0], edges[sil, 1]
            # The front-facing face of each edge, and its vertex off the edge: the outline's inside.
            front = np.where(f0[sil], ef[sil, 0], ef[sil, 1])
            # Welded ids -> one of their (coincident) vertices.
            a, b, c = rep[a], rep[b], rep[faces[front].sum(axis=1) - a - b]
            seg = np.linalg.norm(xy[b] - xy[a], axis=1)
            # Edges behind the camera, non-finite or longer than the image cannot be outline pieces.
            usable = (
                (pc[a, 2] > 0) & (pc[b, 2] > 0) & (pc[c, 2] > 0) & np.isfinite(seg) & (seg <= self.width + self.height)
            )
            a, b, c, seg = a[usable], b[usable], c[usable], seg[usable]
            if len(a) == 0:
                continue
            n = np.maximum(np.ceil(seg * CONTOUR_SAMPLES_PER_PX), 1).astype(np.int64)
            e = np.repeat(np.arange(len(a)), n)
            k = np.arange(len(e)) - np.repeat(np.cumsum(n) - n, n)
            t = (k + 0.5) / n[e]
            p = xy[a[e]] * (1 - t)[:, None] + xy[b[e]] * t[:, None]
            # Screen normal of each edge, pointing away from its front face.
            d = xy[b] - xy[a]
            nrm = np.stack([-d[:, 1], d[:, 0]], -1) / np.maximum(seg, 1e-12)[:, None]
            flip = ((xy[c] - xy[a]) * nrm).sum(-1) > 0
            nrm[flip] *= -1
            # Keep samples with background just outside and coverage just inside: pieces of the
            # rendered outline, not contours hidden behind (or in front of) other surface.
            keep = ~_mask_at(masks[i], p + CONTOUR_PROBE_PX * nrm[e]) & _mask_at(
                masks[i], p - CONTOUR_PROBE_PX * nrm[e]
            )
            e, t = e[keep], t[keep]
            for lst, val in zip(out, (a[e], b[e], t, (seg / n)[e], np.full(len(e), i, np.int64)), strict=True):
                lst.append(val)
        if not out[0]:
            return tuple(np.zeros(0, dt) for dt in (np.int64, np.int64, np.float64, np.float64, np.int64))
        return tuple(np.concatenate(x) for x in out)

    def render(
        self,
        vertices: torch.Tensor,
        texture: torch.Tensor,
        *,
        sample_offsets: tuple[tuple[float, float], ...] = ((0.0, 0.0),),
    ) -> DiffRender:
        """Render all cameras.

        Parameters
        ----------
        vertices : (V, 3) float tensor, world (may require grad)
        texture : (T, S, 3) float tensor in [0, 1], row 0 at the top (may require grad), or a
            sequence of such layers of any sizes: each is sampled bilinearly at the same UV and
            the samples are summed and clamped to [0, 1] (a texture plus coarse corrections,
            without composing a full-size texture every step)
        sample_offsets : (dx, dy) pixel offsets from each pixel's centre; colour and depth are the
            means of samples there, taken within the face that covers the centre (coverage stays
            the centre's). Pixels on the rendered outline (a 4-neighbour uncovered) are sampled
            at their centre only.
        """
        if self._vis is None:
            self.update_visibility(vertices)
        dtype, dev = vertices.dtype, vertices.device
        C, H, W = len(self.cameras), self.height, self.width
        k = self._step_constants(dtype, tuple(sample_offsets), vertices.shape[0])
        x, y, z = project_flat(vertices, *self._camera_tensors(dtype))  # (C * V,) each
        # Corners gathered as (3, N) rows, so each corner's values are contiguous. index_select, not
        # advanced indexing: its backward is an index_add, several times cheaper on the CPU than the
        # accumulating index_put of a gather's backward.
        px, py, pz = (a.index_select(0, k["corner"]).reshape(3, -1) for a in (x, y, z))
        grid, inv_z, ok = _perspective_samples(px, py, pz, k)
        depth_px = (1.0 / inv_z).mean(0)
        # Channels first: (3, S * N) is what grid_sample returns, and the sample mean is then over rows.
        col = sum(sample_texture_grid_channels(t.to(dtype), grid) for t in _layers(texture))
        if not isinstance(texture, torch.Tensor):
            col = col.clamp(0.0, 1.0)
        # Every layer at every sample: coarse corrections vary within a pixel too (sampling them at
        # the samples' mean cost spot 0.4 dB and the sneaker 0.3 dB).
        col = col.reshape(3, inv_z.shape[0], -1).mean(1)
        okf = ok.to(dtype)
        col = col * okf + (1.0 - okf)  # degenerate pixels read as background

        rgb = torch.ones(C * H * W, 3, dtype=dtype, device=dev).index_put((k["flat"],), col.T).reshape(C, H, W, 3)
        depth_px = depth_px * okf
        depth = torch.zeros(C * H * W, dtype=dtype, device=dev).index_put((k["flat"],), depth_px)
        mask = self._vis["mask"]
        t = k["contour_t"]
        xa, ya = x.index_select(0, k["contour_a"]), y.index_select(0, k["contour_a"])
        xb, yb = x.index_select(0, k["contour_b"]), y.index_select(0, k["contour_b"])
        contour_xy = torch.stack([xa * (1.0 - t) + xb * t, ya * (1.0 - t) + yb * t], dim=-1)
        return DiffRender(
            rgb=rgb,
            coverage=mask.to(dtype),
            depth=depth.reshape(C, H, W),
            mask=mask,
            contour_xy=contour_xy,
            contour_view=self._vis["contour"][4],
            contour_len=self._vis["contour"][3].to(dtype),
            pixels=k["flat"],
            pixel_depth=depth_px,
        )

    def _camera_tensors(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, 3, 3) K and (C, 4, 4) world_to_cam of the cameras in ``dtype`` (made once per dtype)."""
        if dtype not in self._camera_cache:
            self._camera_cache[dtype] = _camera_tensors(self.cameras, dtype, self.device)
        return self._camera_cache[dtype]

    def _step_constants(self, dtype, sample_offsets: tuple, n_vertices: int) -> dict[str, torch.Tensor]:
        """What :meth:`render` needs of the current visibility that no step changes (made once per refresh).

        ``corner`` (3 N,): corner k of covered pixel n at row k N + n, as an index into the flattened
        (C * V) projections; ``u``, ``v`` (3, N) the corners' texture coordinates; ``qx``, ``qy`` (N,) the
        pixel centres; ``ox``, ``oy`` (S, N) the sample offsets (0 on outline pixels); ``flat`` (N,) the
        pixels' rows in a (C * H * W) frame; ``contour_a``, ``contour_b`` (M,) the contour samples' edge
        ends in the flattened projections and ``contour_t`` (M,) their position along the edge.
        """
        key = (dtype, sample_offsets, n_vertices)
        cache = self._vis["constants"]
        if key not in cache:
            vis, W = self._vis, self.width
            corners = self.faces[vis["face"]].T  # (3, N)
            uv = self.uvs.to(dtype)[corners]  # (3, N, 2)
            off = torch.as_tensor(sample_offsets, dtype=dtype, device=self.device)  # (S, 2)
            inner = vis["inner"].to(dtype)[None]  # outline pixels take their centre S times
            a, b, t, _, cview = vis["contour"]
            cache[key] = {
                "corner": (vis["view"][None] * n_vertices + corners).reshape(-1),
                "u": uv[..., 0].contiguous(),
                "v": uv[..., 1].contiguous(),
                "qx": (vis["pixel"] % W).to(dtype) + 0.5,
                "qy": (vis["pixel"] // W).to(dtype) + 0.5,
                "ox": off[:, 0, None] * inner,
                "oy": off[:, 1, None] * inner,
                "flat": vis["view"] * (self.height * W) + vis["pixel"],
                "contour_a": cview * n_vertices + a,
                "contour_b": cview * n_vertices + b,
                "contour_t": t.to(dtype),
            }
        return cache[key]


def _perspective_samples(px, py, pz, k: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Texture coordinates of the sub-pixel samples of covered pixels, perspective-correct.

    Parameters
    ----------
    px, py, pz : (3, N) the pixels' face corners projected: pixel x, y and z-depth (differentiable)
    k : :meth:`CpuDiffRenderer._step_constants`

    Returns
    -------
    grid : (1, 1, S * N, 2) ``grid_sample`` coordinates, sample-major
    inv_z : (S, N) 1 / z-depth at each sample
    ok : (N,) bool, the face's screen area is large enough to trust its barycentrics
    """
    # Screen-space barycentrics of the pixel centre and their screen derivatives.
    x0, x1, x2 = px
    y0, y1, y2 = py
    e1x, e1y, e2x, e2y, dx, dy = x1 - x0, y1 - y0, x2 - x0, y2 - y0, k["qx"] - x0, k["qy"] - y0
    den = e1x * e2y - e1y * e2x
    ok = den.abs() > MIN_SCREEN_AREA_PX2
    inv_den = 1.0 / torch.where(ok, den, torch.ones_like(den))
    b1, b2 = (dx * e2y - dy * e2x) * inv_den, (e1x * dy - e1y * dx) * inv_den
    b1x, b1y, b2x, b2y = e2y * inv_den, -e2x * inv_den, -e1y * inv_den, e1x * inv_den
    # Perspective-correct interpolation: uv = sum(b_k uv_k / z_k) / sum(b_k / z_k). Numerator
    # and denominator are affine in the screen position, so each sample costs a few
    # multiply-adds from their values and derivatives at the centre.
    w = 1.0 / pz  # (3, N)
    ox, oy = k["ox"], k["oy"]
    inv_z = _affine_at_samples(w, b1, b2, b1x, b1y, b2x, b2y, ox, oy)  # (S, N)
    u = _affine_at_samples(k["u"] * w, b1, b2, b1x, b1y, b2x, b2y, ox, oy) / inv_z
    v = _affine_at_samples(k["v"] * w, b1, b2, b1x, b1y, b2x, b2y, ox, oy) / inv_z
    # align_corners=False puts -1 / +1 on the outer texel edges (see texture_grid).
    grid = torch.stack([wrap_outside_unit(u) * 2.0 - 1.0, 1.0 - wrap_outside_unit(v) * 2.0], dim=-1)
    return grid.reshape(1, 1, -1, 2), inv_z, ok


def _affine_at_samples(f, b1, b2, b1x, b1y, b2x, b2y, ox, oy) -> torch.Tensor:
    """(S, N) a per-corner quantity (3, N), interpolated linearly in screen space to the samples.

    Its value at the pixel centre (barycentrics b1, b2) plus the offsets (S, N) times its screen
    derivatives (from the barycentrics' derivatives b1x ... b2y).
    """
    f0, f1, f2 = f.unbind(0)  # one unbind: its backward is one stack (a select's is a full-size zero fill)
    d1, d2 = f1 - f0, f2 - f0
    centre = f0 + b1 * d1 + b2 * d2
    return centre + ox * (b1x * d1 + b2x * d2) + oy * (b1y * d1 + b2y * d2)


class CudaDiffRenderer:
    """CUDA backend through nvdiffrast (one batched rasterisation per step; visibility is always fresh).

    Parameters are those of :class:`CpuDiffRenderer`; ``device`` must be a CUDA device.
    """

    name = "nvdiffrast"
    _ctx: dict = {}

    def __init__(self, faces: np.ndarray, uvs: np.ndarray, cameras: list[Camera], *, device="cuda"):
        import nvdiffrast.torch as dr

        _check_cameras(cameras)
        self._dr = dr
        self.cameras = list(cameras)
        self.device = torch.device(device)
        self.faces = torch.as_tensor(np.asarray(faces), dtype=torch.int32, device=self.device).contiguous()
        uv = np.asarray(uvs, dtype=np.float32).copy()
        uv[:, 1] = 1.0 - uv[:, 1]  # nvdiffrast's v = 0 is texture row 0 (the top); ours is the bottom row
        self.uvs = torch.as_tensor(uv, device=self.device).contiguous()
        self.width, self.height = cameras[0].width, cameras[0].height
        key = str(self.device)
        if key not in CudaDiffRenderer._ctx:
            CudaDiffRenderer._ctx[key] = dr.RasterizeCudaContext(device=self.device)
        self._glctx = CudaDiffRenderer._ctx[key]

    def update_visibility(self, vertices) -> None:
        """Nothing to do: every :meth:`render` rasterises afresh."""

    def render(
        self,
        vertices: torch.Tensor,
        texture: torch.Tensor,
        *,
        sample_offsets: tuple[tuple[float, float], ...] = ((0.0, 0.0),),
    ) -> DiffRender:
        """Render all cameras; see :meth:`CpuDiffRenderer.render`. Computes in float32 (nvdiffrast's type).

        Each of ``sample_offsets`` is one antialiased rasterisation with the geometry shifted by
        the opposite offset (nvdiffrast samples pixel centres); colour, coverage and depth are
        their means, and ``mask`` is where any sample hit.
        """
        dr = self._dr
        v = vertices.to(torch.float32)
        H, W = self.height, self.width
        clip, zs = [], []
        for cam in self.cameras:
            c, z = clip_space(v, cam, torch)
            clip.append(c)
            zs.append(z)
        clip = torch.stack(clip)  # (C, V, 4)
        z = torch.stack(zs)[..., None].contiguous()  # (C, V, 1)
        layers = [t.to(torch.float32)[None].contiguous() for t in _layers(texture)]
        rgba_sum, depth_sum, hits = 0.0, 0.0, 0.0
        for dx, dy in sample_offsets:
            # Image row i is NDC y = 2 (i + 0.5) / H - 1 (see clip_space): sampling at +d pixels
            # equals moving the geometry by -d, which is -2 d / size in NDC, times w in clip space.
            shift = torch.tensor([-2.0 * dx / W, -2.0 * dy / H, 0.0, 0.0], device=clip.device)
            shifted = (clip + shift * clip[..., 3:4]).contiguous()
            rast, _ = dr.rasterize(self._glctx, shifted, self.faces, resolution=[H, W])
            hit = rast[..., 3:4] > 0
            uv, _ = dr.interpolate(self.uvs[None], rast, self.faces)
            uv = wrap_outside_unit(uv).contiguous()
            col = sum(dr.texture(t, uv, filter_mode="linear", boundary_mode="clamp") for t in layers)
            if not isinstance(texture, torch.Tensor):
                col = col.clamp(0.0, 1.0)
            depth, _ = dr.interpolate(z, rast, self.faces)
            cov = hit.to(torch.float32)
            rgba = torch.cat([torch.where(hit, col, torch.ones_like(col)), cov], dim=-1)
            # antialias blends across silhouette edges; its gradient moves the edges (vertices).
            rgba_sum = rgba_sum + dr.antialias(rgba.contiguous(), rast, shifted, self.faces)
            depth_sum = depth_sum + torch.where(hit, depth, torch.zeros_like(depth))
            hits = hits + cov
        n = float(len(sample_offsets))
        rgba = rgba_sum / n
        return DiffRender(
            rgb=rgba[..., :3],
            coverage=rgba[..., 3],
            depth=(depth_sum / hits.clamp(min=1.0))[..., 0],
            mask=hits[..., 0] > 0,
        )


def make_diff_renderer(
    faces: np.ndarray, uvs: np.ndarray, cameras: list[Camera], *, backend: DiffBackend = "auto", device=None, weld=None
):
    """A differentiable renderer for one mesh topology and a fixed camera batch.

    ``auto`` picks nvdiffrast when CUDA is usable, else embree. ``device`` defaults to
    ``cuda`` for nvdiffrast and ``cpu`` for embree. ``weld`` (CPU only) is described in
    :class:`CpuDiffRenderer`; nvdiffrast's antialias finds silhouettes by position itself.
    """
    if backend == "nvdiffrast" or (backend == "auto" and cuda_available()):
        return CudaDiffRenderer(faces, uvs, cameras, device=device or "cuda")
    if backend not in ("auto", "embree"):
        raise ValueError(f"unknown differentiable render backend {backend!r}; use auto, embree or nvdiffrast")
    return CpuDiffRenderer(faces, uvs, cameras, device=device or "cpu", weld=weld)


def _check_cameras(cameras: list[Camera]) -> None:
    if not cameras:
        raise ValueError("need at least one camera")
    sizes = {(c.width, c.height) for c in cameras}
    if len(sizes) != 1:
        raise ValueError(f"all cameras of one renderer must share an image size, got {sorted(sizes)}")


def _mask_at(mask: np.ndarray, p: np.ndarray) -> np.ndarray:
    """(N,) bool: ``mask`` (H, W) at the pixels containing points (N, 2); False outside the image."""
    H, W = mask.shape
    col, row = np.floor(p[:, 0]), np.floor(p[:, 1])
    inside = (col >= 0) & (col < W) & (row >= 0) & (row < H)
    out = np.zeros(len(p), bool)
    out[inside] = mask[row[inside].astype(np.int64), col[inside].astype(np.int64)]
    return out


def _layers(texture) -> list[torch.Tensor]:
    return [texture] if isinstance(texture, torch.Tensor) else list(texture)


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().astype(np.float64)
    return np.asarray(x, dtype=np.float64)
