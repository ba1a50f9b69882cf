"""Depth-encoding estimation against the silhouette hull."""

from __future__ import annotations

import numpy as np
import pytest

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
    raws, masks, cams, truth = _render_raw("capsule", enc)
    encs, report = estimate_depth_encodings(raws, masks, cams)
    assert report["choice"] != "prior" and report["method"] == "hull_fit"
    assert report["candidates"]["prior"]["misfit"] > 0.3  # the default contradicts this data
    for e, raw, m, zt in zip(encs, raws, masks, truth, strict=True):
        z, _ = decode_depth(raw, e)
        err = np.abs(z[m] - zt[m])
        assert np.median(err) < 0.01  # one 8-bit level is 0.007 here
    assert set(report["per_view"]) == set(RIG_VIEW_NAMES)


def _render_raw(shape: str, enc: DepthEncoding, *, size: int = SIZE):
    mesh = make_shape(shape)
    r = make_rasterizer(mesh.vertices, mesh.faces, backend="embree")
    cams = default_rig(size, size)
    raws, masks, truth = [], [], []
    for n in RIG_VIEW_NAMES:
        rast = r.rasterize(cams[n])
        raws.append(encode_depth(rast.depth, rast.mask, enc).astype(np.float32))
        masks.append(rast.mask)
        truth.append(rast.depth)
    return np.stack(raws), np.stack(masks), [cams[n] for n in RIG_VIEW_NAMES], truth


@pytest.mark.parametrize("shape", ["sphere", "box", "torus"])
def test_default_encoding_is_kept_where_it_fits(shape):
    raws, masks, cams, _ = _render_raw(shape, DepthEncoding())
    encs, report = estimate_depth_encodings(raws, masks, cams)
    assert report["choice"] == "prior" and report["method"] == "default", report["candidates"]
    assert all(e == DepthEncoding() for e in encs)
    assert not report["uncertain"]


def test_misstated_scale_is_corrected():
    truth_enc = DepthEncoding(far=2.5 * 1.05)  # the data's real encoding; the bundle claims the default
    raws, masks, cams, truth = _render_raw("sphere", truth_enc)
    encs, report = estimate_depth_encodings(raws, masks, cams)
    assert report["choice"] != "prior"
    assert report["candidates"]["prior"]["misfit"] > 0.2
    for e, raw, m, zt in zip(encs, raws, masks, truth, strict=True):
        z, _ = decode_depth(raw, e)
        assert np.median(np.abs(z[m] - zt[m])) < 0.03  # 1.5 % of the depth; the default is off by 0.1


def test_contradictory_depth_is_flagged_uncertain():
    raws, masks, cams, _ = _render_raw("sphere", DepthEncoding())
    rng = np.random.default_rng(0)
    noisy = np.where(masks, rng.integers(1, 256, raws.shape), 0).astype(np.float32)  # values unrelated to the shape
    _, report = estimate_depth_encodings(noisy, masks, cams)
    assert report["uncertain"] and report["warning"].startswith("DEPTH_ENCODING_UNCERTAIN")
