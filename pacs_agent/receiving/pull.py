"""Second door: the PACS (Orthanc) tells us a study is stable, we pull it over its REST API.

Nothing is held in memory only. The webhook persists a ``pull_requests`` row (``enqueue_pull``)
before it answers 202; the agent's pull loop (``PullWorker``) claims due rows with a guarded
UPDATE and a lease (``lease_until``, renewed after each instance), so two agents on one database
never pull the same row at once and the row of an agent that died is taken again once its lease
has run out. A failed attempt is retried with exponential backoff; after the last one the row is
``failed`` with its reason (Orthanc ids, UIDs, HTTP status, exception class: no patient data),
listed by ``GET /api/pulls`` and retried by ``POST /api/pulls/{id}/retry``.

Backstop for a webhook that never arrived: the loop reads Orthanc's ``/changes`` feed for
``StableStudy`` since the last sequence it saw (kept in ``agent_flags``) and enqueues a pull for
each study holding instances the agent has neither stored nor produced.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from orthanc_api_client import OrthancApiClient
from orthanc_api_client import exceptions as orthanc_errors
from sqlalchemy import CursorResult, and_, or_, select, text, update
from sqlalchemy.orm import Session

from pacs_agent.db.models import (
    AgentFlag,
    Instance,
    PullRequestRow,
    PullStatus,
    Result,
    Study,
    StudyStatus,
    utcnow,
)
from pacs_agent.db.session import Database, record_event
from pacs_agent.dicom_facts import RejectedDataset
from pacs_agent.receiving.ingest import Ingestor, parse_part10, study_id_for
from pacs_agent.receiving.refusals import record_refusal, uids_from_bytes
from pacs_agent.settings import Settings

log = logging.getLogger(__name__)

# One REST call to Orthanc may take this long before the attempt counts as failed.
HTTP_TIMEOUT_S = 60.0
# The last /changes sequence the backstop has read (agent_flags key).
CHANGES_FLAG = "orthanc_changes_seq"
CHANGES_PAGE = 100
# SOP Instance UIDs per IN (...) query: bounded whatever the study size.
UID_CHUNK = 500
# The reason of a study whose pull gave up (a later successful pull takes the study back).
PULL_FAILED_REASON = "pull from Orthanc failed"


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


@dataclass(frozen=True)
class Claim:
    """A pull request this agent holds: ``attempt`` identifies the claim in guarded UPDATEs."""

    id: int
    attempt: int
    orthanc_study_id: str
    study_instance_uid: str | None


# --------------------------------------------------------------------------------------------
# the queue of record


def _lock_key(orthanc_study_id: str) -> int:
    """A signed 64-bit key for PostgreSQL's advisory lock on one Orthanc study."""
    return int.from_bytes(
        hashlib.sha256(orthanc_study_id.encode()).digest()[:8], "big", signed=True
    )


def enqueue_pull(s: Session, orthanc_study_id: str, study_uid: str | None) -> tuple[int, bool]:
    """Persist a pull request in the caller's transaction; returns (row id, coalesced).

    A pending row of the same Orthanc study takes the request instead (it is made due now:
    Orthanc has just shown it is reachable). The first statement is a write, so SQLite
    serialises concurrent calls; PostgreSQL takes an advisory lock per study for the same.
    """
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(orthanc_study_id)})
    pending = and_(
        PullRequestRow.orthanc_study_id == orthanc_study_id,
        PullRequestRow.status == PullStatus.PENDING.value,
    )
    if updated(s, update(PullRequestRow).where(pending).values(next_attempt_at=None)):
        row = s.scalars(select(PullRequestRow).where(pending).order_by(PullRequestRow.id)).first()
        if row is not None:
            if study_uid and not row.study_instance_uid:
                row.study_instance_uid = study_uid
            return row.id, True
    row = PullRequestRow(
        orthanc_study_id=orthanc_study_id,
        study_instance_uid=study_uid or None,
        status=PullStatus.PENDING.value,
        attempts=0,
    )
    s.add(row)
    s.flush()
    return row.id, False


def updated(s: Session, stmt: Any) -> int:
    """Run an UPDATE and return the number of rows it changed."""
    result: CursorResult[Any] = s.execute(stmt)  # type: ignore[assignment]
    return int(result.rowcount)


def backoff_s(attempt: int, base: float, cap: float) -> float:
    """Delay after failed attempt ``attempt`` (1-based): base, 2*base, 4*base ... <= cap."""
    return float(min(cap, base * (2 ** max(0, attempt - 1))))


