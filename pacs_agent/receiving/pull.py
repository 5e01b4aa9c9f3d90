"""Second door: the PACS (Orthanc) tells us a study is stable, we pull it over its REST API."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from orthanc_api_client import OrthancApiClient
from sqlalchemy import select

from pacs_agent.db.models import Result
from pacs_agent.db.session import Database, record_event
from pacs_agent.dicom_facts import RejectedDataset
from pacs_agent.receiving.ingest import Ingestor, parse_part10, study_id_for
from pacs_agent.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PullRequest:
    orthanc_study_id: str
    study_instance_uid: str | None


@dataclass
class PullReport:
    stored: int = 0
    known: int = 0
    own_results: int = 0
    refused: int = 0


def pull_study(
    client: OrthancApiClient,
    db: Database,
    ingestor: Ingestor,
    req: PullRequest,
    complete: Callable[[str, str], object] | None = None,
) -> PullReport:
    """Pull one study's instances from Orthanc and ingest them; ``complete(study_uid, why)``
    completes the study at once (Orthanc already waited for it to be stable)."""
    report = PullReport()
    instances = client.get_json(f"studies/{req.orthanc_study_id}/instances")
    with db.session() as s:
        own = set(s.scalars(select(Result.sop_instance_uid)))
    study_uid: str | None = req.study_instance_uid
    for inst in instances:
        sop_uid = inst.get("MainDicomTags", {}).get("SOPInstanceUID")
        if sop_uid in own:
            report.own_results += 1  # our own SR/SEG/SC, stored back into this study
            continue
        data = client.instances.get_file(inst["ID"])
        try:
            ds = parse_part10(data)
            outcome = ingestor.ingest(
                data,
                ds,
                ds.file_meta.TransferSyntaxUID,
                source="orthanc",
                orthanc_id=req.orthanc_study_id,
            )
        except RejectedDataset as exc:
            report.refused += 1
            log.warning("pull: instance %s refused: %s", inst["ID"], exc.reason)
            continue
        study_uid = outcome.study_uid
        if outcome.stored.outcome == "same":
            report.known += 1
        else:
            report.stored += 1
    if study_uid:
        with db.session() as s:
            sid = study_id_for(s, study_uid)
            if sid is not None:
                record_event(
                    s,
                    "study.pulled",
                    f"from Orthanc study {req.orthanc_study_id}: {report.stored} new, "
                    f"{report.known} known, {report.own_results} own results, "
                    f"{report.refused} refused",
                    study_id=sid,
                )
        # Orthanc already waited for the study to be stable: no second quiet period here.
        if complete is not None:
            complete(study_uid, f"stable in Orthanc (study {req.orthanc_study_id})")
    return report


class PullWorker:
    """Pulls studies one at a time off the webhook's thread, so the webhook answers at once."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        ingestor: Ingestor,
        complete: Callable[[str, str], object] | None = None,
    ) -> None:
        self.complete = complete
        self.client = OrthancApiClient(
            settings.orthanc_url, user=settings.orthanc_username, pwd=settings.orthanc_password
        )
        self.db = db
        self.ingestor = ingestor
        self.q: queue.Queue[PullRequest | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="orthanc-pull", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, req: PullRequest) -> None:
        self.q.put(req)

    def stop(self) -> None:
        self.q.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            req = self.q.get()
            if req is None:
                return
            for attempt in range(1, 4):
                try:
                    report = pull_study(self.client, self.db, self.ingestor, req, self.complete)
                    log.info("pulled orthanc study %s: %s", req.orthanc_study_id, report)
                    break
                except Exception as exc:
                    log.warning(
                        "pull of orthanc study %s failed (attempt %d): %s",
                        req.orthanc_study_id,
                        attempt,
                        exc,
                    )
                    threading.Event().wait(2.0 * attempt)
