"""The callback types every stage accepts.

``progress(stage, fraction)`` reports a stage's progress in [0, 1]; ``should_cancel()``
returns True once the caller wants the run stopped (the stage then raises
:class:`~pipeline.errors.CanceledError` at its next checkpoint). ``on_exported(frames, out_dir)``
is called once the mesh files are in the output folder, with the frames the mesh was made
from, so a caller can start evaluating it before the run returns.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

ProgressFn = Callable[[str, float], None]
CancelFn = Callable[[], bool]
ExportedFn = Callable[[Any, Path], None]
"""(PosedFrames, output folder) -> None."""
