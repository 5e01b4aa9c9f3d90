"""The worker's Celery app: the agent's configuration plus the task code."""

from __future__ import annotations

import logging

from celery import Celery

from pacs_agent.queue import INFERENCE_QUEUE, TASK_DELIVER_JOB, TASK_PROCESS_JOB, make_celery
from pacs_agent.settings import Settings

log = logging.getLogger(__name__)

settings = Settings()
app: Celery = make_celery(settings)


@app.task(name=TASK_PROCESS_JOB, bind=True, acks_late=True)
def process_job(self: object, job_id: int) -> str:
    """Thin task: load the job by id and run the pipeline; outputs have deterministic UIDs."""
    from workers.pipeline import get_context, process

    return process(get_context(settings), job_id)


@app.task(name=TASK_DELIVER_JOB, bind=True, acks_late=True)
def deliver_job(self: object, job_id: int) -> str:
    """Thin task: retry the deliveries of a job whose destinations were unreachable."""
    from workers.pipeline import deliver, get_context

    return deliver(get_context(settings), job_id)


def run_worker(s: Settings) -> int:
    # One process, one model on one device; Celery's solo pool keeps the model in this process.
    argv = [
        "worker",
        "--loglevel=INFO",
        f"--queues={INFERENCE_QUEUE}",
        "--pool=solo",
        "--concurrency=1",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        f"--hostname=worker-{s.ae_title.lower()}@%h",
    ]
    app.worker_main(argv)
    return 0