def _due(now: dt.datetime) -> Any:
    return or_(
        and_(
            PullRequestRow.status == PullStatus.PENDING.value,
            or_(PullRequestRow.next_attempt_at.is_(None), PullRequestRow.next_attempt_at <= now),
        ),
        and_(
            PullRequestRow.status == PullStatus.RUNNING.value,
            or_(PullRequestRow.lease_until.is_(None), PullRequestRow.lease_until < now),
        ),
    )


def claim_due(db: Database, lease_s: float) -> Claim | None:
    """Take the oldest due pull request (pending and due, or running with an expired lease)."""
    now = utcnow()
    with db.session() as s:
        ids = s.scalars(
            select(PullRequestRow.id).where(_due(now)).order_by(PullRequestRow.id).limit(8)
        ).all()
        for row_id in ids:
            taken = updated(
                s,
                update(PullRequestRow)
                .where(PullRequestRow.id == row_id, _due(now))
                .values(
                    status=PullStatus.RUNNING.value,
                    lease_until=now + dt.timedelta(seconds=lease_s),
                    attempts=PullRequestRow.attempts + 1,
                ),
            )
            if taken == 1:
                row = s.get_one(PullRequestRow, row_id)
                s.refresh(row)
                return Claim(row.id, row.attempts, row.orthanc_study_id, row.study_instance_uid)
    return None


def _mine(claim: Claim) -> Any:
    return and_(
        PullRequestRow.id == claim.id,
        PullRequestRow.status == PullStatus.RUNNING.value,
        PullRequestRow.attempts == claim.attempt,
    )


def renew_lease(db: Database, claim: Claim, lease_s: float) -> bool:
    with db.session() as s:
        return bool(
            updated(
                s,
                update(PullRequestRow)
                .where(_mine(claim))
                .values(lease_until=utcnow() + dt.timedelta(seconds=lease_s)),
            )
        )


def failure_reason(exc: BaseException, orthanc_study_id: str) -> str:
    """What went wrong, without patient data: exception class, HTTP status, Orthanc id."""
    status = getattr(exc, "http_status_code", None)
    what = type(exc).__name__ + (f" HTTP {status}" if status else "")
    if isinstance(exc, orthanc_errors.OrthancApiException):
        where = "Orthanc"
    else:
        where = "agent"
    return f"{what} ({where}) pulling Orthanc study {orthanc_study_id}"


def known_uids(s: Session, uids: Iterable[str]) -> set[str]:
    """The SOP Instance UIDs among ``uids`` that the agent stored or produced (chunked)."""
    wanted = [u for u in dict.fromkeys(uids) if u]
    found: set[str] = set()
    for i in range(0, len(wanted), UID_CHUNK):
        chunk = wanted[i : i + UID_CHUNK]
        found.update(
            s.scalars(select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(chunk)))
        )
        found.update(
            s.scalars(select(Result.sop_instance_uid).where(Result.sop_instance_uid.in_(chunk)))
        )
    return found


def own_result_uids(s: Session, uids: Iterable[str]) -> set[str]:
    """The SOP Instance UIDs among ``uids`` that are the agent's own results (chunked)."""
    wanted = [u for u in dict.fromkeys(uids) if u]
    found: set[str] = set()
    for i in range(0, len(wanted), UID_CHUNK):
        chunk = wanted[i : i + UID_CHUNK]
        found.update(
            s.scalars(select(Result.sop_instance_uid).where(Result.sop_instance_uid.in_(chunk)))
        )
    return found


# --------------------------------------------------------------------------------------------
# one pull


