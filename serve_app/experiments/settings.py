"""Service settings of experiments and batches (``experiments:`` and ``batches:`` in AppArgs)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

#: Files of a finished run copied to ``experiments/<id>/runs/<slug>/`` (they outlive the job's TTL).
DEFAULT_COPY_FILES = ("mesh.glb", "quality.json", "result.json")


class ExperimentsSettings(BaseModel):
    """Parameter sweeps (POST /experiments) and their SQLite metrics database."""

    model_config = ConfigDict(extra="forbid")

    dataset_root: str | None = Field(
        None,
        description="Server-side folder of dataset bundles that specs may name (`datasets: [spot]`); "
        "names that escape it are refused. None: only uploaded bundles.",
    )
    db_path: str | None = Field(
        None,
        description="SQLite file on the ingress node. None: <store.path>/experiments.sqlite for a local store, "
        "<tmp>/recon3d/experiments.sqlite for S3 (restored from the store's snapshot at start-up).",
    )
    snapshot: bool | None = Field(
        None,
        description="Copy a snapshot of the database to the store (experiments/experiments.sqlite) after writes. "
        "None: on for the S3 store, off for a local store (the file is in the store's folder already).",
    )
    snapshot_interval_s: float = Field(2.0, ge=0, description="Least seconds between two snapshots.")
    max_runs: int = Field(64, ge=1, description="Runs one experiment may expand to (422 INVALID_EXPERIMENT above).")
    poll_interval_s: float = Field(0.5, gt=0, description="Seconds between checks of the runs' jobs.")
    copy_files: list[str] = Field(
        default_factory=lambda: list(DEFAULT_COPY_FILES),
        description="Files of each finished run copied under experiments/<id>/runs/<slug>/.",
    )
    geometry_metrics: bool = Field(
        True, description="F-score and Chamfer against <dataset>/gt/mesh.glb when the dataset has one."
    )
    git_commit: str | None = Field(
        None, description="Commit recorded with each run. None: $RECON3D_GIT_COMMIT, else `git rev-parse HEAD`."
    )


class BatchSettings(BaseModel):
    """Many bundles in one request (POST /batches)."""

    model_config = ConfigDict(extra="forbid")

    max_items: int = Field(32, ge=1, description="Bundles per batch (413 BATCH_TOO_LARGE above).")
