"""The evaluation path in the model replica's own process, when the scheduler asks for it (``ModelRequest.evaluate``).

On a one-node cluster the scheduler asks the replica to score its mesh itself, as the CLI does
(:func:`pipeline.evaluation.evaluate_result`: quality.json, previews, contact sheet, two threads),
instead of fanning the parts out as Ray tasks (``serve_app/fanout.py``). The tasks would compete
for the same cores, and their worker processes start cold for each job (Ray stops idle workers
between jobs on a small node), so each task's worker imports the library again (measured in
docs/architecture.md). The replica has the library imported and the frames in memory.

The mesh scored is the published one (read back from the output folder, as the fan-out and the
CLI do). A failure of the evaluation itself (not a cancel) does not fail the model run: like a
fan-out whose quality task failed, it is reported as QUALITY_FAILED and the mesh files stay.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from pipeline import evaluation as EV
from pipeline.errors import CanceledError
from pipeline.quality import QUALITY_FAILED
from pipeline.result import ReconstructionResult

#: ``on_quality(quality, error)``: quality.json's summary (dict) and its error, once the report exists.
QualityFn = Callable[[dict | None, dict | None], None]


def evaluate_in_replica(
    out: Path,
    result: ReconstructionResult,
    frames,
    upload: Callable[[], bytes],
    *,
    n_previews: int = EV.PREVIEW_VIEWS,
    progress: Callable[[str, float], None],
    should_cancel: Callable[[], bool],
    on_quality: QualityFn,
) -> dict:
    """Score the mesh published in ``out``; write quality.json and previews/ there; return the evaluation.

    ``frames``: the PosedFrames the mesh was made from, or None (a runner without ``on_exported``):
    then they are prepared again from ``upload()`` with the run's config and cameras. ``n_previews``:
    preview cameras around the object.
    ``progress(stage, 1.0)`` is called as the ``evaluate`` and ``previews`` stages start (the model's
    share of the bar is full). Sets ``result.quality``, ``result.previews``, the files and the timings
    (``evaluate``, ``previews``, ``evaluate_and_previews``). Returns ``{quality, error, warnings}``
    (:attr:`deployments.protocol.ResultEvent.evaluation`). Raises CanceledError when canceled.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def run_stage(stage: str, fn, *args):
        if stage != "evaluate" and should_cancel():
            raise CanceledError("the job was canceled", details={"stage": stage})
        progress(stage, 1.0)
        t = time.perf_counter()
        value = fn(*args)
        timings[stage] = round(time.perf_counter() - t, 3)
        if stage == "evaluate":
            on_quality(*_summary(value[1]))  # the report is known before the previews are made
        return value

    if should_cancel():
        raise CanceledError("the job was canceled", details={"stage": "evaluate"})
    try:
        mesh = EV.published_mesh(lambda name: (out / name).read_bytes())
        if frames is None:
            frames = EV.frames_for_result(upload(), result)
        ev = EV.evaluate_result(mesh, frames, result, n_previews=n_previews, run=run_stage)
    except CanceledError:
        raise
    except Exception as e:  # the mesh is published all the same; the run reports why it has no quality
        error = {"code": QUALITY_FAILED, "message": f"quality.json could not be built: {_error_text(e)}"}
        on_quality(None, error)
        return {"quality": None, "error": error, "warnings": []}
    if should_cancel():
        raise CanceledError("the job was canceled", details={"stage": "previews"})
    EV.write_files(ev.files, out)
    result.quality = ev.quality
    result.previews = EV.preview_index(ev.files)
    if EV.QUALITY_FILE not in result.files:  # as the CLI lists it
        result.files.append(EV.QUALITY_FILE)
    result.timings_s.update(timings, evaluate_and_previews=round(time.perf_counter() - t0, 3))
    quality, error = _summary(ev)
    return {"quality": quality, "error": error, "warnings": list(ev.warnings)}


def _summary(ev: EV.EvaluationOutput) -> tuple[dict | None, dict | None]:
    return (asdict(ev.quality) if ev.quality is not None else None), ev.error


def _error_text(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:500]
