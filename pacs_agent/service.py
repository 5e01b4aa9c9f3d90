"""The agent process: DICOM listener, HTTP server, completion loop and Orthanc puller together.

`pacs-agent serve` runs this alone (production agent host, external broker); `pacs-agent run`
adds an embedded broker and a worker subprocess (all-in-one).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import uvicorn
from sqlalchemy import select, text

from pacs_agent import fairness, users
from pacs_agent.api.app import AgentState, create_app
from pacs_agent.broker import EmbeddedBroker
from pacs_agent.cleaning.retention import housekeeping
from pacs_agent.db import migrate
from pacs_agent.db.models import Pipeline
from pacs_agent.db.session import Database
from pacs_agent.dispatching.notify import NotificationLoop
from pacs_agent.loop import AgentLoop
from pacs_agent.queue import make_celery
from pacs_agent.receiving.processes import Receivers, make_ingestor
from pacs_agent.receiving.pull import PullWorker
from pacs_agent.receiving.repair import repair_store
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.scheduling.pipelines import seed_default_pipeline
from pacs_agent.settings import Settings

log = logging.getLogger(__name__)


class SchemaNotReady(RuntimeError):
    pass


def check_schema(db: Database) -> None:
    head = migrate.current_head()
    try:
        with db.session() as s:
            current = s.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except Exception:
        current = None
    if current != head:
        raise SchemaNotReady(
            f"database schema is at {current or 'nothing'}, expected {head}: "
            "run `pacs-agent db upgrade` first"
        )


class Agent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.resolved_database_url)
        check_schema(self.db)
        self.store = InstanceStore(settings.instance_dir)
        self.ingestor = make_ingestor(settings, self.db, self.store)
        self.celery = make_celery(settings)
        self.loop = AgentLoop(
            self.db,
            self.celery,
            quiet_period_s=settings.quiet_period_s,
            default_destinations=settings.destination_urls,
            poll_s=settings.completion_poll_s,
            delivery_lease_s=settings.delivery_backoff_max_s,
            stale_job_s=settings.resolved_job_lease_s * 1.5,
            job_heartbeat_timeout_s=settings.job_heartbeat_timeout_s,
            quiet_period_by_ae=settings.quiet_period_by_ae,
            complete_on_release_aes=settings.complete_on_release_aes,
            housekeeping=self._housekeeping,
            offpeak_window=settings.offpeak_window,
            store=self.store,
            default_pipeline=settings.default_pipeline,
        )
        self.puller = PullWorker(
            settings, self.db, self.ingestor, complete=self.loop.completion.complete_uid
        )
        self.notifier = NotificationLoop(settings, self.db, self.store)
        # The DICOM listener: in this process, and in PACS_AGENT_DICOM_PROCESSES - 1 children.
        self.receivers = Receivers(
            settings, self.ingestor, on_release=self.loop.completion.association_released
        )
        self.http: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None

    def _housekeeping(self) -> None:
        """Retention, then the fairness monitor's pass (each catches its own failures)."""
        housekeeping(self.db, self.store, self.settings)
        fairness.check(self.db, self.settings)

    def start(self) -> None:
        # Before the listener opens: index files a crash left without rows, mark lost files.
        repair_store(self.db, self.store, self.ingestor)
        with self.db.session() as s:  # an empty pipelines table: the default pipeline
            seed_default_pipeline(s, self.settings)
        self.puller.start()
        self.receivers.start()
        state = AgentState(
            settings=self.settings,
            db=self.db,
            store=self.store,
            puller=self.puller,
            dimse_running=self.receivers.running,
        )
        config = uvicorn.Config(
            create_app(state),
            host=self.settings.http_host,
            port=self.settings.http_port,
            log_level="warning",
            access_log=False,
        )
        self.http = uvicorn.Server(config)
        self._http_thread = threading.Thread(target=self.http.run, name="http", daemon=True)
        self._http_thread.start()
        self.loop.start()
        self.notifier.start()
        log.info(
            "agent ready: AE %s port %d, HTTP port %d, data %s",
            self.settings.ae_title,
            self.settings.dicom_port,
            self.settings.http_port,
            self.settings.resolved_data_dir,
        )

    def stop(self) -> None:
        self.loop.stop()
        self.notifier.stop()
        self.receivers.stop()
        if self.http is not None:
            self.http.should_exit = True
        if self._http_thread is not None:
            self._http_thread.join(timeout=10)
        self.puller.stop()
        self.db.dispose()


