"""Triage notifications (being written). Interface fixed for the worker:

queue_notifications(s, settings, *, job_id, level, findings) -> int
    Called by the worker inside the transaction that stores a job's triage level. Creates one
    pending Notification per channel (the job's `notify` names resolved to URLs, else
    PACS_AGENT_NOTIFY) for this study version when `level` is in PACS_AGENT_NOTIFY_LEVELS; a row
    that exists already (a retried job) is left as it is. Returns the number created.
    `findings` is a list of {"label", "probability", "present"} dicts.
"""
