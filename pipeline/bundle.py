"""Read and validate input bundles (a folder or a ZIP) into a :class:`FrameSet`.

The contract is in docs/input-format.md. Every problem raises a subclass of
:class:`~pipeline.errors.InvalidInputError` with a stable code and the offending
file in ``details``; nothing here returns a traceback to a client.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import constants as C
from .archive import ArchiveLimits, check_entries, open_zip, read_member
from .camera import RIG_VIEW_NAMES, Camera, intrinsics_from_fov, opengl_to_opencv
from .config import DepthEncoding
from .errors import (
    EmptyDepthError,
    InputTooLargeError,
    InsufficientViewsError,
    InvalidImageError,
    InvalidInputError,
    InvalidTransformsError,
    MissingDepthError,
    MissingViewError,
    ResolutionMismatchError,
    UnknownViewError,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIEWS_DIR = "multi_views"
DEPTH_DIR = "depth_renders"
TRANSFORMS_FILE = "transforms.json"
#: Optional: the bundle's depth encoding, with or without transforms.json (docs/input-format.md).
ENCODING_FILE = "depth_encoding.json"


@dataclass(frozen=True)
class BundleLimits:
    """Size limits applied while reading a bundle."""

    max_file_bytes: int = C.MAX_FILE_BYTES
    max_image_pixels: int = C.MAX_IMAGE_PIXELS
    max_archive_bytes: int = C.MAX_ARCHIVE_UNCOMPRESSED_BYTES
    max_zip_ratio: float = C.MAX_ZIP_RATIO
    max_zip_entries: int = C.MAX_ZIP_ENTRIES
    max_views: int = C.MAX_VIEWS
    max_total_pixels: int = C.MAX_TOTAL_PIXELS
    """Decoded pixels of every image of the bundle together (a view that many frames share counts each time)."""

    def archive(self) -> ArchiveLimits:
        return ArchiveLimits(
            max_entries=self.max_zip_entries,
            max_member_bytes=self.max_file_bytes,
            max_total_bytes=self.max_archive_bytes,
            max_ratio=self.max_zip_ratio,
        )


@dataclass
class View:
    """One input view.

    Attributes
    ----------
    name : str, the file stem (``front``, ``0001`` ...)
    rgb : (H, W, 3) uint8, the photo
    alpha : (H, W) bool or None, foreground from the RGBA alpha channel
    depth_raw : (h, w) float32 or None, raw PNG values (not yet decoded)
    camera : Camera or None, at the RGB resolution; None until resolved
    """

    name: str
    rgb: np.ndarray
    alpha: np.ndarray | None = None
    depth_raw: np.ndarray | None = None
    camera: Camera | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the RGB image."""
        return self.rgb.shape[1], self.rgb.shape[0]


@dataclass
class FrameSet:
    """All views of one bundle, as read. Cameras are set when the bundle had transforms.json."""

    views: list[View]
    depth_encoding: DepthEncoding | None = None
    depth_encoding_source: str = ""
    """Where the encoding was stated: ``transforms.json`` or ``depth_encoding.json``; empty when not stated."""
    cameras_given: bool = False
    depth_max_value: float = 255.0
    source: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.views]


# ---------------------------------------------------------------- file access


class _Files:
    """Read-only view of the bundle's files as POSIX relative paths -> bytes."""

    def __init__(self, entries: dict[str, object], reader, source: str):
        self.entries = entries  # path -> handle understood by reader
        self._reader = reader
        self.source = source

    def has(self, path: str) -> bool:
        return path in self.entries

    def read(self, path: str) -> bytes:
        return self._reader(self.entries[path])

    def listdir(self, folder: str) -> list[str]:
        pre = folder.rstrip("/") + "/"
        return sorted(p for p in self.entries if p.startswith(pre) and "/" not in p[len(pre) :])


