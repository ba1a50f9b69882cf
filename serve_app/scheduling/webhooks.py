"""The webhook of a job's terminal state: one JSON POST, retried with a doubling delay."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from .. import constants as SC
from ..jobs import JobRecord


def webhook_body(rec: JobRecord) -> dict:
    """What the webhook POSTs: status, error, each model's status and quality, links."""
    return {
        "job_id": rec.job_id,
        "status": rec.status,
        "error": rec.error.model_dump() if rec.error else None,
        "models": {m: {"status": r.status, "quality": r.quality} for m, r in rec.runs.items()},
        "links": {"self": f"/jobs/{rec.job_id}", "download": f"/jobs/{rec.job_id}/download"},
    }


async def deliver_webhook(
    rec: JobRecord,
    *,
    attempts: int,
    backoff_s: float,
    client_factory: Callable[[], httpx.AsyncClient] | None = None,
    sleep=asyncio.sleep,
) -> bool:
    """POST :func:`webhook_body` to ``rec.webhook.url`` until a 2xx or ``attempts`` tries; updates ``rec.webhook``.

    Returns whether it was delivered. ``client_factory`` builds the HTTP client (tests pass one
    over an ``httpx.MockTransport``).
    """
    wh = rec.webhook
    body = webhook_body(rec)
    delay = backoff_s
    factory = client_factory or (lambda: httpx.AsyncClient(timeout=SC.WEBHOOK_TIMEOUT_S))
    async with factory() as client:
        while wh.attempts < attempts and not wh.delivered:
            wh.attempts += 1
            try:
                r = await client.post(wh.url, json=body, headers={"x-recon3d-event": "job." + rec.status})
                if r.status_code < 300:
                    wh.delivered = True
                    wh.last_error = None
                    break
                wh.last_error = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                wh.last_error = f"{type(e).__name__}: {e}"
            await sleep(delay)
            delay *= 2
    return wh.delivered
