"""Dispatching: deliveries of results and triage notifications, with persisted retries."""