def _open_folder(root: Path, limits: BundleLimits) -> _Files:
    entries: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        rel = p.relative_to(root).as_posix()
        size = p.stat().st_size
        if size > limits.max_file_bytes:
            raise InputTooLargeError(
                f"{rel} is {size} bytes; the limit is {limits.max_file_bytes}", details={"file": rel, "bytes": size}
            )
        entries[rel] = p
    return _Files(entries, lambda p: p.read_bytes(), str(root))


def _open_zip(path_or_bytes, limits: BundleLimits, source: str) -> _Files:
    zf, infos = open_zip(path_or_bytes, source)
    check_entries(infos, limits.archive())  # before anything is inflated
    entries: dict[str, object] = {}
    for info in infos:
        if info.is_dir():
            continue
        norm = posixpath.normpath(info.filename.replace("\\", "/"))
        parts = norm.split("/")
        if parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
            continue
        entries[norm] = info

    # A ZIP of a folder holds everything under one top-level directory: strip it.
    tops = {p.split("/")[0] for p in entries}
    if len(tops) == 1 and all("/" in p for p in entries):
        top = tops.pop() + "/"
        if any(p.startswith(top + d) for p in entries for d in (VIEWS_DIR, TRANSFORMS_FILE)):
            entries = {p[len(top) :]: i for p, i in entries.items()}

    return _Files(entries, lambda info: read_member(zf, info, limits.max_file_bytes), source)


def _open_bundle(src, limits: BundleLimits) -> _Files:
    if isinstance(src, bytes):
        return _open_zip(src, limits, "upload.zip")
    path = Path(src)
    if path.is_dir():
        return _open_folder(path, limits)
    if path.is_file():
        size = path.stat().st_size
        if size > limits.max_archive_bytes:
            raise InputTooLargeError(f"{path.name} is {size} bytes; the limit is {limits.max_archive_bytes}")
        return _open_zip(path, limits, str(path))
    raise InvalidInputError(f"no bundle at {src}", code="BUNDLE_NOT_FOUND", details={"path": str(src)})


# ---------------------------------------------------------------- images


