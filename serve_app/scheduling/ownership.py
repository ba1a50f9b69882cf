"""Which scheduler owns the job records, and the drain of a scheduler that goes.

One scheduler owns the records at a time (``scheduler/owner.json``, heartbeated). A new
ingress waits for the old one to release it (or for its heartbeat to go stale) before it
recovers; on redeploy/delete the old ingress drains: in-flight runs get a time to finish,
the rest are canceled (and saved as queued by their run), then ownership is released.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from deployments.store import Store

logger = logging.getLogger("recon3d.scheduler")

#: Store key of the scheduler ownership record.
OWNER_KEY = "scheduler/owner.json"
#: Seconds between ownership heartbeats; an owner silent for OWNER_STALE_AFTER_S is presumed dead.
OWNER_HEARTBEAT_S = 5.0
OWNER_STALE_AFTER_S = 3 * OWNER_HEARTBEAT_S


class Ownership:
    """This scheduler's claim on the job records."""

    def __init__(self, store: Store, owner_id: str | None = None, *, stale_after_s: float = OWNER_STALE_AFTER_S):
        self.store = store
        self.owner_id = owner_id or uuid.uuid4().hex
        self.stale_after_s = stale_after_s

    def read(self) -> dict | None:
        try:
            return json.loads(self.store.get(OWNER_KEY))
        except (KeyError, ValueError):
            return None

    def write(self, *, released: bool = False) -> None:
        doc = {"id": self.owner_id, "heartbeat": time.time(), "released": released}
        self.store.put(OWNER_KEY, json.dumps(doc).encode())

    def free(self, cur: dict | None) -> bool:
        """Whether the record ``cur`` lets this scheduler take over (none, released, ours, or stale)."""
        if cur is None or cur.get("released") or cur.get("id") == self.owner_id:
            return True
        if time.time() - float(cur.get("heartbeat", 0)) > self.stale_after_s:
            logger.warning("taking over from scheduler %s: its heartbeat is stale", cur.get("id"))
            return True
        return False

    async def acquire(self, timeout_s: float, *, poll_s: float = 0.5) -> None:
        """Wait (at most ``timeout_s``) until no other live scheduler owns the records, then take them."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.free(await asyncio.to_thread(self.read)):
                break
            await asyncio.sleep(poll_s)
        else:
            logger.warning("the previous scheduler did not release the job records in time; taking over")
        await asyncio.to_thread(self.write)

    async def beat(self) -> bool:
        """One heartbeat; False when another scheduler took over (this one must stop dispatching)."""
        cur = await asyncio.to_thread(self.read)
        if cur is not None and cur.get("id") != self.owner_id:
            return False
        await asyncio.to_thread(self.write)
        return True

    async def release(self) -> None:
        """Mark the records released, unless a newer scheduler already holds them."""
        cur = await asyncio.to_thread(self.read)
        if cur is None or cur.get("id") == self.owner_id:
            await asyncio.to_thread(self.write, released=True)


async def drain_tasks(tasks: list[asyncio.Task], timeout_s: float, cancel_wait_s: float) -> tuple[int, int]:
    """Let ``tasks`` finish for ``timeout_s``, then cancel the rest (waiting up to ``cancel_wait_s``
    for them to save their runs). Returns (finished, canceled)."""
    if not tasks:
        return 0, 0
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=cancel_wait_s)
    return len(done), len(pending)
