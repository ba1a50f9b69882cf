"""JSON log lines carrying ``job_id`` (and ``request_id``) for the service loggers."""

from __future__ import annotations

import json
import logging
import time

#: LogRecord attributes copied into the JSON line when a caller passes them in ``extra=``.
CONTEXT_FIELDS = ("job_id", "request_id", "model", "stage", "status", "code", "attempt", "elapsed_s")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and the context fields that are set."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k in CONTEXT_FIELDS:
            v = getattr(record, k, None)
            if v is not None:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_json_logging(name: str = "recon3d", level: int = logging.INFO) -> logging.Logger:
    """Attach one JSON stream handler to the ``recon3d`` logger tree (idempotent)."""
    logger = logging.getLogger(name)
    logger.setLevel(level)
    if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        h = logging.StreamHandler()
        h.setFormatter(JsonFormatter())
        logger.addHandler(h)
    logger.propagate = False
    return logger


def job_logger(job_id: str, name: str = "recon3d.jobs") -> logging.LoggerAdapter:
    """A logger whose records all carry ``job_id``."""
    return logging.LoggerAdapter(logging.getLogger(name), {"job_id": job_id})