class PixelBudget:
    """Running count of the pixels a bundle decodes, charged from each image's header before it is decoded."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.used = 0

    def charge(self, pixels: int, where: str) -> None:
        self.used += int(pixels)
        if self.used > self.limit:
            raise InputTooLargeError(
                f"decoding {where} would bring the bundle to {self.used} pixels; the limit is {self.limit} "
                "(every image counts, and a file that several frames name counts once per frame)",
                details={"file": where, "pixels": self.used, "limit": self.limit},
            )


def decode_image(data: bytes, where: str, limits: BundleLimits, budget: PixelBudget | None = None) -> np.ndarray:
    """Decode PNG/JPEG bytes to an array: (H, W) for grey, (H, W, 3|4) for colour; uint8 or uint16.

    The header is read first: the per-image limit and ``budget`` are checked before any pixel is decoded.
    """
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w <= 0 or h <= 0:
            raise InvalidImageError(f"{where} is {w}x{h} pixels", details={"file": where})
        if w * h > limits.max_image_pixels:
            raise InputTooLargeError(
                f"{where} is {w}x{h} pixels; the limit is {limits.max_image_pixels} pixels",
                details={"file": where, "width": w, "height": h},
            )
        if im.format not in ("PNG", "JPEG"):
            raise InvalidImageError(f"{where} is {im.format}, not PNG or JPEG", details={"file": where})
        if budget is not None:
            budget.charge(w * h, where)
        im.load()
    except InputTooLargeError:
        raise
    except Image.DecompressionBombError:  # Pillow's own pixel guard fires while it reads the header
        raise InputTooLargeError(
            f"{where} declares more pixels than the limit of {limits.max_image_pixels}", details={"file": where}
        ) from None
    except InvalidImageError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        MemoryError,
        zlib.error,
        struct.error,
        IndexError,
        TypeError,
    ) as e:
        raise InvalidImageError(f"{where} is not a readable image: {e}", details={"file": where}) from None
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(im, dtype=np.uint16 if im.mode != "I" else np.int32).astype(np.float32)
    if im.mode in ("L", "RGB", "RGBA"):
        return np.asarray(im)
    if im.mode in ("LA",):
        return np.asarray(im)[..., 0]
    return np.asarray(im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB"))


def _split_rgb(arr: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=-1).astype(np.uint8), None
    if arr.dtype != np.uint8:
        arr = (arr / 257.0).round().astype(np.uint8)
    if arr.shape[-1] == 4:
        alpha = arr[..., 3] >= 128
        return np.ascontiguousarray(arr[..., :3]), (alpha if not alpha.all() else None)
    return np.ascontiguousarray(arr[..., :3]), None


def _depth_channel(arr: np.ndarray) -> np.ndarray:
    """Depth stored as grey, grey+alpha or replicated RGB(A): take the first channel."""
    a = arr if arr.ndim == 2 else arr[..., 0]
    return a.astype(np.float32, copy=False)  # decode_image returns a fresh array: no second copy


# ---------------------------------------------------------------- transforms.json


#: Bounds of transforms.json numbers (every one must also be finite): (low, high), inclusive.
TRANSFORMS_BOUNDS: dict[str, tuple[float, float]] = {
    "camera_angle_x": (1e-3, math.pi - 1e-3),  # radians
    "camera_angle_y": (1e-3, math.pi - 1e-3),
    "fl_x": (1e-3, 1e6),  # pixels
    "fl_y": (1e-3, 1e6),
    "cx": (-1e6, 1e6),
    "cy": (-1e6, 1e6),
    "w": (1, 65536),  # pixels
    "h": (1, 65536),
}
#: Largest absolute value of a transform_matrix entry or a depth_encoding number.
MAX_ABS_TRANSFORMS_VALUE = 1e9


def _num(v, where: str, low: float = -MAX_ABS_TRANSFORMS_VALUE, high: float = MAX_ABS_TRANSFORMS_VALUE) -> float:
    """A finite number in [low, high]; an int too large for a float is refused like any other out-of-range value."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidTransformsError(f"{where} must be a number", details={"field": where})
    if isinstance(v, int) and not -1e300 < v < 1e300:  # float(v) would raise OverflowError
        raise InvalidTransformsError(f"{where} is out of range [{low:g}, {high:g}]", details={"field": where})
    f = float(v)
    if not math.isfinite(f):
        raise InvalidTransformsError(f"{where} must be a finite number", details={"field": where})
    if not low <= f <= high:
        raise InvalidTransformsError(
            f"{where} = {f:g} is out of range [{low:g}, {high:g}]", details={"field": where, "low": low, "high": high}
        )
    return f