def pull_study(
    client: OrthancApiClient,
    db: Database,
    ingestor: Ingestor,
    req: PullRequest,
    complete: Callable[[str, str], object] | None = None,
    heartbeat: Callable[[], object] | None = None,
) -> PullReport:
    """Pull one study's instances from Orthanc and ingest them; ``complete(study_uid, why)``
    completes the study at once (Orthanc already waited for it to be stable). ``heartbeat`` is
    called after each instance (the caller renews its lease)."""
    report = PullReport()
    instances = client.get_json(f"studies/{req.orthanc_study_id}/instances", timeout=HTTP_TIMEOUT_S)
    with db.session() as s:  # only this study's UIDs: bounded by the study, not the history
        own = own_result_uids(
            s, (str(i.get("MainDicomTags", {}).get("SOPInstanceUID") or "") for i in instances)
        )
    study_uid: str | None = req.study_instance_uid
    for inst in instances:
        sop_uid = inst.get("MainDicomTags", {}).get("SOPInstanceUID")
        if sop_uid in own:
            report.own_results += 1  # our own SR/SEG/SC, stored back into this study
            continue
        data = client.get_binary(f"instances/{inst['ID']}/file", timeout=HTTP_TIMEOUT_S)
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
            record_refusal(
                db,
                door="orthanc",
                status=exc.status,
                reason=f"{exc.reason} (Orthanc instance {inst['ID']})",
                uids=uids_from_bytes(data),
            )
            continue
        finally:
            if heartbeat is not None:
                heartbeat()
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
                # A study an earlier pull gave up on is receiving again, so it completes now.
                s.execute(
                    update(Study)
                    .where(
                        Study.id == sid,
                        Study.status == StudyStatus.FAILED.value,
                        Study.reason.startswith(PULL_FAILED_REASON),
                    )
                    .values(status=StudyStatus.RECEIVING.value, reason=None)
                )
        # Orthanc already waited for the study to be stable: no second quiet period here.
        if complete is not None:
            complete(study_uid, f"stable in Orthanc (study {req.orthanc_study_id})")
    return report


# --------------------------------------------------------------------------------------------
# the loop


