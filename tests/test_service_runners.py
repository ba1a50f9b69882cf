"""Runners injected into the fusion deployment by the service tests (``runner=`` hook).

Imported by Ray workers (tests/ is on their PYTHONPATH), so it stays free of pytest.
:func:`behaviour_runner` has reconstruct_bundle's signature and picks what to do from a
``behaviour.txt`` at the root of the uploaded ZIP (the bundle reader ignores that file):

* ``real``    — the library's reconstruct_bundle;
* ``quick``   — (default) writes the ground-truth box (vertex colours), in ~0.5 s;
* ``slow``    — like quick after ~40 s of cancellable "work" (for cancel/restart tests);
* ``hang``    — cancellable work for 120 s (for the job timeout);
* ``stubborn`` — 25 s of work that never looks at the cancel flag, then quick (a model stuck
  between checkpoints: the scheduler must end a cancel without it, the replica must wait for it);
* ``fail``    — raises ReconstructionFailedError (MODEL_FAILED);
* ``oom``     — raises MemoryError (MODEL_OOM);
* ``badmesh`` — writes a small sphere far from the object (quality.json status failure).
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from pipeline.errors import CanceledError, ReconstructionFailedError
from pipeline.mesh import TexturedMesh
from pipeline.synthetic import checker_texture, make_shape

BEHAVIOUR_FILE = "behaviour.txt"
#: Seconds the ``stubborn`` behaviour works without a cancel checkpoint.
STUBBORN_S = 25.0


def with_behaviour(zip_bytes: bytes, behaviour: str) -> bytes:
    """A copy of a bundle ZIP with behaviour.txt added."""
    src = zipfile.ZipFile(io.BytesIO(zip_bytes))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for info in src.infolist():
            out.writestr(info, src.read(info))
        out.writestr(BEHAVIOUR_FILE, behaviour)
    return buf.getvalue()


def _behaviour(src) -> str:
    try:
        zf = zipfile.ZipFile(io.BytesIO(src) if isinstance(src, bytes) else src)
        return zf.read(BEHAVIOUR_FILE).decode().strip()
    except (KeyError, zipfile.BadZipFile, OSError):
        return "quick"


def write_mesh_files(mesh: TexturedMesh, out: Path) -> list[str]:
    """mesh.obj (vertex colours, as the ground truth was rendered) + material.mtl + texture_kd.png + mesh.glb."""
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(checker_texture(64)).save(out / "texture_kd.png")
    (out / "material.mtl").write_text("newmtl material_0\nKd 1 1 1\nmap_Kd texture_kd.png\n")
    rgb = mesh.vertex_colors.astype(np.float64) / 255.0
    lines = [
        f"v {x:.6f} {y:.6f} {z:.6f} {r:.4f} {g:.4f} {b:.4f}"
        for (x, y, z), (r, g, b) in zip(mesh.vertices, rgb, strict=True)
    ]
    lines += [f"f {a} {b} {c}" for a, b, c in mesh.faces + 1]  # no mtllib: loaders keep the vertex colours
    (out / "mesh.obj").write_text("\n".join(lines) + "\n")
    trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_colors=mesh.vertex_colors, process=False).export(out / "mesh.glb")
    return ["mesh.obj", "material.mtl", "texture_kd.png", "mesh.glb"]


def _work(seconds: float, progress, should_cancel) -> None:
    t0 = time.monotonic()
    while (elapsed := time.monotonic() - t0) < seconds:
        if should_cancel is not None and should_cancel():
            raise CanceledError("the job was canceled")
        if progress is not None:
            progress("reconstruct_geometry", 0.9 * elapsed / seconds)
        time.sleep(0.1)


def behaviour_runner(src, out_dir, *, model="fusion", preset="fast", progress=None, should_cancel=None, **kw) -> dict:
    b = _behaviour(src)
    if b == "real":
        from pipeline.reconstruct import reconstruct_bundle

        return reconstruct_bundle(
            src, out_dir, model=model, preset=preset, progress=progress, should_cancel=should_cancel, **kw
        )
    if b == "fail":
        raise ReconstructionFailedError("fusion produced no surface", details={"stage": "reconstruct_geometry"})
    if b == "oom":
        raise MemoryError("cannot allocate 12 GiB for the TSDF volume")
    if b == "stubborn":
        _work(STUBBORN_S, progress, None)
    _work({"slow": 40.0, "hang": 120.0}.get(b, 0.3), progress, should_cancel)
    mesh = make_shape("box")
    if b == "badmesh":
        mesh = make_shape("sphere")
        mesh.vertices = (mesh.vertices * 0.15 + np.array([0.3, 0.3, 0.0])).astype(np.float32)
    files = write_mesh_files(mesh, Path(out_dir))
    if progress is not None:
        progress("export", 1.0)
    result = {
        "model": model,
        "preset": preset,
        "timings_s": {"reconstruct_geometry": 0.3},
        "files": files,
        "warnings": [],
    }
    (Path(out_dir) / "result.json").write_text(json.dumps(result))
    return result