def parse_json_document(data: bytes, what: str, error_cls=InvalidTransformsError):
    """JSON text -> value; bad UTF-8, bad syntax and nesting past Python's recursion limit raise ``error_cls``."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise error_cls(f"{what} is not valid JSON: {e}", details={"file": what}) from None
    except RecursionError:
        raise error_cls(f"{what} is nested too deeply", details={"file": what}) from None


def parse_transforms(data: bytes) -> dict:
    """Validate transforms.json (NeRF convention) and return its parsed content."""
    d = parse_json_document(data, TRANSFORMS_FILE)
    if not isinstance(d, dict):
        raise InvalidTransformsError("transforms.json must be a JSON object", details={"file": TRANSFORMS_FILE})
    frames = d.get("frames")
    if not isinstance(frames, list) or not frames:
        raise InvalidTransformsError("transforms.json needs a non-empty 'frames' list", details={"field": "frames"})
    if "camera_angle_x" not in d and not all(k in d for k in ("fl_x", "cx", "cy")):
        raise InvalidTransformsError(
            "transforms.json needs 'camera_angle_x', or 'fl_x', 'cx' and 'cy'", details={"field": "camera_angle_x"}
        )
    for k, (low, high) in TRANSFORMS_BOUNDS.items():
        if k in d:
            _num(d[k], k, low, high)
    for k in ("w", "h"):
        if k in d and float(d[k]) != int(d[k]):
            raise InvalidTransformsError(f"{k} must be a whole number of pixels", details={"field": k})
    if isinstance(d.get("depth_encoding"), dict):
        for k, v in d["depth_encoding"].items():
            if k != "kind":
                _num(v, f"depth_encoding.{k}")
    for i, fr in enumerate(frames):
        where = f"frames[{i}]"
        if not isinstance(fr, dict):
            raise InvalidTransformsError(f"{where} must be an object", details={"field": where})
        if not isinstance(fr.get("file_path"), str) or not fr["file_path"]:
            raise InvalidTransformsError(f"{where}.file_path must be a non-empty string", details={"field": where})
        if "depth_path" in fr and not isinstance(fr["depth_path"], str):
            raise InvalidTransformsError(f"{where}.depth_path must be a string", details={"field": where})
        m = fr.get("transform_matrix")
        try:
            M = np.asarray(m, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):  # ragged, non-numeric, an int too large for a float
            M = None
        if M is not None and M.size and np.abs(M).max(initial=0.0) > MAX_ABS_TRANSFORMS_VALUE:
            M = None
        if M is None or M.shape not in ((4, 4), (3, 4)) or not np.isfinite(M).all():
            raise InvalidTransformsError(
                f"{where}.transform_matrix must be a 4x4 (or 3x4) matrix of finite numbers",
                details={"field": f"{where}.transform_matrix"},
            )
        R = M[:3, :3]
        if not np.allclose(R.T @ R, np.eye(3), atol=1e-3) or np.linalg.det(R) < 0:
            raise InvalidTransformsError(
                f"{where}.transform_matrix must be a rigid camera-to-world transform (orthonormal rotation)",
                details={"field": f"{where}.transform_matrix"},
            )
    if "depth_encoding" in d:
        DepthEncoding.from_dict(d["depth_encoding"])
    return d


def _resolve(files: _Files, path: str, *, where: str) -> str:
    p = posixpath.normpath(path.replace("\\", "/").lstrip("./") if path.startswith("./") else path.replace("\\", "/"))
    if p.startswith("..") or p.startswith("/"):
        raise InvalidTransformsError(f"{where} {path!r} points outside the bundle", details={"field": where})
    if files.has(p):
        return p
    for suf in IMAGE_SUFFIXES:  # NeRF files often omit the extension
        if files.has(p + suf):
            return p + suf
    raise MissingViewError(f"{where} {path!r} is not in the bundle", details={"file": path})


def _intrinsics(d: dict, w: int, h: int, w0: int | None, h0: int | None) -> np.ndarray:
    """K at (w, h) from transforms.json keys stated for an image of (w0, h0) (default: the same)."""
    w0 = int(d.get("w", w0 or w))
    h0 = int(d.get("h", h0 or h))
    if "fl_x" in d:
        fx = d["fl_x"]
        fy = d.get("fl_y", fx)
        K = np.array([[fx, 0.0, d["cx"]], [0.0, fy, d["cy"]], [0.0, 0.0, 1.0]], dtype=np.float64)
    else:
        K = intrinsics_from_fov(math.degrees(d["camera_angle_x"]), w0, h0)
        if "camera_angle_y" in d:
            K[1, 1] = (h0 / 2.0) / math.tan(d["camera_angle_y"] / 2.0)
    K[0] *= w / w0
    K[1] *= h / h0
    return K


# ---------------------------------------------------------------- main entry


def load_bundle(src: str | Path | bytes, limits: BundleLimits | None = None) -> FrameSet:
    """Read a bundle folder, ZIP path or ZIP bytes into a validated :class:`FrameSet`.

    Raises an :class:`InvalidInputError` subclass for anything that breaks the contract.
    """
    limits = limits or BundleLimits()
    files = _open_bundle(src, limits)
    budget = PixelBudget(limits.max_total_pixels)
    if files.has(TRANSFORMS_FILE):
        fs = _load_posed(files, limits, budget)
    else:
        fs = _load_rig(files, limits, budget)
    fs.source = files.source
    if fs.depth_encoding is not None:
        fs.depth_encoding_source = TRANSFORMS_FILE
    if files.has(ENCODING_FILE):
        _read_encoding_file(files, fs)
    _check_consistency(fs)
    return fs


def _read_encoding_file(files: _Files, fs: FrameSet) -> None:
    """The bundle's own depth encoding from ``depth_encoding.json`` (with or without transforms.json)."""
    try:
        d = json.loads(files.read(ENCODING_FILE))
    except (ValueError, RecursionError) as e:
        raise InvalidInputError(
            f"{ENCODING_FILE} is not valid JSON: {e}", code="INVALID_TRANSFORMS", details={"file": ENCODING_FILE}
        ) from None
    enc = DepthEncoding.from_dict(d, where=ENCODING_FILE)
    if fs.depth_encoding is not None and fs.depth_encoding != enc:
        raise InvalidInputError(
            f"{ENCODING_FILE} and {TRANSFORMS_FILE} state different depth encodings",
            code="INVALID_TRANSFORMS",
            details={"file": ENCODING_FILE},
        )
    fs.depth_encoding, fs.depth_encoding_source = enc, ENCODING_FILE


