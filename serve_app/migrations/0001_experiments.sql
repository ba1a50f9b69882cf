-- Experiments and their runs. One row per run; metrics are NULL until the run ends
-- (and stay NULL when it failed before quality.json existed).
CREATE TABLE experiments (
    experiment_id TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    description   TEXT NOT NULL DEFAULT '',
    status        TEXT NOT NULL,            -- running | finished
    spec_json     TEXT NOT NULL,            -- the submitted spec, as JSON
    bundle_key    TEXT,                     -- store key of an uploaded bundle (NULL: datasets)
    git_commit    TEXT,                     -- commit of the service that ran it
    created_at    REAL NOT NULL,            -- unix seconds
    finished_at   REAL
);

CREATE TABLE runs (
    experiment_id      TEXT NOT NULL REFERENCES experiments (experiment_id) ON DELETE CASCADE,
    run_index          INTEGER NOT NULL,
    slug               TEXT NOT NULL,       -- <dataset>/<model>-<preset>-res192-faces40k ...
    dataset            TEXT NOT NULL,
    model              TEXT NOT NULL,
    preset             TEXT NOT NULL,
    overrides_json     TEXT NOT NULL,       -- canonical dotted keys -> values
    params_json        TEXT,                -- the full ReconstructConfig the model ran with
    job_id             TEXT,
    status             TEXT NOT NULL,       -- queued | running | succeeded | failed | canceled
    error_code         TEXT,
    error_message      TEXT,
    quality_status     TEXT,                -- normal | warning | failure (quality.json)
    psnr               REAL,                -- dB, masked, mean over views
    ssim               REAL,
    psnr_full          REAL,
    ssim_full          REAL,
    depth_mae          REAL,                -- scene units
    silhouette_iou     REAL,
    f_score            REAL,                -- vs gt/mesh.glb when the dataset has one
    chamfer_l1         REAL,                -- scene units
    geometry_json      TEXT,                -- every geometry metric
    faces              INTEGER,
    vertices           INTEGER,
    texture_size       INTEGER,
    model_s            REAL,                -- the model's own stage time (result.json timings_s.total)
    wall_s             REAL,                -- dispatch to end, fan-out included
    timings_json       TEXT,                -- seconds per stage
    peak_rss_bytes     INTEGER,             -- peak resident memory of the model replica during the run
    peak_gpu_bytes     INTEGER,             -- torch.cuda.max_memory_allocated (NULL on CPU)
    model_version      TEXT,                -- recon3d version of the model replica
    git_commit         TEXT,
    device             TEXT,
    output_prefix      TEXT,                -- store prefix of the run's copied outputs
    created_at         REAL NOT NULL,
    started_at         REAL,
    finished_at        REAL,
    PRIMARY KEY (experiment_id, run_index),
    UNIQUE (experiment_id, slug)
);

CREATE INDEX runs_by_job ON runs (job_id);
CREATE INDEX runs_by_status ON runs (status);
