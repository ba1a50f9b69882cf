"""Fuzz the bundle reader: damaged ZIPs, PNGs and transforms.json never escape as anything but
an InvalidInputError with a stable code, and never hang (seeded, so a failure reproduces)."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import hostile_inputs as H
import pytest

from pipeline.bundle import load_bundle
from pipeline.errors import InvalidInputError
from pipeline.synthetic import write_bundle

#: Seconds one damaged bundle may take to be read or refused (a valid one reads in well under 1 s).
CASE_DEADLINE_S = 20.0


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> bytes:
    return write_bundle(
        tmp_path_factory.mktemp("fz") / "b.zip", "box", resolution=32, as_zip=True, with_transforms=True
    ).read_bytes()


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(1) as ex:
        yield ex


def read_or_refuse(pool, data: bytes) -> str:
    """'ok' or the error code; any other exception, or a read past the deadline, fails the test."""

    def run():
        try:
            load_bundle(data)
            return "ok"
        except InvalidInputError as e:
            assert e.code and e.code.isupper(), e
            return e.code

    return pool.submit(run).result(timeout=CASE_DEADLINE_S)


def flip_bytes(data: bytes, rng: random.Random, n: int) -> bytes:
    raw = bytearray(data)
    for _ in range(n):
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    return bytes(raw)


def test_damaged_zip_bytes(bundle, pool):
    rng = random.Random(1)
    codes = set()
    for _ in range(120):
        codes.add(read_or_refuse(pool, flip_bytes(bundle, rng, rng.randint(1, 20))))
    for cut in range(0, len(bundle), max(1, len(bundle) // 40)):
        codes.add(read_or_refuse(pool, bundle[:cut]))
    assert "INVALID_ARCHIVE" in codes  # the damage did reach the reader


def test_damaged_pngs(bundle, pool):
    rng = random.Random(2)
    files = H.members(bundle)
    names = [n for n in files if n.endswith(".png")]
    codes = set()
    for _ in range(80):
        name = rng.choice(names)
        png = files[name]
        how = rng.choice(("flip", "truncate", "header", "garbage"))
        if how == "flip":
            png = flip_bytes(png, rng, rng.randint(1, 8))
        elif how == "truncate":
            png = png[: rng.randrange(len(png))]
        elif how == "header":
            png = H.png_header_claiming(rng.choice((0, 1, 32, 5000, 2**31 - 1)), rng.choice((0, 1, 32, 70000)))
        else:
            png = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
        codes.add(read_or_refuse(pool, H.make_zip({**files, name: png})))
    assert codes & {"INVALID_IMAGE", "INPUT_TOO_LARGE"}


JSON_VALUES = [
    None, True, 0, -1, 0.0, 1e308, -1e308, 10**400, "", "x" * 1000, [], {}, [[1, 2], [3]], {"a": None},
    float("nan"), float("inf"), [0.0] * 16, [[0.0] * 4] * 4, [[1e300] * 4] * 4, "../../etc/passwd", "\u0000",
]  # fmt: skip


def _mutate_json(doc, rng: random.Random, depth: int = 0):
    """Replace one random node of ``doc`` with a hostile value."""
    if depth > 4 or not isinstance(doc, (dict, list)) or not doc or rng.random() < 0.3:
        return rng.choice(JSON_VALUES)
    if isinstance(doc, dict):
        k = rng.choice(list(doc))
        return {**doc, k: _mutate_json(doc[k], rng, depth + 1)}
    i = rng.randrange(len(doc))
    return doc[:i] + [_mutate_json(doc[i], rng, depth + 1)] + doc[i + 1 :]


def test_damaged_transforms(bundle, pool):
    rng = random.Random(3)
    files = H.members(bundle)
    doc = json.loads(files[H.TRANSFORMS])
    codes = set()
    for _ in range(150):
        text = json.dumps(_mutate_json(doc, rng)).encode()
        if rng.random() < 0.2:
            text = flip_bytes(text, rng, rng.randint(1, 5))
        codes.add(read_or_refuse(pool, H.make_zip({**files, H.TRANSFORMS: text})))
    for extra in (H.nested_json(), b"[" * 5000, b'{"frames": ' * 3000, b"\xff\xfe", b"", b"null"):
        codes.add(read_or_refuse(pool, H.make_zip({**files, H.TRANSFORMS: extra})))
    assert "INVALID_TRANSFORMS" in codes


def test_pixel_budget_refuses_before_decoding_everything(pool):
    """Many frames naming one 2048^2 PNG: the header-first budget refuses the bundle."""
    assert read_or_refuse(pool, H.many_frames_one_png(24, 2048)) == "INPUT_TOO_LARGE"
