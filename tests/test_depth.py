"""Depth decoding (zdepth_linear) and its inverse."""

import numpy as np
import pytest

from pipeline.config import DepthEncoding
from pipeline.depth import decode_depth, encode_depth
from pipeline.errors import InvalidInputError


def test_default_encoding_decodes_contract_values():
    enc = DepthEncoding()
    raw = np.array([[0, 255, 102]], np.float32)
    z, valid = decode_depth(raw, enc)
    assert valid.tolist() == [[False, True, True]]
    assert np.allclose(z, [[0.0, 2.5, 1.0]])


def test_round_trip_within_quantisation():
    enc = DepthEncoding(near=0.5, far=3.0, max_value=65535)
    z = np.linspace(0.6, 2.9, 100, dtype=np.float32)[None]
    valid = np.ones_like(z, bool)
    z2, v2 = decode_depth(encode_depth(z, valid, enc, dtype=np.uint16).astype(np.float32), enc)
    assert v2.all() and np.abs(z2 - z).max() <= 2.5 / 65535 + 1e-6


def test_foreground_never_encodes_as_background():
    enc = DepthEncoding()
    raw = encode_depth(np.array([[0.001, 0.0]]), np.array([[True, False]]), enc)
    assert raw.tolist() == [[1, 0]]


@pytest.mark.parametrize(
    "bad", [{"kind": "disparity"}, {"near": 2, "far": 1}, {"max_value": 0}, {"scale": 3}, {"far": "x"}]
)
def test_invalid_encodings(bad):
    with pytest.raises(InvalidInputError):
        DepthEncoding.from_dict(bad)
