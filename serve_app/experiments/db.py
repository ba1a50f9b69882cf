"""The experiments database: SQLite, with project-owned migrations and snapshots to the store.

Schema: ``serve_app/migrations/NNNN_name.sql``, applied in order at start-up; the
``schema_version`` table records each applied version (one transaction per migration, so a
failed migration leaves the previous version intact).

Placement on a cluster: the database file lives on the ingress node (the ingress is one
replica and the only writer). After each write, :class:`ExperimentsDB` marks itself dirty and
the service copies a consistent snapshot (SQLite's online backup API) to the store key
:data:`SNAPSHOT_KEY`, at most every ``snapshot_interval_s``. When the ingress starts on a node
without the file (a new head node, a rescheduled replica), it restores the snapshot from the
store first. So the S3 store stays the durable copy, without a shared SQL server.
"""

from __future__ import annotations

import json
import re
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
#: Store key of the database snapshot.
SNAPSHOT_KEY = "experiments/experiments.sqlite"

_MIGRATION_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

#: Columns of ``runs`` a caller may set through :meth:`ExperimentsDB.update_run`.
RUN_COLUMNS = (
    "params_json",
    "job_id",
    "status",
    "error_code",
    "error_message",
    "quality_status",
    "psnr",
    "ssim",
    "psnr_full",
    "ssim_full",
    "depth_mae",
    "silhouette_iou",
    "f_score",
    "chamfer_l1",
    "geometry_json",
    "faces",
    "vertices",
    "texture_size",
    "model_s",
    "wall_s",
    "timings_json",
    "peak_rss_bytes",
    "peak_gpu_bytes",
    "model_version",
    "git_commit",
    "device",
    "output_prefix",
    "started_at",
    "finished_at",
)


