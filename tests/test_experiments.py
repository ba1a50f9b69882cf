"""Experiments: overrides, spec expansion, the database and its migrations (no Ray), then a
small sweep through the real service over HTTP (one Serve app for the module).

Only the ``fusion`` model is served today, so the "two models" of the sweep are fusion with two
parameter sets (``fusion.resolution`` 64 and 96, the real pipeline at preset fast on a 128 px
procedural box with a ground-truth mesh), plus a deliberately failing run (a dataset whose
behaviour.txt makes ``test_service_runners.behaviour_runner`` raise MODEL_FAILED).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import trimesh
from PIL import Image

from pipeline.config import get_preset
from pipeline.overrides import InvalidOverridesError, apply_overrides, run_slug, validate_overrides
from pipeline.synthetic import make_shape, write_bundle
from serve_app.experiments.db import SNAPSHOT_KEY, ExperimentsDB, migrations
from serve_app.experiments.results import pareto_front, plot_png, table_rows
from serve_app.experiments.service import zip_dataset
from serve_app.experiments.spec import InvalidExperimentError, expand_spec, parse_spec_text, resolve_dataset

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- no Ray


def test_overrides_apply_with_replace_and_reject_bad_keys():
    cfg = apply_overrides(get_preset("fast"), {"resolution": 96, "texture_size": 512, "photo_refine.enabled": False})
    assert (cfg.fusion.resolution, cfg.texture.size, cfg.photo_refine.enabled) == (96, 512, False)
    assert cfg.fusion.target_faces == get_preset("fast").fusion.target_faces and cfg.preset == "fast"
    for bad, key in (
        ({"fusion.resoluton": 96}, "fusion.resoluton"),
        ({"resolution": "high"}, "resolution"),
        ({"resolution": True}, "resolution"),
        ({"preset": "fast"}, "preset"),
        ({"resolution": 64, "fusion.resolution": 96}, "fusion.resolution"),
    ):
        with pytest.raises(InvalidOverridesError) as e:
            validate_overrides(bad)
        assert e.value.code == "INVALID_OVERRIDES" and e.value.details["key"] == key
    assert run_slug("fusion", "fast", validate_overrides({"resolution": 192, "faces": 40000})) == (
        "fusion-fast-res192-faces40k"
    )


def test_spec_expands_grid_and_rejects_with_the_key(tmp_path):
    doc = parse_spec_text(
        "name: s\ndatasets: [a, b]\npresets: [fast]\ngrid:\n  fusion.resolution: [64, 96]\n"
        "runs:\n  - {dataset: a, preset: balanced, overrides: {faces: 20000}}\nrepeats: 2\n"
    )
    spec = expand_spec(
        doc, known_models=("fusion", "nvdiffrec"), served_models=["fusion"], max_runs=20, has_upload=False
    )
    assert len(spec.runs) == (2 * 2 + 1) * 2
    slugs = [r.slug for r in spec.runs]
    assert len(set(slugs)) == len(slugs) and "a/fusion-fast-res64" in slugs and "a/fusion-fast-res64-r2" in slugs
    assert "a/fusion-balanced-faces20k" in slugs

    def rejected(d: dict, **kw) -> dict:
        with pytest.raises(InvalidExperimentError) as e:
            expand_spec(
                d, known_models=("fusion", "nvdiffrec"), served_models=["fusion"], max_runs=4, has_upload=False, **kw
            )
        assert e.value.code == "INVALID_EXPERIMENT"
        return e.value.details

    base = {"datasets": ["a"], "presets": ["fast"]}
    assert rejected({**base, "grid": {"fusion.resoluton": [1]}})["key"] == "grid.fusion.resoluton"
    assert rejected({**base, "models": ["nvdiffrec"]})["key"] == "models"
    assert rejected({**base, "presets": ["ultra"]})["key"] == "presets"
    assert rejected({**base, "grid": {"texture_size": [64, 128, 256, 512, 1024]}})["key"] == "grid"
    assert rejected({**base, "gird": {}})["key"] == "gird"
    assert rejected({"datasets": ["../etc"], "presets": ["fast"]})["key"] == "datasets"
    assert rejected({**base, "runs": [{"overrides": {"texture.sise": 1}}]})["key"] == "runs[0].overrides.texture.sise"
    (tmp_path / "root" / "ok").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    assert resolve_dataset(tmp_path / "root", "ok") == (tmp_path / "root" / "ok").resolve()
    for name in ("link", "missing"):
        with pytest.raises(InvalidExperimentError):
            resolve_dataset(tmp_path / "root", name)


def test_dataset_folders_are_zipped_to_a_temporary_file_without_gt(tmp_path):
    folder = tmp_path / "ds"
    for rel in ("multi_views/front.png", "depth_renders/front.png", "gt/mesh.glb", ".hidden/x"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(rel.encode())
    path, temporary = zip_dataset(folder)
    try:
        assert temporary and Path(path).is_file() and not Path(path).is_relative_to(folder)
        with zipfile.ZipFile(path) as zf:
            assert sorted(zf.namelist()) == ["depth_renders/front.png", "multi_views/front.png"]
            assert zf.read("multi_views/front.png") == b"multi_views/front.png"
    finally:
        Path(path).unlink()
    archive = tmp_path / "ds.zip"
    archive.write_bytes(b"PK")
    assert zip_dataset(archive) == (str(archive), False)  # used where it lies, never removed


def test_db_migrations_are_recorded_and_idempotent(tmp_path):
    db = ExperimentsDB(tmp_path / "e.sqlite")
    latest = len(migrations())
    assert db.applied == list(range(1, latest + 1)) and db.schema_version() == latest
    db.create_experiment(
        {
            "experiment_id": "e1",
            "name": "n",
            "description": "",
            "status": "running",
            "spec_json": "{}",
            "bundle_key": None,
            "git_commit": None,
            "created_at": 1.0,
        },
        [
            {
                "experiment_id": "e1",
                "run_index": 0,
                "slug": "s",
                "dataset": "d",
                "model": "fusion",
                "preset": "fast",
                "overrides_json": "{}",
                "job_id": "j",
                "status": "queued",
                "created_at": 1.0,
            }
        ],
    )
    db.update_run("e1", 0, status="succeeded", psnr=20.5)
    snap = db.snapshot_bytes()
    db.close()
    again = ExperimentsDB(tmp_path / "e.sqlite")
    assert again.applied == [] and again.runs("e1")[0]["psnr"] == 20.5
    (tmp_path / "snap.sqlite").write_bytes(snap)
    assert sqlite3.connect(tmp_path / "snap.sqlite").execute("SELECT psnr FROM runs").fetchone() == (20.5,)


def test_pareto_front_and_plot():
    pts = [(10.0, 20.0), (5.0, 18.0), (20.0, 19.0), (30.0, 25.0), (5.0, 17.0)]
    assert pareto_front(pts) == [0, 1, 3]
    rows = table_rows(
        [
            {"experiment_id": "e", "dataset": "d", "model": "fusion", "slug": f"r{i}", "psnr": y, "model_s": x}
            for i, (x, y) in enumerate(pts)
        ]
        + [{"experiment_id": "e", "dataset": "d", "model": "fusion", "slug": "bad", "status": "failed"}]
    )
    assert [r["pareto"] for r in rows] == [True, True, False, True, False, False]
    img = Image.open(io.BytesIO(plot_png(rows)))
    assert img.format == "PNG" and img.size[0] > 100


# ---------------------------------------------------------------- the service over HTTP

ray = pytest.importorskip("ray")
from serve_harness import BEHAVIOUR_MODEL, serve_app  # noqa: E402
from test_service_runners import with_behaviour  # noqa: E402

from serve_app.client import experiment_main  # noqa: E402

TERMINAL = {"succeeded", "failed", "canceled"}


def _dataset(root: Path, name: str, behaviour: str, *, gt: bool) -> None:
    folder = write_bundle(root / name, "box", resolution=128, with_transforms=True)
    (folder / "behaviour.txt").write_text(behaviour)
    if gt:
        mesh = make_shape("box")
        (folder / "gt").mkdir()
        trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).export(folder / "gt" / "mesh.glb")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    _dataset(root, "box", "real", gt=True)
    _dataset(root, "boxfail", "fail", gt=False)
    store_dir = tmp_path_factory.mktemp("store")
    args = {
        "store": {"kind": "local", "path": str(store_dir)},
        "models": [BEHAVIOUR_MODEL],
        "default_preset": "fast",
        "job_timeout_s": 240,
        "fanout_num_cpus": 0.5,
        "preview_views": 1,
        "ingress_num_cpus": 0,
        "max_queued_jobs": 10,
        "experiments": {"dataset_root": str(root), "max_runs": 6, "snapshot": True, "poll_interval_s": 0.2},
    }
    with serve_app(args) as (url, _):
        yield url, store_dir


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service[0], timeout=60) as c:
        yield c


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "request_id"} and body["error"]["code"] == code, body
    return body["error"]["details"]


def _wait_experiment(client, experiment_id: str, timeout: float = 400.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exp = client.get(f"/experiments/{experiment_id}").json()
        if exp["status"] == "finished":
            return exp
        time.sleep(0.5)
    raise TimeoutError(f"experiment {experiment_id} did not finish: {exp['counts']}")


SWEEP = {
    "name": "res-sweep",
    "datasets": ["box"],
    "models": ["fusion"],
    "presets": ["fast"],
    "grid": {"fusion.resolution": [64, 96], "texture_size": [512]},
    "runs": [{"dataset": "boxfail", "model": "fusion", "preset": "fast"}],
}


@pytest.mark.serve
@pytest.mark.slow
def test_sweep_records_metrics_plot_and_a_failed_run(service, client, tmp_path, capsys):
    url, store_dir = service
    r = client.post("/experiments", json=SWEEP)
    assert r.status_code == 202, r.text
    exp_id = r.json()["experiment_id"]
    assert r.json()["runs"] == 3 and r.headers["location"] == f"/experiments/{exp_id}"
    # The upload-based second experiment (YAML + multipart) runs the quick runner meanwhile.
    box = write_bundle(tmp_path / "b.zip", "box", resolution=128, as_zip=True, with_transforms=True).read_bytes()
    yaml_spec = "name: quick\npresets: [fast]\ngrid:\n  texture_size: [256, 512]\n"
    r2 = client.post(
        "/experiments",
        files={"bundle": ("b.zip", with_behaviour(box, "quick"), "application/zip")},
        data={"spec": yaml_spec},
    )
    assert r2.status_code == 202, r2.text
    exp2 = r2.json()["experiment_id"]

    exp = _wait_experiment(client, exp_id)
    assert sum(exp["counts"].values()) == 3 and set(exp["counts"]) <= {"succeeded", "failed"}, exp
    runs = {row["slug"]: row for row in exp["runs"]}
    assert set(runs) == {"box/fusion-fast-res64-tex512", "box/fusion-fast-res96-tex512", "boxfail/fusion-fast"}
    failed = runs["boxfail/fusion-fast"]
    assert failed["status"] == "failed" and failed["error_code"] == "MODEL_FAILED" and failed["psnr"] is None

    db = sqlite3.connect(store_dir / "experiments.sqlite")
    db.row_factory = sqlite3.Row
    for slug in ("box/fusion-fast-res64-tex512", "box/fusion-fast-res96-tex512"):
        row = dict(db.execute("SELECT * FROM runs WHERE experiment_id = ? AND slug = ?", (exp_id, slug)).fetchone())
        # Real pipeline runs: QUALITY_FAILED on this 128 px box is accepted (see test_service), metrics exist either way.
        assert row["status"] == "succeeded" or row["error_code"] == "QUALITY_FAILED", row
        q = client.get(f"/jobs/{row['job_id']}/files/fusion/quality.json").json()
        for k in ("psnr", "ssim", "depth_mae", "silhouette_iou"):
            assert row[k] == pytest.approx(q[k], rel=1e-9), k
        assert row["quality_status"] == q["status"] and row["faces"] == q["mesh"]["faces"]
        params = json.loads(row["params_json"])
        assert params["fusion"]["resolution"] == int(slug.split("res")[1].split("-")[0])
        assert params["texture"]["size"] == row["texture_size"] == 512
        assert 0.0 <= row["f_score"] <= 1.0 and row["chamfer_l1"] > 0
        assert row["peak_rss_bytes"] > 10 * 2**20 and row["model_s"] > 0 and row["wall_s"] >= row["model_s"]
        assert row["model_version"] and json.loads(row["timings_json"])["reconstruct_geometry"] > 0
        assert f"experiments/{exp_id}/runs/{slug}" == row["output_prefix"]
        assert (store_dir / row["output_prefix"] / "mesh.glb").is_file()
        assert (store_dir / row["output_prefix"] / "geometry.json").is_file()
    assert db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == len(migrations())
    assert exp["pareto"] and set(exp["pareto"]) <= set(runs) - {"boxfail/fusion-fast"}

    csv_rows = list(csv.DictReader(io.StringIO(client.get(f"/experiments/{exp_id}", params={"format": "csv"}).text)))
    assert len(csv_rows) == 3 and {c["slug"] for c in csv_rows} == set(runs)
    as_accept = client.get(f"/experiments/{exp_id}", headers={"accept": "text/csv"})
    assert as_accept.headers["content-type"].startswith("text/csv")

    png = client.get(f"/experiments/{exp_id}/plot.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    Image.open(io.BytesIO(png.content)).verify()

    z = zipfile.ZipFile(io.BytesIO(client.get(f"/experiments/{exp_id}/download").content))
    assert {"results.csv", "plot.png", "runs/box/fusion-fast-res64-tex512/mesh.glb"} <= set(z.namelist())

    second = _wait_experiment(client, exp2)
    assert {r["slug"] for r in second["runs"]} == {"fusion-fast-tex256", "fusion-fast-tex512"}
    cmp = client.get("/experiments/compare", params={"ids": f"{exp_id},{exp2}"}).json()
    assert [e["experiment_id"] for e in cmp["experiments"]] == [exp_id, exp2] and len(cmp["runs"]) == 5

    capsys.readouterr()
    assert experiment_main(["show", exp_id, "--url", url]) == 0
    out = capsys.readouterr().out
    assert "box/fusion-fast-res64-tex512" in out and "MODEL_FAILED" in out and "pareto front: box/" in out

    time.sleep(2.5)  # past snapshot_interval_s: the store holds a snapshot with every row
    snap = tmp_path / "snap.sqlite"
    snap.write_bytes((store_dir / SNAPSHOT_KEY).read_bytes())
    assert sqlite3.connect(snap).execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 5


@pytest.mark.serve
def test_invalid_experiments_and_overrides_are_422_with_the_key(service, client, tmp_path, capsys):
    bad = {**SWEEP, "grid": {"fusion.resoluton": [64]}}
    assert _error(client.post("/experiments", json=bad), 422, "INVALID_EXPERIMENT")["key"] == "grid.fusion.resoluton"
    assert (
        _error(client.post("/experiments", json={**SWEEP, "datasets": ["../../etc"]}), 422, "INVALID_EXPERIMENT")["key"]
        == "datasets"
    )
    assert _error(client.post("/experiments", json={**SWEEP, "datasets": ["nope"]}), 422, "INVALID_EXPERIMENT")[
        "key"
    ] == ("datasets")
    too_many = {**SWEEP, "grid": {"texture_size": [256, 512, 1024, 2048, 4096, 128, 64]}}
    assert _error(client.post("/experiments", json=too_many), 422, "INVALID_EXPERIMENT")["key"] == "grid"
    (tmp_path / "sweep.yaml").write_text("datasets: [box]\npresets: [fast]\ngrid:\n  texture.sise: [512]\n")
    assert experiment_main([str(tmp_path / "sweep.yaml"), "--url", service[0]]) == 2
    assert "INVALID_EXPERIMENT" in capsys.readouterr().err
    r = client.post("/experiments", content=b"name: [unclosed", headers={"content-type": "application/yaml"})
    assert _error(r, 422, "INVALID_EXPERIMENT")["key"] == "spec"
    _error(client.get("/experiments/exp-0000000000000-00000000"), 404, "EXPERIMENT_NOT_FOUND")
    _error(
        client.get("/experiments/compare", params={"ids": "exp-0000000000000-00000000"}), 404, "EXPERIMENT_NOT_FOUND"
    )
    box = write_bundle(
        Path(os.environ.get("TMPDIR", "/tmp")) / f"ov-{os.getpid()}.zip", "box", resolution=64, as_zip=True
    )
    r = client.post(
        "/jobs",
        files={"bundle": ("b.zip", box.read_bytes(), "application/zip")},
        data={"overrides": json.dumps({"texture.sise": 512})},
    )
    assert _error(r, 422, "INVALID_OVERRIDES")["key"] == "texture.sise"
