"""The torch device a stage runs on."""

from __future__ import annotations

import torch


def torch_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when torch sees a GPU, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
