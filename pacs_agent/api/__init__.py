"""The agent's HTTP API and console: routes per resource in ``routes/``, shared dependencies in
``deps.py``, the console's pages in ``console/``."""
