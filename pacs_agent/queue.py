"""The Celery application as the agent sees it: configuration and task names, no task code.

The agent enqueues by name; the worker (workers.celery_app) registers the task under that name.
"""

from __future__ import annotations

from celery import Celery

from pacs_agent.scheduling.pipelines import QUEUE_PREFIX, queue_name
from pacs_agent.settings import Settings

TASK_PROCESS_JOB = "workers.process_job"
TASK_DELIVER_JOB = "workers.deliver_job"
# Every queue name starts with this: pipeline.<name> and pipeline.<name>.urgent
# (pacs_agent.scheduling.pipelines).
INFERENCE_QUEUE = QUEUE_PREFIX


def make_celery(settings: Settings) -> Celery:
    app = Celery("pacs_agent", broker=settings.resolved_broker_url)
    app.conf.update(
        task_default_queue=queue_name(settings.default_pipeline),
        pacs_default_pipeline=settings.default_pipeline,
        task_acks_late=True,  # a job killed mid-way is redelivered; outputs have fixed UIDs
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=max(settings.task_time_limit_s - 30, 30),
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        broker_transport_options={
            # Longer than the slowest task, or Redis hands a running job to a second worker.
            "visibility_timeout": settings.broker_visibility_timeout_s
            or settings.task_time_limit_s * 2,
            "queue_order_strategy": "priority",
            "priority_steps": list(range(10)),
            "sep": ":",
            "max_retries": 1,
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
    )
    return app


def enqueue_job(
    app: Celery,
    job_id: int,
    priority: int,
    task: str = TASK_PROCESS_JOB,
    pipeline: str | None = None,
) -> str:
    """Send a job's wake-up message by name to its pipeline's queue (the urgent one for stat
    and urgent jobs) with the job's broker priority (0 first). The worker that takes it claims
    the most urgent queued job of that pipeline from the database. Raises (kombu/redis errors)
    when the broker is unreachable."""
    name = pipeline or str(app.conf.get("pacs_default_pipeline") or "chest")
    result = app.send_task(
        task,
        args=[job_id],
        queue=queue_name(name, priority),
        priority=priority,
        retry=False,
    )
    return str(result.id)
