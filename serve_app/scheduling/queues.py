"""Per-model FIFOs of job ids, queue positions and ``estimated_wait_s``."""

from __future__ import annotations

import asyncio
import collections

from .. import constants as SC


class JobQueues:
    """One FIFO per model, woken by :meth:`push`; durations and replica counts behind the wait estimate."""

    def __init__(self, models: list[str]):
        self.queues: dict[str, collections.deque[str]] = {m: collections.deque() for m in models}
        self._wake: dict[str, asyncio.Condition] = {}
        #: model -> recent run durations (dispatch to terminal), seconds.
        self.durations: dict[str, collections.deque[float]] = {
            m: collections.deque(maxlen=SC.WAIT_ESTIMATE_WINDOW) for m in models
        }
        #: model -> RUNNING replicas at the last poll (None = unknown, e.g. outside Serve).
        self.replicas: dict[str, int | None] = {m: None for m in models}
        #: (job id, model) of runs dispatched to a handle (running on a replica or waiting for one).
        self.in_flight_keys: set[tuple[str, str]] = set()

    def _cond(self, model: str) -> asyncio.Condition:
        # Made on first use, inside the running event loop.
        if model not in self._wake:
            self._wake[model] = asyncio.Condition()
        return self._wake[model]

    async def push(self, model: str, job_id: str, *, front: bool = False) -> None:
        q = self.queues[model]
        q.appendleft(job_id) if front else q.append(job_id)
        async with self._cond(model):
            self._cond(model).notify()

    async def pop(self, model: str) -> str:
        """The next job id of ``model``'s queue (waits for one)."""
        q = self.queues[model]
        cond = self._cond(model)
        async with cond:
            await cond.wait_for(lambda: bool(q))
            return q.popleft()

    def remove(self, model: str, job_id: str) -> None:
        if job_id in self.queues[model]:
            self.queues[model].remove(job_id)

    def position(self, job_id: str) -> int | None:
        """0-based place in the earliest queue holding the job, or None when not queued."""
        pos = [q.index(job_id) for q in self.queues.values() if job_id in q]
        return min(pos) if pos else None

    def in_flight(self, model: str) -> int:
        return sum(1 for (_, m) in self.in_flight_keys if m == model)

    def record_duration(self, model: str, seconds: float) -> None:
        self.durations.setdefault(model, collections.deque(maxlen=SC.WAIT_ESTIMATE_WINDOW)).append(seconds)

    def mean_duration_s(self, model: str) -> float | None:
        d = self.durations.get(model)
        return sum(d) / len(d) if d else None

    def estimated_wait_s(self, job_id: str) -> float | None:
        """Seconds until a queued job starts, roughly; None when not queued or nothing has run yet.

        ``mean recent run duration x (jobs ahead in the queue + runs in flight) / replicas``,
        for the model queue where the job is furthest back; replicas = the model's RUNNING
        replicas (at least 1: a scaled-to-zero model is assumed to get one).
        """
        best: float | None = None
        for m, q in self.queues.items():
            if job_id not in q:
                continue
            mean = self.mean_duration_s(m)
            if mean is None:
                return None
            ahead = q.index(job_id) + self.in_flight(m)
            wait = mean * ahead / max(self.replicas.get(m) or 1, 1)
            best = wait if best is None else max(best, wait)
        return None if best is None else round(best, 1)
