"""The torch device a stage runs on, and its CPU thread count."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def torch_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when torch sees a GPU, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch computes on ``n`` CPU threads inside the block, then on as many as before.

    For work that runs beside another process's threads: torch's threads wait for each other
    at every operation, and a thread the other process keeps off a core holds all of them up.
    With torch's OpenMP build the count is the calling thread's: a thread already running (e.g. a
    second job of a model replica) keeps its own (``tests/test_texture.py`` checks it); a thread
    started inside the block starts with ``n``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
