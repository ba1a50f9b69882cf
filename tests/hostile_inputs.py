"""Builders of malformed uploads shared by the hostile-request and fuzz tests (no pytest here)."""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib

import numpy as np
from PIL import Image

TRANSFORMS = "transforms.json"


def members(bundle_zip: bytes) -> dict[str, bytes]:
    zf = zipfile.ZipFile(io.BytesIO(bundle_zip))
    return {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}


def make_zip(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def with_transforms(bundle_zip: bytes, edit) -> bytes:
    """The bundle with its transforms.json replaced by ``edit(parsed)`` (a dict, or bytes as is)."""
    files = members(bundle_zip)
    doc = json.loads(files[TRANSFORMS])
    new = edit(doc)
    files[TRANSFORMS] = new if isinstance(new, bytes) else json.dumps(new).encode()
    return make_zip(files)


def nested_json(depth: int = 100_000) -> bytes:
    """``{"a": [[[[...]]]]}``: valid JSON that recursion-based parsers cannot walk."""
    return b'{"a": ' + b"[" * depth + b"]" * depth + b"}"


def corrupt_member(bundle_zip: bytes, name: str, how: str) -> bytes:
    """``how``: 'deflate' flips bytes inside the member's compressed stream, 'crc' changes its stored CRC,
    'method' names a compression method zipfile cannot inflate (98, PPMd)."""
    files = members(bundle_zip)
    data = make_zip(files)
    zf = zipfile.ZipFile(io.BytesIO(data))
    info = zf.getinfo(name)
    raw = bytearray(data)
    if how == "method":
        # The method is stored twice: in the local header (+8) and in the central directory entry (+10).
        raw[info.header_offset + 8 : info.header_offset + 10] = struct.pack("<H", 98)
        cd = raw.find(b"PK\x01\x02")
        while cd >= 0:
            if raw[cd + 46 : cd + 46 + len(name)] == name.encode():
                raw[cd + 10 : cd + 12] = struct.pack("<H", 98)
            cd = raw.find(b"PK\x01\x02", cd + 4)
        return bytes(raw)
    if how == "crc":
        # The CRC is stored twice: in the local header (+14) and in the central directory entry (+16).
        bad = struct.pack("<I", (info.CRC ^ 0xDEADBEEF) & 0xFFFFFFFF)
        raw[info.header_offset + 14 : info.header_offset + 18] = bad
        cd = raw.find(b"PK\x01\x02")
        while cd >= 0:
            if raw[cd + 46 : cd + 46 + len(name)] == name.encode():
                raw[cd + 16 : cd + 20] = bad
            cd = raw.find(b"PK\x01\x02", cd + 4)
        return bytes(raw)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for k in range(start + 2, min(start + info.compress_size, start + 40)):
        raw[k] ^= 0x5A
    return bytes(raw)


def zip_bomb_member(size: int = 64 * 1024 * 1024, name: str = "big/multi_views/front.png") -> bytes:
    """A ZIP with one member of ``size`` zero bytes (deflates about 1000x)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as f:
            chunk = bytes(1024 * 1024)
            for _ in range(size // len(chunk)):
                f.write(chunk)
    return buf.getvalue()


def png(width: int, height: int, mode: str = "RGB", value: int = 128) -> bytes:
    buf = io.BytesIO()
    shape = (height, width) if mode == "L" else (height, width, len(mode))
    Image.fromarray(np.full(shape, value, np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` and whose data is one tiny IDAT (not decodable that big)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def many_frames_one_png(frames: int = 24, size: int = 2048) -> bytes:
    """A posed bundle: ``frames`` frames all naming one small-on-disk ``size``^2 PNG (and one depth)."""
    eye = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 2.5], [0, 0, 0, 1.0]]
    t = {
        "camera_angle_x": 0.9,
        "frames": [
            {"file_path": "img/a.png", "depth_path": "depth/a.png", "transform_matrix": eye} for _ in range(frames)
        ],
    }
    return make_zip(
        {"img/a.png": png(size, size), "depth/a.png": png(size, size, "L", 200), TRANSFORMS: json.dumps(t).encode()}
    )


def png16(width: int, height: int, value: int = 40000) -> bytes:
    """A 16-bit grey PNG (decodes to float32 depth: the most bytes per pixel the reader keeps)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width), value, np.uint16)).save(buf, "PNG")
    return buf.getvalue()


def largest_allowed_bundle(pixel_budget: int, size: int = 2048) -> bytes:
    """The posed bundle closest under ``pixel_budget`` decoded pixels: frames of an RGB photo and a
    16-bit depth render, every frame naming the same two small-on-disk files."""
    per_frame = 2 * size * size
    frames = pixel_budget // per_frame
    eye = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 2.5], [0, 0, 0, 1.0]]
    t = {
        "camera_angle_x": 0.9,
        "frames": [
            {"file_path": "img/a.png", "depth_path": "depth/a.png", "transform_matrix": eye} for _ in range(frames)
        ],
    }
    files = {"img/a.png": png(size, size), "depth/a.png": png16(size, size), TRANSFORMS: json.dumps(t).encode()}
    return make_zip(files)
