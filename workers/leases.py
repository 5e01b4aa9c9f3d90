"""The jobs a worker process holds, and the thread that keeps their heartbeat fresh.

See ``pacs_agent.scheduling.leases`` for the lease itself (claim token, heartbeat, fence). A job
whose guarded heartbeat finds it no longer this worker's (taken back by the agent or an operator,
or claimed by another worker after a pause) is dropped and reported lost; the worker's next
fenced write discards its work.
"""

from __future__ import annotations

import logging
import threading

from pacs_agent.db.session import Database
from pacs_agent.scheduling.leases import Token, fence

log = logging.getLogger(__name__)


class JobLeases:
    def __init__(self, db: Database, every_s: float) -> None:
        self.db = db
        self.every_s = every_s
        self._held: dict[int, Token] = {}
        self._lost: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, token: Token) -> None:
        with self._lock:
            self._held[token.job_id] = token
            self._lost.discard(token.job_id)
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="job-heartbeat", daemon=True)
                self._thread.start()

    def release(self, job_id: int) -> None:
        with self._lock:
            self._held.pop(job_id, None)

    def held(self) -> list[Token]:
        with self._lock:
            return list(self._held.values())

    def lost(self, job_id: int) -> bool:
        with self._lock:
            return job_id in self._lost

    def beat_once(self) -> list[int]:
        """Refresh the heartbeat of every held job; return the ids found no longer held."""
        tokens = self.held()
        if not tokens:
            return []
        gone: list[int] = []
        with self.db.session() as s:
            for t in tokens:
                if not fence(s, t):
                    gone.append(t.job_id)
        if gone:
            with self._lock:
                for job_id in gone:
                    self._held.pop(job_id, None)
                    self._lost.add(job_id)
            log.warning("jobs %s are no longer this worker's: their work will be discarded", gone)
        return gone

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.beat_once()
            except Exception:
                log.exception("job heartbeat failed; retrying")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