def _load_rig(files: _Files, limits: BundleLimits, budget: PixelBudget) -> FrameSet:
    view_files = [p for p in files.listdir(VIEWS_DIR)]
    if not view_files:
        raise MissingViewError(
            f"the bundle has no {VIEWS_DIR}/ folder with images (and no {TRANSFORMS_FILE})",
            details={"expected": [f"{VIEWS_DIR}/{n}.png" for n in RIG_VIEW_NAMES]},
        )
    by_name: dict[str, str] = {}
    for p in view_files:
        stem, suf = posixpath.splitext(posixpath.basename(p))
        if suf.lower() not in IMAGE_SUFFIXES or stem not in RIG_VIEW_NAMES:
            raise UnknownViewError(
                f"{p} is not one of the six views {list(RIG_VIEW_NAMES)} (without transforms.json, only those names are allowed)",
                details={"file": p, "allowed": list(RIG_VIEW_NAMES)},
            )
        if stem in by_name:
            raise UnknownViewError(f"view {stem!r} appears twice ({by_name[stem]}, {p})", details={"file": p})
        by_name[stem] = p
    missing = [n for n in RIG_VIEW_NAMES if n not in by_name]
    if missing:
        raise MissingViewError(
            f"views {missing} are missing from {VIEWS_DIR}/; a bundle without transforms.json needs all six",
            details={"missing": missing},
        )
    depth_files = {posixpath.splitext(posixpath.basename(p))[0]: p for p in files.listdir(DEPTH_DIR)}
    extra = sorted(set(depth_files) - set(RIG_VIEW_NAMES))
    if extra:
        raise UnknownViewError(
            f"{DEPTH_DIR}/ has files for unknown views {extra}", details={"files": [depth_files[e] for e in extra]}
        )
    views = []
    for n in RIG_VIEW_NAMES:
        if n not in depth_files:
            raise MissingDepthError(f"view {n!r} has no depth render {DEPTH_DIR}/{n}.png", details={"view": n})
        views.append(_read_view(files, n, by_name[n], depth_files[n], limits, budget))
    return FrameSet(views=views, depth_encoding=None, cameras_given=False)


