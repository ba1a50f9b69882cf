"""Named defaults of the job service: uploads, queue, timeouts, drain, webhooks, retention."""

#: Largest accepted request body, bytes (413 above).
MAX_UPLOAD_BYTES = 512 * 1024 * 1024
#: Queued jobs before new submissions get 429 QUEUE_FULL.
MAX_QUEUED_JOBS = 100
#: Wall-clock limit of one model run, seconds (the job fails with JOB_TIMEOUT after it).
JOB_TIMEOUT_S = 3600.0
#: Seconds artifacts are kept after a job reaches a terminal state (then 410 JOB_EXPIRED).
ARTIFACT_TTL_S = 7 * 24 * 3600.0
#: Seconds a job record outlives its expired artifacts (serve_app/retention.py).
RECORD_TTL_S = 30 * 24 * 3600.0
#: Seconds between sweeps for expired artifacts.
SWEEP_INTERVAL_S = 300.0
#: Seconds the Retry-After header of a 429 suggests.
QUEUE_FULL_RETRY_AFTER_S = 30
#: Seconds between job-record writes for progress updates (progress is in memory in between).
PROGRESS_PERSIST_INTERVAL_S = 2.0
#: Seconds a canceled or timed-out run may take to reach its next cancel checkpoint before the job is closed anyway.
CANCEL_GRACE_S = 60.0
#: Seconds the scheduler waits for a canceled run's model to stop before it cancels the handle call
#: and ends the run as canceled (a cancel reaches a terminal state within this, well under 30 s).
CANCEL_STOP_S = 20.0
#: Seconds between Server-Sent Events keep-alive comments.
SSE_KEEPALIVE_S = 15.0
#: Seconds one webhook delivery may take.
WEBHOOK_TIMEOUT_S = 10.0
#: Seconds a draining ingress (redeploy, serve.delete) waits for in-flight runs before re-queueing them.
DRAIN_TIMEOUT_S = 30.0
#: Seconds the ingress's shutdown may take beyond the drain (saving records, canceling streams).
DRAIN_MARGIN_S = 15.0
#: Seconds between reads of the model deployments' replica counts (queue wait estimates, /health).
REPLICA_POLL_INTERVAL_S = 5.0
#: Recent run durations per model in the moving average behind estimated_wait_s.
WAIT_ESTIMATE_WINDOW = 20
#: Seconds before a job lost with its replica is dispatched again (the router drops the dead replica meanwhile).
REPLICA_LOST_RETRY_DELAY_S = 1.0
