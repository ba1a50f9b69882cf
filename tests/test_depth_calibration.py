"""Depth-encoding estimation against the silhouette hull."""

from __future__ import annotations

import numpy as np

from pipeline.camera import RIG_VIEW_NAMES, default_rig
from pipeline.config import DepthEncoding
from pipeline.depth import decode_depth, encode_depth
from pipeline.depth_calibration import envelope_line, estimate_depth_encodings
from pipeline.render import make_rasterizer
from pipeline.synthetic import make_shape

SIZE = 128


def test_envelope_line_ignores_concavities():
    rng = np.random.default_rng(0)
    v = rng.uniform(100, 200, 4000)
    z = 0.5 + 0.01 * v + rng.normal(0, 0.002, v.size)
    z[:1200] -= rng.uniform(0.05, 0.3, 1200)  # hull in front of the surface (concave parts)
    a, b, w, sigma = envelope_line(v, z, np.ones(v.size))
    assert abs(b - 0.01) < 5e-4 and abs(a - 0.5) < 0.03
    assert w[:1200].mean() < 0.2 < 0.9 < w[1200:].mean()


def test_estimate_recovers_non_default_encoding():
    enc = DepthEncoding(near=1.6, far=3.4)
    mesh = make_shape("capsule")
    r = make_rasterizer(mesh.vertices, mesh.faces, backend="embree")
    cams = default_rig(SIZE, SIZE)
    raws, masks, truth = [], [], []
    for n in RIG_VIEW_NAMES:
        rast = r.rasterize(cams[n])
        raws.append(encode_depth(rast.depth, rast.mask, enc).astype(np.float32))
        masks.append(rast.mask)
        truth.append(rast.depth)
    encs, report = estimate_depth_encodings(np.stack(raws), np.stack(masks), [cams[n] for n in RIG_VIEW_NAMES])
    assert abs(report["pooled"]["near"] - enc.near) < 0.1
    assert abs(report["pooled"]["far"] - enc.far) < 0.1
    for e, raw, m, zt in zip(encs, raws, masks, truth, strict=True):
        z, _ = decode_depth(raw, e)
        err = np.abs(z[m] - zt[m])
        assert np.median(err) < 0.01  # one 8-bit level is 0.007 here
    assert set(report["per_view"]) == set(RIG_VIEW_NAMES)