def migrations(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every migration, in version order; gaps or duplicates raise."""
    found = []
    for p in sorted(directory.glob("*.sql")):
        m = _MIGRATION_RE.match(p.name)
        if m is None:
            raise ValueError(f"migration file {p.name!r} is not named NNNN_name.sql")
        found.append((int(m.group(1)), p.name, p.read_text()))
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise ValueError(f"migrations must be numbered 1..n without gaps, got {versions}")
    return found


class ExperimentsDB:
    """Thread-safe access to the SQLite file (one connection, one lock; callers use worker threads)."""

    def __init__(self, path: str | Path, *, migrations_dir: Path = MIGRATIONS_DIR):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self.dirty = False
        self.applied = self.migrate(migrations_dir)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ------------------------------------------------------------ schema

    def schema_version(self) -> int:
        with self._lock:
            return self._version()

    def _version(self) -> int:
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
        row = self._conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def migrate(self, directory: Path = MIGRATIONS_DIR) -> list[int]:
        """Apply the migrations newer than the recorded version; returns the versions applied."""
        applied = []
        with self._lock:
            current = self._version()
            for version, name, sql in migrations(directory):
                if version <= current:
                    continue
                # executescript commits first; wrap the migration and its bookkeeping in one transaction.
                self._conn.executescript(
                    f"BEGIN;\n{sql}\nINSERT INTO schema_version VALUES ({version}, '{name}', {time.time()});\nCOMMIT;"
                )
                applied.append(version)
        if applied:
            self.dirty = True
        return applied

    # ------------------------------------------------------------ writes

    def create_experiment(self, exp: dict, runs: Iterable[dict]) -> None:
        """Insert an experiment and its runs in one transaction."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN")
            try:
                cur.execute(
                    "INSERT INTO experiments (experiment_id, name, description, status, spec_json, bundle_key,"
                    " git_commit, created_at, owner) VALUES (:experiment_id, :name, :description, :status,"
                    " :spec_json, :bundle_key, :git_commit, :created_at, :owner)",
                    {"owner": None, **exp},
                )
                cur.executemany(
                    "INSERT INTO runs (experiment_id, run_index, slug, dataset, model, preset, overrides_json,"
                    " job_id, status, created_at) VALUES (:experiment_id, :run_index, :slug, :dataset, :model,"
                    " :preset, :overrides_json, :job_id, :status, :created_at)",
                    list(runs),
                )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        self.dirty = True

    def update_run(self, experiment_id: str, run_index: int, **fields: Any) -> None:
        bad = set(fields) - set(RUN_COLUMNS)
        if bad:
            raise KeyError(f"not run columns: {sorted(bad)}")
        if not fields:
            return
        sets = ", ".join(f"{k} = :{k}" for k in fields)
        with self._lock:
            self._conn.execute(
                f"UPDATE runs SET {sets} WHERE experiment_id = :_e AND run_index = :_i",
                {**fields, "_e": experiment_id, "_i": run_index},
            )
        self.dirty = True

    def finish_experiment(self, experiment_id: str, finished_at: float) -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE experiments SET status = 'finished', finished_at = ? WHERE experiment_id = ?",
                (finished_at, experiment_id),
            )
        self.dirty = True

    def mark_files_expired(self, experiment_id: str, at: float) -> None:
        """Record that the experiment's files were deleted at ``at`` (unix seconds)."""
        with self._lock:
            self._conn.execute(
                "UPDATE experiments SET files_expired_at = ? WHERE experiment_id = ?", (at, experiment_id)
            )
        self.dirty = True

    def delete_experiment(self, experiment_id: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM experiments WHERE experiment_id = ?", (experiment_id,))
        self.dirty = True

    # ------------------------------------------------------------ reads

    def experiment(self, experiment_id: str) -> dict | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM experiments WHERE experiment_id = ?", (experiment_id,)).fetchone()
        return dict(row) if row is not None else None

    def _rows(self, sql: str, params: tuple = ()) -> list[dict]:
        """The rows of one query, as dicts (under the connection's lock)."""
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        return [dict(r) for r in rows]

    def experiments(self, limit: int = 50, offset: int = 0, *, owner: str | None = None) -> list[dict]:
        """Newest first; ``owner`` keeps only that key's experiments (None: all of them)."""
        if owner is None:
            return self._rows("SELECT * FROM experiments ORDER BY created_at DESC LIMIT ? OFFSET ?", (limit, offset))
        return self._rows(
            "SELECT * FROM experiments WHERE owner = ? ORDER BY created_at DESC LIMIT ? OFFSET ?",
            (owner, limit, offset),
        )

    def ended_experiments(self) -> list[dict]:
        """``experiment_id``, ``finished_at``, ``files_expired_at`` of every finished experiment (for the TTL sweep)."""
        return self._rows(
            "SELECT experiment_id, finished_at, files_expired_at FROM experiments WHERE finished_at IS NOT NULL"
        )

    def experiment_ids(self) -> set[str]:
        return {r["experiment_id"] for r in self._rows("SELECT experiment_id FROM experiments")}

    def runs(self, experiment_id: str) -> list[dict]:
        return self._rows("SELECT * FROM runs WHERE experiment_id = ? ORDER BY run_index", (experiment_id,))

    def open_runs(self) -> list[dict]:
        """Runs not yet in a terminal state (to watch again after a restart)."""
        return self._rows("SELECT * FROM runs WHERE status IN ('queued', 'running') ORDER BY experiment_id, run_index")

    # ------------------------------------------------------------ snapshots

    def snapshot_bytes(self) -> bytes:
        """A consistent copy of the whole database (SQLite online backup), as bytes."""
        with tempfile.TemporaryDirectory(prefix="recon3d-db-") as tmp:
            dst_path = Path(tmp) / "snapshot.sqlite"
            dst = sqlite3.connect(dst_path)
            try:
                with self._lock:
                    self.dirty = False
                    self._conn.backup(dst)
            finally:
                dst.close()
            return dst_path.read_bytes()


def restore_snapshot(path: str | Path, data: bytes) -> None:
    """Write a snapshot as the database file at ``path`` (only when no file is there)."""
    p = Path(path)
    if p.exists():
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".restore")
    tmp.write_bytes(data)
    tmp.replace(p)


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
