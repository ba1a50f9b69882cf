"""Experiments: parameter sweeps run as ordinary jobs, with their metrics in a SQL database.

* :mod:`.overrides` — validate ``{"fusion.resolution": 160}`` against pipeline.config's frozen
  dataclasses and apply them with ``dataclasses.replace`` (no Ray, no FastAPI);
* :mod:`.spec` — the experiment spec (JSON or YAML) and its expansion into runs;
* :mod:`.db` — the SQLite database, its migrations and snapshots to the store;
* :mod:`.results` — metrics of a finished run, the Pareto front, CSV and the PNG plot;
* :mod:`.service` / :mod:`.router` — the ingress side: submission, the watcher, HTTP routes.
"""
