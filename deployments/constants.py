"""Named defaults of the model deployments (the service's own are in serve_app/constants.py)."""

#: Jobs one model replica runs at once: a reconstruction saturates a GPU (or the CPUs).
MODEL_MAX_ONGOING_REQUESTS = 1
#: Seconds a draining model replica may finish its job; above the longest stage of the
#: "quality" preset on a CPU (texture baking at 4096^2 takes a few minutes there).
MODEL_GRACEFUL_SHUTDOWN_S = 600.0
#: Seconds between health checks of a model replica.
MODEL_HEALTH_CHECK_PERIOD_S = 10.0
#: Seconds one health check may take.
MODEL_HEALTH_CHECK_TIMEOUT_S = 30.0
#: Seconds between polls of the cancel flag in the store (each poll is a HEAD on S3).
CANCEL_POLL_INTERVAL_S = 0.5
