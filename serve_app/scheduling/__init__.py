"""The job scheduler's parts, each small and tested alone against fakes (tests/test_scheduling.py):

* :mod:`.queues` — per-model FIFOs, queue positions, wait estimates;
* :mod:`.dispatch` — one model run through a deployment handle: request, event stream, outcome;
* :mod:`.ownership` — which scheduler owns the job records (heartbeat), and the drain of in-flight runs;
* :mod:`.recovery` — what a (re)started scheduler does with each stored record;
* the terminal-state webhook with retries is :mod:`serve_app.webhooks` (address checks, signing, delivery);
* expiry of artifacts after the TTL, and of records after ``record_ttl_s``, is :mod:`serve_app.retention`
  (one module for jobs, experiments and batches).

:class:`serve_app.scheduler.JobScheduler` puts them together in the ingress replica.
"""
