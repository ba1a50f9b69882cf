"""The callback types every stage accepts.

``progress(stage, fraction)`` reports a stage's progress in [0, 1]; ``should_cancel()``
returns True once the caller wants the run stopped (the stage then raises
:class:`~pipeline.errors.CanceledError` at its next checkpoint).
"""

from collections.abc import Callable

ProgressFn = Callable[[str, float], None]
CancelFn = Callable[[], bool]