class PullWorker:
    """The agent's pull loop: persisted pull requests, claimed with a lease, retried with
    backoff; and the /changes backstop. ``wake()`` (the webhook) starts a pass at once."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        ingestor: Ingestor,
        complete: Callable[[str, str], object] | None = None,
    ) -> None:
        self.settings = settings
        self.complete = complete
        self.client = OrthancApiClient(
            settings.orthanc_url, user=settings.orthanc_username, pwd=settings.orthanc_password
        )
        self.db = db
        self.ingestor = ingestor
        self.attempts = max(1, settings.pull_attempts)
        self.lease_s = settings.pull_lease_s
        self.changes = settings.resolved_pull_changes
        self._next_changes = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orthanc-pull", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.run_once()
            except Exception:
                log.exception("pull loop pass failed; retrying")
            self._wake.wait(self.settings.pull_poll_s)

    def run_once(self) -> int:
        """One pass: read the /changes feed when due, then pull every due request. Returns the
        number of pulls attempted."""
        if self.changes and time.monotonic() >= self._next_changes:
            self._next_changes = time.monotonic() + self.settings.pull_changes_every_s
            try:
                self.read_changes()
            except Exception as exc:
                log.warning("orthanc /changes not read: %s", failure_reason(exc, "-"))
        done = 0
        while not self._stop.is_set():
            claim = claim_due(self.db, self.lease_s)
            if claim is None:
                break
            self.process(claim)
            done += 1
        return done

    def process(self, claim: Claim) -> bool:
        req = PullRequest(claim.orthanc_study_id, claim.study_instance_uid)
        try:
            report = pull_study(
                self.client,
                self.db,
                self.ingestor,
                req,
                self.complete,
                heartbeat=lambda: renew_lease(self.db, claim, self.lease_s),
            )
        except Exception as exc:
            self._failed(claim, exc)
            return False
        log.info("pulled orthanc study %s (pull %d): %s", claim.orthanc_study_id, claim.id, report)
        with self.db.session() as s:
            s.execute(
                update(PullRequestRow)
                .where(_mine(claim))
                .values(
                    status=PullStatus.DONE.value,
                    finished_at=utcnow(),
                    lease_until=None,
                    last_error=None,
                    next_attempt_at=None,
                )
            )
        return True

    def _failed(self, claim: Claim, exc: BaseException) -> None:
        reason = failure_reason(exc, claim.orthanc_study_id)
        final = claim.attempt >= self.attempts or isinstance(
            exc,
            orthanc_errors.ResourceNotFound,  # the study is gone from Orthanc
        )
        now = utcnow()
        with self.db.session() as s:
            if final:
                values: dict[str, Any] = {
                    "status": PullStatus.FAILED.value,
                    "finished_at": now,
                    "next_attempt_at": None,
                }
                reason = f"{reason}; gave up after {claim.attempt} attempt(s)"
            else:
                delay = backoff_s(
                    claim.attempt, self.settings.pull_backoff_s, self.settings.pull_backoff_max_s
                )
                values = {
                    "status": PullStatus.PENDING.value,
                    "next_attempt_at": now + dt.timedelta(seconds=delay),
                }
            values.update(last_error=reason, lease_until=None)
            if not updated(s, update(PullRequestRow).where(_mine(claim)).values(**values)):
                return  # the lease ran out and another agent holds the row now
            if final:
                self._fail_study(s, claim, reason)
        log.warning(
            "pull %d of orthanc study %s failed (attempt %d of %d): %s",
            claim.id,
            claim.orthanc_study_id,
            claim.attempt,
            self.attempts,
            reason,
        )

    @staticmethod
    def _fail_study(s: Session, claim: Claim, reason: str) -> None:
        """A study row that is still receiving becomes failed with the reason; any study row
        gets an event on its timeline."""
        if not claim.study_instance_uid:
            return
        st = s.scalar(select(Study).where(Study.study_instance_uid == claim.study_instance_uid))
        if st is None:
            return  # no instance ever arrived: GET /api/pulls shows it
        if st.status == StudyStatus.RECEIVING.value:
            st.status = StudyStatus.FAILED.value
            st.reason = f"{PULL_FAILED_REASON} (pull {claim.id}): {reason}"
        record_event(
            s,
            "study.pull_failed",
            f"pull {claim.id}: {reason}",
            study_id=st.id,
            level="error",
        )

    # the /changes backstop ----------------------------------------------------------------

    def _cursor(self) -> int | None:
        with self.db.session() as s:
            flag = s.get(AgentFlag, CHANGES_FLAG)
            value = flag.value if flag is not None else None
        if isinstance(value, dict) and isinstance(value.get("seq"), int):
            return int(value["seq"])
        return None

    def _save_cursor(self, seq: int) -> None:
        with self.db.session() as s:
            flag = s.get(AgentFlag, CHANGES_FLAG)
            if flag is None:
                s.add(AgentFlag(key=CHANGES_FLAG, value={"seq": seq}, updated_by="pull-loop"))
            else:
                flag.value = {"seq": seq}
                flag.updated_at = utcnow()

    def read_changes(self) -> int:
        """Enqueue a pull for each StableStudy since the last sequence read; returns how many.
        The first read starts at Orthanc's latest change (an agent added to a PACS does not pull
        its whole history)."""
        since = self._cursor()
        if since is None:
            last = self.client.get_json("changes", params={"last": ""}, timeout=HTTP_TIMEOUT_S)
            self._save_cursor(int(last.get("Last", 0)))
            return 0
        queued = 0
        while not self._stop.is_set():
            page = self.client.get_json(
                "changes", params={"since": since, "limit": CHANGES_PAGE}, timeout=HTTP_TIMEOUT_S
            )
            changes = page.get("Changes") or []
            if int(page.get("Last", 0)) < since:  # Orthanc's database was reset
                self._save_cursor(int(page.get("Last", 0)))
                break
            seq = since
            for change in changes:
                if change.get("ChangeType") == "StableStudy" and self._maybe_enqueue(
                    str(change.get("ID"))
                ):
                    queued += 1
                seq = int(change.get("Seq", seq))
            if seq != since:
                self._save_cursor(seq)
                since = seq
            if page.get("Done", True) or not changes:
                break
        if queued:
            self._wake.set()
        return queued

    def _maybe_enqueue(self, orthanc_study_id: str) -> bool:
        """A pull row for a stable study holding an instance the agent does not know."""
        try:
            instances = self.client.get_json(
                f"studies/{orthanc_study_id}/instances", timeout=HTTP_TIMEOUT_S
            )
            study = self.client.get_json(f"studies/{orthanc_study_id}", timeout=HTTP_TIMEOUT_S)
        except orthanc_errors.ResourceNotFound:
            return False  # deleted since
        uids = [str(i.get("MainDicomTags", {}).get("SOPInstanceUID") or "") for i in instances]
        with self.db.session() as s:
            if not set(u for u in uids if u) - known_uids(s, uids):
                return False
            study_uid = (study.get("MainDicomTags") or {}).get("StudyInstanceUID")
            row_id, coalesced = enqueue_pull(s, orthanc_study_id, study_uid)
        log.info(
            "orthanc /changes: stable study %s not pulled yet: pull %d%s",
            orthanc_study_id,
            row_id,
            " (coalesced)" if coalesced else "",
        )
        return not coalesced
