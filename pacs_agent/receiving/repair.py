"""Start-up repair of the instance store (retention lives in ``pacs_agent.cleaning.retention``).

A crash between fsyncing an instance file and committing its row leaves a file without a row:
it is indexed at start-up (the sender got no success, so it may also send it again, which is
idempotent). A row whose file disappeared is marked, never silently used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import or_, select

from pacs_agent.db.models import Instance, Study
from pacs_agent.db.session import Database, record_event
from pacs_agent.dicom_facts import RejectedDataset
from pacs_agent.receiving.ingest import Ingestor, parse_part10
from pacs_agent.receiving.store import InstanceStore

log = logging.getLogger(__name__)

MISSING = "file missing from the instance store"


@dataclass
class RepairReport:
    indexed: int = 0
    unreadable: int = 0
    missing: int = 0
    temp_removed: int = 0


def repair_store(db: Database, store: InstanceStore, ingestor: Ingestor) -> RepairReport:
    report = RepairReport()
    for tmp in store.root.rglob(".incoming-*.part"):  # writes that never finished
        tmp.unlink(missing_ok=True)
        report.temp_removed += 1
    with db.session() as s:
        query = select(Instance.id, Instance.path, Instance.reason, Study.purged_at).join(
            Study, Study.id == Instance.study_id
        )
        if ingestor.stored_by:  # several agents on one database: only this agent's files
            query = query.where(
                or_(Instance.stored_by == ingestor.stored_by, Instance.stored_by.is_(None))
            )
        rows = s.execute(query).all()
    known = {r[1] for r in rows}
    for path in store.root.rglob("*.dcm"):
        if ".conflict-" in path.name:
            continue
        rel = path.relative_to(store.root).as_posix()
        if rel in known:
            continue
        data = path.read_bytes()
        try:
            ds = parse_part10(data)
            ingestor.record_existing(rel, data, ds)
            report.indexed += 1
            log.warning("repair: indexed %s (stored before a crash, not recorded)", rel)
        except (RejectedDataset, Exception) as exc:  # keep the file, say why it is not used
            report.unreadable += 1
            log.error("repair: cannot index %s: %s", rel, exc)
    for inst_id, rel, reason, purged_at in rows:
        if purged_at is not None or reason == MISSING:
            continue
        if not (store.root / rel).is_file():
            report.missing += 1
            with db.session() as s:
                inst = s.get_one(Instance, inst_id)
                inst.analysable = False
                inst.reason = MISSING
                record_event(
                    s,
                    "instance.missing",
                    f"{inst.sop_instance_uid}: {MISSING}",
                    study_id=inst.study_id,
                    level="error",
                )
    if report.indexed or report.missing or report.unreadable or report.temp_removed:
        log.warning("store repair: %s", report)
    return report
