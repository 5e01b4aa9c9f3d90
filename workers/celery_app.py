"""The worker's Celery app: the agent's configuration plus the task code, the queues of the
pipelines this host serves, and the worker's heartbeat."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery import Celery

from pacs_agent.db.models import utcnow
from pacs_agent.queue import TASK_DELIVER_JOB, TASK_PROCESS_JOB, make_celery
from pacs_agent.settings import Settings

log = logging.getLogger(__name__)

settings = Settings()
app: Celery = make_celery(settings)

HEARTBEAT_S = 10.0
# How often the heartbeat thread removes expired result files (and once at start).
RESULT_PURGE_EVERY_S = 3600.0


@app.task(name=TASK_PROCESS_JOB, bind=True, acks_late=True)
def process_job(self: object, job_id: int) -> str:
    """Thin task: a wake-up for the job's pipeline; the worker claims its most urgent job."""
    from workers.pipeline import get_context, process

    return process(get_context(settings), job_id)


@app.task(name=TASK_DELIVER_JOB, bind=True, acks_late=True)
def deliver_job(self: object, job_id: int) -> str:
    """Thin task: retry the deliveries of a job whose destinations were unreachable."""
    from workers.pipeline import deliver, get_context

    return deliver(get_context(settings), job_id)


def bundle_summaries(bundles: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What the heartbeat says about each pipeline's bundle, from its manifest (no weights)."""
    from workers.models.bundle import BundleError, read_manifest

    out: dict[str, dict[str, Any]] = {}
    for name, folder in bundles.items():
        try:
            _root, manifest, checksum = read_manifest(folder)
        except BundleError as exc:
            out[name] = {"error": str(exc)}
            continue
        out[name] = {
            "name": str(manifest.get("name", "")),
            "version": str(manifest.get("version", "")),
            "checksum": checksum,
            "is_demo": bool(manifest.get("random_weights", False)),
        }
    return out


class Heartbeat:
    """Writes this worker's row in the ``workers`` table every few seconds (a thread)."""

    def __init__(
        self, s: Settings, name: str, bundles: dict[str, Any], every_s: float = HEARTBEAT_S
    ) -> None:
        from pacs_agent.db.session import Database

        self.db = Database(s.resolved_database_url)
        self.name = name
        self.lane = s.worker_lane
        self.bundles = bundles
        self.summaries = bundle_summaries(bundles)
        self.every_s = every_s
        self.started_at = utcnow()
        self.results_root = s.results_dir
        self.result_retention_days = s.result_retention_days
        self._next_purge = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def beat_once(self) -> None:
        from pacs_agent.scheduling.pipelines import beat

        with self.db.session() as s:
            beat(
                s,
                self.name,
                pipelines=sorted(self.bundles),
                bundles=self.summaries,
                lane=self.lane,
                started_at=self.started_at,
            )

    def purge_results_once(self) -> int:
        """Remove this host's expired result files (pacs_agent.cleaning.retention)."""
        from pacs_agent.cleaning.retention import purge_result_files

        removed = purge_result_files(self.db, self.results_root, self.result_retention_days)
        if removed:
            log.info("retention: %d result files removed", removed)
        return removed

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat_once()
            except Exception:
                log.exception("worker heartbeat failed; retrying")
            if time.monotonic() >= self._next_purge:
                self._next_purge = time.monotonic() + RESULT_PURGE_EVERY_S
                try:
                    self.purge_results_once()
                except Exception as exc:
                    log.error("result retention failed (%s); retried later", type(exc).__name__)
            self._stop.wait(self.every_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.db.dispose()


def served_bundles(s: Settings) -> dict[str, Any]:
    """The pipelines this host serves: enabled rows whose bundle folder is here."""
    from pacs_agent.db.session import Database
    from pacs_agent.scheduling.pipelines import pipelines_on_host

    db = Database(s.resolved_database_url)
    try:
        with db.session() as session:
            return dict(pipelines_on_host(session, s))
    finally:
        db.dispose()


def start_metrics_server(s: Settings) -> bool:
    """Serve this worker's Prometheus metrics (pacs_agent.metrics) on
    ``PACS_AGENT_WORKER_METRICS_HOST:PORT`` (127.0.0.1 unless configured; port 0: off). The
    solo pool runs the tasks in this process, so its registry is the one the work updates. A
    port in use (a second worker on the host) is logged, not fatal."""
    if not s.worker_metrics_port:
        return False
    from prometheus_client import start_http_server

    try:
        start_http_server(s.worker_metrics_port, addr=s.worker_metrics_host)
    except OSError as exc:
        log.warning(
            "worker metrics not served on %s:%d: %s",
            s.worker_metrics_host,
            s.worker_metrics_port,
            exc.strerror or type(exc).__name__,
        )
        return False
    log.info("worker metrics on http://%s:%d/metrics", s.worker_metrics_host, s.worker_metrics_port)
    return True


def run_worker(s: Settings) -> int:
    global settings
    from pacs_agent.scheduling.pipelines import worker_queues
    from workers.pipeline import get_context

    settings = s  # the tasks run in this process (solo pool): they use these settings
    bundles = served_bundles(s)
    if not bundles:
        log.error("no pipeline has a bundle on this host: nothing to serve")
        return 2
    ctx = get_context(s)
    ctx.bundles.update(bundles)
    queues = worker_queues(sorted(bundles), s.worker_lane)
    name = ctx.name
    log.info(
        "worker %s, lane %s, serves %s (queues %s)",
        name,
        s.worker_lane,
        ", ".join(sorted(bundles)),
        ", ".join(queues),
    )
    # The worker's row beats at least as often as its jobs' leases (workers/leases.py), so that
    # "worker alive" and "job heartbeat fresh" agree (the job heartbeat timeout for both).
    heartbeat = Heartbeat(s, name, bundles, every_s=min(HEARTBEAT_S, s.job_heartbeat_s))
    heartbeat.start()
    start_metrics_server(s)
    # One process, one device; Celery's solo pool keeps the models in this process.
    argv = [
        "worker",
        "--loglevel=INFO",
        f"--queues={','.join(queues)}",
        "--pool=solo",
        "--concurrency=1",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        f"--hostname=worker-{s.ae_title.lower()}-{os.getpid()}@%h",
    ]
    try:
        app.worker_main(argv)
    finally:
        heartbeat.stop()
        ctx.leases.stop()
    return 0
