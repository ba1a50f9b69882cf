"""Serve custom metrics of the job service (exported with Ray's Prometheus metrics).

* ``recon3d_jobs_total{model, outcome}`` — jobs that reached a terminal state;
* ``recon3d_jobs_submitted_total`` — accepted submissions;
* ``recon3d_stage_duration_s{model, stage}`` — pipeline stage durations;
* ``recon3d_job_duration_s{model, outcome}`` — queued-to-terminal time per model run;
* ``recon3d_queue_depth`` — jobs waiting for a model replica.

Built inside a replica (``ray.serve.metrics`` tags each series with deployment and replica).
"""

from __future__ import annotations

from ray.serve import metrics as serve_metrics

#: Histogram buckets of stage and job durations, seconds.
DURATION_BUCKETS_S = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]


class ServiceMetrics:
    """The ingress's metrics, one object per replica."""

    def __init__(self):
        self.jobs = serve_metrics.Counter(
            "recon3d_jobs_total", description="Model runs that reached a terminal state.", tag_keys=("model", "outcome")
        )
        self.submitted = serve_metrics.Counter("recon3d_jobs_submitted_total", description="Accepted job submissions.")
        self.stage_duration = serve_metrics.Histogram(
            "recon3d_stage_duration_s",
            description="Pipeline stage duration, seconds.",
            boundaries=DURATION_BUCKETS_S,
            tag_keys=("model", "stage"),
        )
        self.job_duration = serve_metrics.Histogram(
            "recon3d_job_duration_s",
            description="Model run duration from dispatch to terminal state, seconds.",
            boundaries=DURATION_BUCKETS_S,
            tag_keys=("model", "outcome"),
        )
        self.queue_depth = serve_metrics.Gauge("recon3d_queue_depth", description="Jobs waiting for a model replica.")

    def job_finished(self, model: str, outcome: str, duration_s: float, timings: dict[str, float] | None) -> None:
        self.jobs.inc(tags={"model": model, "outcome": outcome})
        self.job_duration.observe(max(duration_s, 0.0), tags={"model": model, "outcome": outcome})
        for stage, t in (timings or {}).items():
            if stage != "total" and isinstance(t, (int, float)):
                self.stage_duration.observe(float(t), tags={"model": model, "stage": stage})
