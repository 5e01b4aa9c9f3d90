"""The agent's loop: one pass every ``completion_poll_s`` runs each service role's step.

Each step has one home: completion (``scheduling.completion``), job dispatch to the broker
(``scheduling.dispatch``), delivery retries (``dispatching.retries``), taking back jobs whose
worker is gone, heartbeat stale or past the lease (``cleaning.recovery``), and retention
(``cleaning.retention``, every ``housekeeping_every_s``). Every step is safe to run on several
agents at once: each claims its rows with a guarded UPDATE.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable

from celery import Celery

from pacs_agent.cleaning.recovery import requeue_stale_jobs
from pacs_agent.db.session import Database
from pacs_agent.dispatching.retries import DeliveryRetrier
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.scheduling.completion import CompletionChecker
from pacs_agent.scheduling.dispatch import BrokerGate, JobDispatcher
from pacs_agent.scheduling.routing import Router

log = logging.getLogger(__name__)


class AgentLoop:
    def __init__(
        self,
        db: Database,
        celery: Celery,
        *,
        quiet_period_s: float,
        default_destinations: list[str],
        poll_s: float = 0.5,
        delivery_lease_s: float = 300.0,
        stale_job_s: float = 1800.0,
        job_heartbeat_timeout_s: float = 60.0,
        quiet_period_by_ae: dict[str, float] | None = None,
        complete_on_release_aes: list[str] | None = None,
        housekeeping: Callable[[], object] | None = None,
        housekeeping_every_s: float = 300.0,
        offpeak_window: str | None = None,
        store: InstanceStore | None = None,
        default_pipeline: str = "chest",
    ) -> None:
        self.db = db
        self.poll_s = poll_s
        self.gate = BrokerGate()
        # Routing rules read instance headers from the store (CEL variable ``tags``).
        self.router = Router(store, default_pipeline=default_pipeline)
        self.completion = CompletionChecker(
            db,
            self.router,
            quiet_period_s=quiet_period_s,
            default_destinations=default_destinations,
            quiet_period_by_ae=quiet_period_by_ae,
            complete_on_release_aes=complete_on_release_aes,
        )
        self.dispatcher = JobDispatcher(db, celery, self.gate, offpeak_window=offpeak_window)
        self.retries = DeliveryRetrier(db, celery, self.gate, lease_s=delivery_lease_s)
        self.stale_job = dt.timedelta(seconds=stale_job_s)
        self.job_heartbeat_timeout = dt.timedelta(seconds=job_heartbeat_timeout_s)
        self.housekeeping = housekeeping
        self.housekeeping_every_s = housekeeping_every_s
        self._next_housekeeping = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> None:
        self.completion.complete_quiet_studies()
        # Before dispatch: a job taken back from a dead worker is sent again in this pass.
        requeue_stale_jobs(self.db, self.stale_job, self.job_heartbeat_timeout)
        self.dispatcher.dispatch_pending()
        self.retries.retry_due_deliveries()
        if self.housekeeping is not None and time.monotonic() >= self._next_housekeeping:
            self._next_housekeeping = time.monotonic() + self.housekeeping_every_s
            self.housekeeping()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("agent loop pass failed; retrying")
            self._stop.wait(self.poll_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="agent-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
