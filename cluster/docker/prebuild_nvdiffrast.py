"""Compile nvdiffrast's CUDA plugin at image build time, when no GPU is visible.

nvdiffrast.torch compiles its plugin on first use with ``torch.utils.cpp_extension.load``
(into ``$TORCH_EXTENSIONS_DIR``). Its loader sets ``TORCH_CUDA_ARCH_LIST=''`` itself, so
torch derives the ``-gencode`` flags from the visible GPUs; at runtime ninja reuses the
prebuilt objects only when the regenerated build file has the same flags. Without a GPU
there is nothing to detect, so this script reports ``GPU_CC`` (e.g. 9.0 for H100, 8.6
for A10G) as the one visible device while the plugin builds; nvcc itself needs no device.
A GPU of another compute capability recompiles once at first use (about a minute).

    GPU_CC=8.6 python prebuild_nvdiffrast.py
"""

from __future__ import annotations

import os
import sys

import torch


def main() -> int:
    major, minor = (int(x) for x in os.environ.get("GPU_CC", "9.0").split("."))
    if not torch.version.cuda:
        print("this torch build has no CUDA: nothing to prebuild", file=sys.stderr)
        return 1
    # Present one device of the target capability to torch's arch detection.
    torch.cuda.device_count = lambda: 1
    torch.cuda.get_device_capability = lambda device=None: (major, minor)
    import nvdiffrast.torch.ops as ops

    plugin = ops._get_plugin(gl=False)
    print(f"built {plugin.__name__} for sm_{major}{minor} in {os.environ.get('TORCH_EXTENSIONS_DIR', '~/.cache')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
