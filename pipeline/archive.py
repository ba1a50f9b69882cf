"""ZIP archives read safely: every entry is checked before anything is inflated.

One module for every path that opens an uploaded ZIP (bundles, a bundle with an added
``transforms.json``, archives of bundles): :func:`open_zip` reads the central directory,
:func:`check_entries` refuses too many entries, unsafe names, members stored with a
compression method zipfile cannot inflate, members whose declared size or compression ratio
is over the limits, and archives whose declared total is over the limit;
:func:`read_member` inflates one member with a hard cap, so a member that lies about its
size in the directory still stops at the cap. Corrupt deflate streams and bad
CRCs become :class:`~pipeline.errors.InvalidArchiveError`.
"""

from __future__ import annotations

import io
import posixpath
import zipfile
import zlib
from dataclasses import dataclass

from . import constants as C
from .errors import InputTooLargeError, InvalidArchiveError, UnsafeArchiveError

#: Members below this size are never refused for their ratio (a tiny JSON compresses well).
RATIO_EXEMPT_BYTES = 1024 * 1024
#: Compression methods zipfile can inflate; a member with another is refused before reading.
READABLE_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA})
#: Exceptions that a damaged archive raises while its directory or a member is read.
ZIP_READ_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    OSError,
    EOFError,
    ValueError,
    RuntimeError,
    UnicodeDecodeError,
)


@dataclass(frozen=True)
class ArchiveLimits:
    """What one archive may hold. Sizes are the sizes declared in the ZIP directory, in bytes."""

    max_entries: int = C.MAX_ZIP_ENTRIES
    max_member_bytes: int = C.MAX_FILE_BYTES
    max_total_bytes: int = C.MAX_ARCHIVE_UNCOMPRESSED_BYTES
    max_ratio: float = C.MAX_ZIP_RATIO


def open_zip(src, source: str = "upload.zip") -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """(ZipFile, its entries) of bytes, a path or a binary file; InvalidArchiveError when unreadable."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
        return zf, zf.infolist()
    except ZIP_READ_ERRORS as e:
        raise InvalidArchiveError(f"{source} is not a readable ZIP archive: {e}", details={"file": source}) from None


def unsafe_name(name: str) -> bool:
    """True for a member name that is absolute, climbs with ``..``, names a drive, or holds a NUL."""
    name = name.replace("\\", "/")
    norm = posixpath.normpath(name) if name else ""
    return (
        not name
        or "\x00" in name
        or name.startswith("/")
        or norm == ".."
        or norm.startswith("../")
        or "/../" in f"/{name}/"
        or (len(name) > 1 and name[1] == ":")
    )


def check_entries(infos: list[zipfile.ZipInfo], limits: ArchiveLimits) -> int:
    """Refuse the archive before inflating anything; returns the declared total of its files (bytes).

    Raises InputTooLargeError (count, member size, total) or UnsafeArchiveError (names, ratio).
    """
    if len(infos) > limits.max_entries:
        raise InputTooLargeError(
            f"the archive has {len(infos)} entries; the limit is {limits.max_entries}",
            details={"entries": len(infos), "limit": limits.max_entries},
        )
    total = 0
    for info in infos:
        name = info.filename
        if unsafe_name(name):
            raise UnsafeArchiveError(f"archive entry {name!r} escapes the archive's folder", details={"file": name})
        if info.is_dir():
            continue
        if info.compress_type not in READABLE_METHODS:
            raise InvalidArchiveError(
                f"{name} is stored with compression method {info.compress_type}, which cannot be read; "
                "use deflate or store",
                details={"file": name, "compression_method": info.compress_type},
            )
        if info.file_size > limits.max_member_bytes:
            raise InputTooLargeError(
                f"{name} expands to {info.file_size} bytes; the limit is {limits.max_member_bytes}",
                details={"file": name, "bytes": info.file_size, "limit": limits.max_member_bytes},
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > limits.max_ratio and info.file_size > RATIO_EXEMPT_BYTES:
            raise UnsafeArchiveError(
                f"{name} expands {ratio:.0f}x; the limit is {limits.max_ratio:.0f}x",
                details={"file": name, "ratio": round(ratio, 1), "limit": limits.max_ratio},
            )
        total += info.file_size
        if total > limits.max_total_bytes:
            raise InputTooLargeError(
                f"the archive expands to more than {limits.max_total_bytes} bytes",
                details={"bytes": total, "limit": limits.max_total_bytes},
            )
    return total


def copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dst, max_bytes: int, chunk: int = 1 << 20) -> int:
    """Inflate one member into the open binary file ``dst`` in chunks, never past ``max_bytes``; returns its size."""
    n = 0
    try:
        with zf.open(info) as f:
            while block := f.read(chunk):
                n += len(block)
                if n > max_bytes:
                    raise InputTooLargeError(
                        f"{info.filename} inflates past {max_bytes} bytes",
                        details={"file": info.filename, "limit": max_bytes},
                    )
                dst.write(block)
    except ZIP_READ_ERRORS as e:
        raise InvalidArchiveError(
            f"cannot read {info.filename} from the archive: {e}", details={"file": info.filename}
        ) from None
    return n


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, max_bytes: int) -> bytes:
    """Inflate one member, never more than ``max_bytes`` (+1 to detect a lying directory).

    Raises InvalidArchiveError for a corrupt stream or CRC, InputTooLargeError past the cap.
    """
    try:
        with zf.open(info) as f:
            data = f.read(max_bytes + 1)
    except ZIP_READ_ERRORS as e:
        raise InvalidArchiveError(
            f"cannot read {info.filename} from the archive: {e}", details={"file": info.filename}
        ) from None
    if len(data) > max_bytes:
        raise InputTooLargeError(
            f"{info.filename} inflates past {max_bytes} bytes", details={"file": info.filename, "limit": max_bytes}
        )
    return data
