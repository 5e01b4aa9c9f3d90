"""Scheduling: study completion, routing (CEL rules), jobs and their queues, priorities."""