def wait_for_signal() -> None:
    stop = threading.Event()

    def _handler(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    while not stop.wait(1.0):
        pass


def serve(settings: Settings) -> None:
    agent = Agent(settings)
    agent.start()
    try:
        wait_for_signal()
    finally:
        agent.stop()


def _demo_pipelines(settings: Settings) -> dict[str, tuple[Path, str, int]]:
    """The DEMO pipelines of `pacs-agent run`: ``chest`` (the default pipeline, in the configured
    bundle folder) and ``multi-anatomy``; none when a bundle of one's own is configured."""
    if settings.bundle is not None:
        return {}
    return {
        settings.default_pipeline: (settings.resolved_bundle, "chest", 0),
        "multi-anatomy": (
            settings.resolved_data_dir / "bundles" / "multi-anatomy",
            "multi-anatomy",
            1,
        ),
    }


def _seed_demo_pipelines(settings: Settings, demos: dict[str, tuple[Path, str, int]]) -> None:
    db = Database(settings.resolved_database_url)
    try:
        with db.session() as s:
            if demos and s.scalar(select(Pipeline.id).limit(1)) is None:
                for name, (folder, kind, _seed) in demos.items():
                    s.add(
                        Pipeline(
                            name=name,
                            bundle=str(folder),
                            description=f"DEMO {kind} bundle (random weights)",
                        )
                    )
    finally:
        db.dispose()


def run_all_in_one(settings: Settings) -> None:
    """Embedded defaults: migrate, embedded broker, demo bundle, agent, and a worker subprocess."""
    data_dir = settings.resolved_data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    updates: dict[str, object] = {}
    # A fresh data folder: the first admin (password printed once); the worker's service token.
    updates["api_token"] = users.first_start(settings, sys.stdout)
    if settings.output_dir is None:
        updates["output_dir"] = data_dir / "output"
    broker = None
    if not settings.broker_url:
        broker = EmbeddedBroker(data_dir / "broker")
        updates["broker_url"] = broker.start()
    settings = settings.model_copy(update=updates)
    env = dict(os.environ)
    env.update(
        PACS_AGENT_BROKER_URL=settings.resolved_broker_url,
        PACS_AGENT_DATABASE_URL=settings.resolved_database_url,
        PACS_AGENT_DATA_DIR=str(data_dir),
        PACS_AGENT_AGENT_URL=settings.resolved_agent_url,
        PACS_AGENT_BUNDLE=str(settings.resolved_bundle),
        PACS_AGENT_API_TOKEN=settings.api_token or "",
    )
    if settings.bundle is not None and not (settings.resolved_bundle / "manifest.json").is_file():
        raise SystemExit(f"model bundle not found: {settings.resolved_bundle}")
    demos = _demo_pipelines(settings)
    for name, (folder, kind, seed) in demos.items():
        if (folder / "manifest.json").is_file():
            continue
        log.info("writing the %s DEMO bundle (seeded random weights) to %s", name, folder)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pacs_agent.cli",
                "models",
                "demo",
                "--out",
                str(folder),
                "--kind",
                kind,
                "--seed",
                str(seed),
            ],
            check=True,
            env=env,
        )
    _seed_demo_pipelines(settings, demos)
    agent = Agent(settings)
    agent.start()
    worker = subprocess.Popen([sys.executable, "-m", "pacs_agent.cli", "worker"], env=env)
    log.info("worker process %d started", worker.pid)
    try:
        wait_for_signal()
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        agent.stop()
        if broker is not None:
            broker.stop()
