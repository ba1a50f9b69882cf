"""Runner of the simulated-cluster tests and bench/multinode.py (imported by Ray workers).

``behaviour.txt`` = ``sleep:<seconds>`` makes the model "work" that long (cancellable,
with progress) and then write the ground-truth box; anything else is delegated to
:func:`test_service_runners.behaviour_runner`. Stays free of pytest.
"""

from __future__ import annotations

import json
from pathlib import Path

from test_service_runners import _behaviour, _work, behaviour_runner, write_mesh_files

from pipeline.synthetic import make_shape


def cluster_runner(src, out_dir, *, model="fusion", preset="fast", progress=None, should_cancel=None, **kw) -> dict:
    b = _behaviour(src)
    if not b.startswith("sleep:"):
        return behaviour_runner(
            src, out_dir, model=model, preset=preset, progress=progress, should_cancel=should_cancel, **kw
        )
    import ray

    _work(float(b.split(":", 1)[1]), progress, should_cancel)
    files = write_mesh_files(make_shape("box"), Path(out_dir))
    result = {
        "model": model,
        "preset": preset,
        "timings_s": {"reconstruct_geometry": float(b.split(":", 1)[1])},
        "files": files,
        "warnings": [f"node:{ray.get_runtime_context().get_node_id()}"],
    }
    (Path(out_dir) / "result.json").write_text(json.dumps(result))
    return result
