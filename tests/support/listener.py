"""The agent's DICOM listener in the test process: a real pynetdicom SCP on a free port with a
real store and database (already migrated by the caller), as `pacs-agent serve` runs it."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from pacs_agent.db.models import Instance
from pacs_agent.db.session import Database
from pacs_agent.receiving.dimse import start_scp
from pacs_agent.receiving.ingest import Ingestor
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.settings import Settings
from tests.support import free_port


class Listener:
    def __init__(self, tmp: Path, database_url: str, **overrides: object) -> None:
        self.settings = Settings(
            data_dir=tmp / "data",
            dicom_port=free_port(),
            dicom_host="127.0.0.1",
            database_url=database_url,
            **overrides,  # type: ignore[arg-type]
        )
        self.db = Database(database_url)
        self.store = InstanceStore(self.settings.instance_dir)
        self.server = start_scp(self.settings, Ingestor(self.db, self.store))

    @property
    def port(self) -> int:
        return self.settings.dicom_port

    def instances(self) -> list[Instance]:
        with self.db.session() as s:
            return list(s.scalars(select(Instance)))

    def instance(self, sop_uid: str) -> Instance | None:
        with self.db.session() as s:
            return s.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))

    def count(self) -> tuple[int, int]:
        """(instance rows, files in the store, temporary files included)."""
        with self.db.session() as s:
            rows = s.scalar(select(func.count(Instance.id))) or 0
        files = sum(1 for p in self.store.root.rglob("*") if p.is_file())
        return rows, files

    def stop(self) -> None:
        self.server.shutdown()
        self.db.dispose()
