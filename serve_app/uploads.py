"""Uploads to disk: a job's bundle is assembled in a temporary file, never whole in memory.

Starlette spools each multipart file part to a temporary file past 1 MiB; these helpers copy
parts on from there in chunks with a running byte count against the request's upload budget
(:class:`UploadBudget`), build the bundle ZIP on disk (from a ``bundle`` upload, plus an added
``transforms.json``, or from separate ``views`` / ``depth_renders``), and hand its path to the
validator and the store. What stays in memory at once: one chunk, one image file (views), one
archive member (while a member is copied), and the decoded pixels the bundle reader's budget allows.
"""

from __future__ import annotations

import os
import tempfile
import zipfile

from pipeline.archive import check_entries, open_zip, read_member
from pipeline.bundle import BundleLimits
from pipeline.errors import InputTooLargeError

#: Bytes copied per read.
CHUNK_BYTES = 1024 * 1024


class UploadBudget:
    """Bytes a request's files may still take; InputTooLargeError (413) when spent."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.left = int(limit)

    def spend(self, n: int, what: str | None) -> None:
        self.left -= n
        if self.left < 0:
            raise InputTooLargeError(
                f"the uploaded files exceed the upload size limit of {self.limit} bytes",
                details={"file": what, "limit": self.limit},
            )


def temp_path(suffix: str = ".zip") -> str:
    fd, path = tempfile.mkstemp(prefix="recon3d-upload-", suffix=suffix)
    os.close(fd)
    return path


def copy_to_file(src, dst, budget: UploadBudget, what: str | None) -> int:
    """Copy the binary file ``src`` into the open file ``dst`` chunk by chunk; returns the bytes copied."""
    n = 0
    while chunk := src.read(CHUNK_BYTES):
        budget.spend(len(chunk), what)
        dst.write(chunk)
        n += len(chunk)
    return n


def read_small(src, budget: UploadBudget, what: str | None, cap: int) -> bytes:
    """All of a small part (an image, transforms.json): at most ``cap`` bytes, counted against the budget."""
    data = src.read(cap + 1)
    budget.spend(len(data), what)
    if len(data) > cap:
        raise InputTooLargeError(f"{what} is over {cap} bytes", details={"file": what, "limit": cap})
    return data


def spool(src, budget: UploadBudget, what: str | None) -> str:
    """A temporary file holding all of ``src`` (the caller unlinks it)."""
    path = temp_path()
    try:
        with open(path, "wb") as dst:
            copy_to_file(src, dst, budget, what)
    except BaseException:
        os.unlink(path)
        raise
    return path


def add_member(zip_path: str, name: str, content: bytes) -> str:
    """A new temporary ZIP: ``zip_path``'s members plus ``name`` (replacing one of that name, placed
    next to multi_views/ when the archive holds one top folder). Entries are checked before anything
    is inflated and members are copied one at a time through a capped read."""
    limits = BundleLimits()
    src, infos = open_zip(zip_path, "bundle")
    out_path = temp_path()
    try:
        with src:
            check_entries(infos, limits.archive())
            tops = {i.filename.split("/")[0] for i in infos}
            nested = len(tops) == 1 and all("/" in i.filename for i in infos)
            target = f"{tops.pop()}/{name}" if nested else name
            with zipfile.ZipFile(out_path, "w", zipfile.ZIP_STORED) as out:
                for info in infos:
                    if info.filename != target:
                        out.writestr(info, read_member(src, info, limits.max_file_bytes))
                out.writestr(target, content)
    except BaseException:
        os.unlink(out_path)
        raise
    return out_path


def unlink_quietly(*paths: str | None) -> None:
    for p in paths:
        if p:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