def _load_posed(files: _Files, limits: BundleLimits, budget: PixelBudget) -> FrameSet:
    d = parse_transforms(files.read(TRANSFORMS_FILE))
    frames = d["frames"]
    if len(frames) > limits.max_views:
        raise InputTooLargeError(
            f"{len(frames)} views; the limit is {limits.max_views}", details={"views": len(frames)}
        )
    views: list[View] = []
    names_seen: set[str] = set()
    for i, fr in enumerate(frames):
        rgb_path = _resolve(files, fr["file_path"], where=f"frames[{i}].file_path")
        name = posixpath.splitext(posixpath.basename(rgb_path))[0]
        if name in names_seen:
            name = f"{name}_{i}"
        names_seen.add(name)
        if "depth_path" in fr:
            depth_path = _resolve(files, fr["depth_path"], where=f"frames[{i}].depth_path")
        else:
            cand = [f"{DEPTH_DIR}/{posixpath.basename(rgb_path)}"] + [f"{DEPTH_DIR}/{name}{s}" for s in IMAGE_SUFFIXES]
            depth_path = next((c for c in cand if files.has(c)), None)
        view = _read_view(files, name, rgb_path, depth_path, limits, budget)
        w, h = view.size
        K = _intrinsics(d, w, h, None, None)
        M = np.eye(4)
        tm = np.asarray(fr["transform_matrix"], dtype=np.float64)
        M[: tm.shape[0], :] = tm
        view.camera = Camera(K=K, cam_to_world=opengl_to_opencv(M), width=w, height=h, name=name)
        views.append(view)
    enc = DepthEncoding.from_dict(d["depth_encoding"]) if "depth_encoding" in d else None
    fs = FrameSet(views=views, depth_encoding=enc, cameras_given=True)
    if not any(v.depth_raw is not None or v.alpha is not None for v in views):
        raise MissingDepthError(
            "no view has a depth render or an alpha mask; at least one is needed to find the object"
        )
    return fs


def _read_view(
    files: _Files, name: str, rgb_path: str, depth_path: str | None, limits: BundleLimits, budget: PixelBudget
) -> View:
    rgb, alpha = _split_rgb(decode_image(files.read(rgb_path), rgb_path, limits, budget), rgb_path)
    depth = None
    if depth_path is not None:
        depth = _depth_channel(decode_image(files.read(depth_path), depth_path, limits, budget))
    return View(name=name, rgb=rgb, alpha=alpha, depth_raw=depth)


def _check_consistency(fs: FrameSet) -> None:
    if len(fs.views) < 2:
        raise InsufficientViewsError(f"{len(fs.views)} view; at least 2 are needed", details={"views": len(fs.views)})
    sizes = {v.name: v.size for v in fs.views}
    if len(set(sizes.values())) > 1:
        raise ResolutionMismatchError(f"views have different resolutions: {sizes}", details={"sizes": sizes})
    dsizes = {v.name: (v.depth_raw.shape[1], v.depth_raw.shape[0]) for v in fs.views if v.depth_raw is not None}
    if len(set(dsizes.values())) > 1:
        raise ResolutionMismatchError(f"depth renders have different resolutions: {dsizes}", details={"sizes": dsizes})
    (w, h) = next(iter(sizes.values()))
    for name, (dw, dh) in dsizes.items():
        if abs(dw / dh - w / h) > 0.01:
            raise ResolutionMismatchError(
                f"depth render of {name!r} is {dw}x{dh}, not the aspect ratio of its photo {w}x{h}",
                details={"view": name},
            )
    bg = fs.depth_encoding.background if fs.depth_encoding else 0.0
    for v in fs.views:
        if v.depth_raw is not None and int((v.depth_raw != bg).sum()) < C.MIN_FOREGROUND_PIXELS:
            raise EmptyDepthError(
                f"depth render of view {v.name!r} is all background (value {bg:g})", details={"view": v.name}
            )
    if any(v.depth_raw is not None and v.depth_raw.max() > 255 for v in fs.views):
        fs.depth_max_value = 65535.0
