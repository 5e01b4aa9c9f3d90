"""One way in for every door (C-STORE, Orthanc pull, STOW-RS): check, store durably, record.

The caller is told "stored" only after the file is fsynced and its row committed.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pacs_agent import metrics
from pacs_agent.db.models import Instance, Series, Study, StudyStatus, utcnow
from pacs_agent.db.session import Database, record_event
from pacs_agent.dicom_facts import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    DatasetFacts,
    RejectedDataset,
    examine,
)
from pacs_agent.receiving.store import InstanceStore, StoredFile
from pacs_agent.scheduling.priority import more_urgent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestOutcome:
    sop_uid: str
    study_uid: str
    study_id: int
    stored: StoredFile
    facts: DatasetFacts


_PYDICOM_TEXTS_HIDDEN = False


def hide_pydicom_value_texts() -> None:
    """pydicom warns (and logs) about invalid values with the value in the text: a received
    dataset's values can be anything, patient data included. In the agent these warnings are
    dropped and pydicom's logger keeps errors only; the agent's own refusal reasons name the
    attribute instead. Process-wide and idempotent (called when an Ingestor is made)."""
    global _PYDICOM_TEXTS_HIDDEN
    if _PYDICOM_TEXTS_HIDDEN:
        return
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    _PYDICOM_TEXTS_HIDDEN = True


def parse_part10(data: bytes) -> Dataset:
    """Parse a DICOM Part 10 file; raise RejectedDataset(0xC210) if it is not one."""
    if not data:
        raise RejectedDataset(STATUS_CANNOT_UNDERSTAND, "empty dataset (0 bytes)")
    try:
        ds = dcmread(io.BytesIO(data), force=False)
        # Touch every element so that a truncated or malformed body fails here, not later.
        for _elem in ds.iterall():
            pass
    except Exception as exc:  # pydicom raises many types on garbage; its texts carry values
        raise RejectedDataset(
            STATUS_CANNOT_UNDERSTAND, f"not a readable DICOM file: {type(exc).__name__}"
        ) from None
    if "TransferSyntaxUID" not in ds.file_meta:
        raise RejectedDataset(STATUS_CANNOT_UNDERSTAND, "file meta without Transfer Syntax UID")
    return ds


def _decode_small_elements(ds: Dataset) -> None:
    """Decode every element (so malformed values fail now) but leave deferred ones on disk.

    ``Dataset.iterall()`` would read deferred values into memory.
    """
    for tag in list(ds.keys()):
        item = ds.get_item(tag, keep_deferred=True)
        if isinstance(item, RawDataElement) and item.value is None:
            continue  # deferred: a large value, checked without reading it
        try:
            elem = ds[tag]
        except Exception:  # the value cannot be decoded; pydicom's text would quote it
            raise RejectedDataset(
                STATUS_CANNOT_UNDERSTAND, f"{_tag_name(tag)} cannot be decoded"
            ) from None
        if elem.VR == "SQ":
            for child in elem.value:
                _decode_small_elements(child)


def _tag_name(tag: BaseTag) -> str:
    """``Keyword (gggg,eeee)``, or the tag alone for a private or unknown one: never a value."""
    keyword = keyword_for_tag(tag)
    return f"{keyword} ({tag.group:04X},{tag.element:04X})".strip()


def parse_part10_file(path: Path) -> Dataset:
    """Parse a Part 10 file with large values left on disk (deferred); 0xC210 if unreadable."""
    if path.stat().st_size <= 132:
        raise RejectedDataset(STATUS_CANNOT_UNDERSTAND, "empty dataset (0 bytes)")
    try:
        ds = dcmread(path, defer_size=64 * 1024)
        if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            # A deflated body is inflated in memory: offsets of deferred values would point
            # into the inflated stream, not the file. Read it whole (deflate is rare and small).
            ds = dcmread(path)
        _decode_small_elements(ds)
    except RejectedDataset:
        raise
    except Exception as exc:
        raise RejectedDataset(
            STATUS_CANNOT_UNDERSTAND, f"not a readable DICOM file: {type(exc).__name__}"
        ) from None
    if "TransferSyntaxUID" not in ds.file_meta:
        raise RejectedDataset(STATUS_CANNOT_UNDERSTAND, "file meta without Transfer Syntax UID")
    return ds


@dataclass(frozen=True)
class Peer:
    """Where a DIMSE association came from: the AE title it called and the sender's IP address
    (routing-rule variables ``called_ae`` and ``sender_address``)."""

    called_ae: str | None = None
    address: str | None = None


class Ingestor:
    def __init__(
        self,
        db: Database,
        store: InstanceStore,
        min_free_bytes: int = 0,
        stat_calling_aes: Collection[str] = (),
        stored_by: str | None = None,
    ) -> None:
        self.db = db
        self.store = store
        # This agent's URL, recorded on each instance: workers fetch the file from there.
        self.stored_by = stored_by
        self.min_free_bytes = min_free_bytes
        # Calling AEs whose studies are stat (e.g. the emergency department's modalities).
        self.stat_calling_aes = frozenset(stat_calling_aes)
        hide_pydicom_value_texts()

    def ingest(
        self,
        data: bytes,
        ds: Dataset,
        transfer_syntax: UID,
        *,
        source: str,
        calling_ae: str | None = None,
        orthanc_id: str | None = None,
        peer: Peer | None = None,
    ) -> IngestOutcome:
        facts = examine(ds, transfer_syntax)
        self._check_space(len(data))
        stored = self.store.write(facts.study_uid, facts.series_uid, facts.sop_uid, data)
        return self._recorded(
            facts, stored, transfer_syntax, source, calling_ae, orthanc_id, peer=peer
        )

    def ingest_file(
        self,
        path: Path,
        transfer_syntax: UID,
        *,
        source: str,
        calling_ae: str | None = None,
        peer: Peer | None = None,
        ds: Dataset | None = None,
    ) -> IngestOutcome:
        """Ingest a dataset that arrived as a file (C-STORE or STOW-RS streamed to disk);
        ``ds``: the file already parsed with ``parse_part10_file`` by the caller."""
        if ds is None:
            ds = parse_part10_file(path)
        facts = examine(ds, transfer_syntax, source=path)
        self._check_space(path.stat().st_size)
        stored = self.store.write_file(facts.study_uid, facts.series_uid, facts.sop_uid, path)
        return self._recorded(facts, stored, transfer_syntax, source, calling_ae, None, peer=peer)

    def _check_space(self, size: int) -> None:
        if self.min_free_bytes and self.store.free_bytes() - size < self.min_free_bytes:
            raise RejectedDataset(STATUS_OUT_OF_RESOURCES, "disk nearly full: refusing to store")

    def _recorded(
        self,
        facts: DatasetFacts,
        stored: StoredFile,
        transfer_syntax: UID,
        source: str,
        calling_ae: str | None,
        orthanc_id: str | None,
        peer: Peer | None = None,
    ) -> IngestOutcome:
        study_id = self._record_retrying(
            facts, stored, transfer_syntax, source, calling_ae, orthanc_id, peer
        )
        metrics.received(source, stored.size)
        log.info(
            "stored sop=%s study=%s via %s (%s)",
            facts.sop_uid,
            facts.study_uid,
            source,
            stored.outcome,
        )
        return IngestOutcome(facts.sop_uid, facts.study_uid, study_id, stored, facts)

    def _record_retrying(
        self,
        facts: DatasetFacts,
        stored: StoredFile,
        transfer_syntax: UID,
        source: str,
        calling_ae: str | None,
        orthanc_id: str | None,
        peer: Peer | None = None,
    ) -> int:
        for attempt in range(3):
            try:
                return self._record(
                    facts, stored, transfer_syntax, source, calling_ae, orthanc_id, peer
                )
            except IntegrityError:
                # Another association created the same study or series at the same moment.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def record_existing(self, relpath: str, data: bytes, ds: Dataset) -> IngestOutcome:
        """Record a file already in the store (start-up repair after a crash)."""
        ts = ds.file_meta.TransferSyntaxUID
        facts = examine(ds, ts)
        stored = StoredFile(relpath, len(data), hashlib.sha256(data).hexdigest(), "new")
        study_id = self._record(facts, stored, ts, "repair", None, None)
        return IngestOutcome(facts.sop_uid, facts.study_uid, study_id, stored, facts)

    def _record(
        self,
        facts: DatasetFacts,
        stored: StoredFile,
        transfer_syntax: UID,
        source: str,
        calling_ae: str | None,
        orthanc_id: str | None,
        peer: Peer | None = None,
    ) -> int:
        now = utcnow()
        with self.db.session() as s:
            if s.get_bind().dialect.name == "postgresql":
                # As for SQLite: the fsynced file is the durable record, repair rebuilds the row.
                s.execute(text("SET LOCAL synchronous_commit TO OFF"))
            study = s.scalar(select(Study).where(Study.study_instance_uid == facts.study_uid))
            if study is None:
                study = Study(
                    study_instance_uid=facts.study_uid,
                    status=StudyStatus.RECEIVING.value,
                    source=source,
                    calling_ae=calling_ae,
                    called_ae=peer.called_ae if peer else None,
                    sender_address=peer.address if peer else None,
                    orthanc_id=orthanc_id,
                    first_received_at=now,
                    last_received_at=now,
                )
                s.add(study)
                s.flush()
                record_event(
                    s, "study.receiving", f"first instance via {source}", study_id=study.id
                )
            existing = s.scalar(select(Instance).where(Instance.sop_instance_uid == facts.sop_uid))
            if existing is not None:
                if existing.sha256 != stored.sha256:
                    # Same SOP Instance UID, other content (or another study): keep the first,
                    # keep the new bytes aside, and say so where an admin looks.
                    record_event(
                        s,
                        "instance.conflict",
                        f"SOP Instance {facts.sop_uid} re-sent with different content; "
                        f"kept the first, new bytes at {stored.relpath}",
                        study_id=existing.study_id,
                        level="warning",
                    )
                return study.id
            if study.status != StudyStatus.RECEIVING.value:
                # New instances after completion: a new study version and, later, a new job for it.
                s.execute(
                    update(Study)
                    .where(Study.id == study.id)
                    .values(
                        status=StudyStatus.RECEIVING.value,
                        version=Study.version + 1,
                        reason=None,
                        completed_at=None,
                    )
                )
                s.refresh(study)
                record_event(
                    s,
                    "study.new_version",
                    f"instances after completion: version {study.version}",
                    study_id=study.id,
                )
            series = s.scalar(select(Series).where(Series.series_instance_uid == facts.series_uid))
            if series is None:
                series = Series(
                    study_id=study.id,
                    series_instance_uid=facts.series_uid,
                    modality=facts.modality,
                    body_part=facts.body_part,
                    description=facts.series_description,
                )
                s.add(series)
                s.flush()
            s.add(
                Instance(
                    study_id=study.id,
                    series_id=series.id,
                    sop_instance_uid=facts.sop_uid,
                    sop_class_uid=facts.sop_class_uid,
                    transfer_syntax_uid=str(transfer_syntax),
                    path=stored.relpath,
                    size=stored.size,
                    sha256=stored.sha256,
                    rows=facts.rows,
                    columns=facts.columns,
                    analysable=facts.analysable,
                    reason=facts.reason,
                    study_version=study.version,
                    received_at=now,
                    acquisition_number=facts.acquisition_number,
                    images_in_acquisition=facts.images_in_acquisition,
                    number_of_frames=facts.number_of_frames,
                    stored_by=self.stored_by,
                )
            )
            study.last_received_at = now
            incoming = facts.requested_priority
            if calling_ae and calling_ae in self.stat_calling_aes:
                incoming = "stat"
            if incoming is not None:  # keep the most urgent class the study was sent with
                study.incoming_priority = more_urgent(study.incoming_priority, incoming)
            if orthanc_id:
                study.orthanc_id = orthanc_id
            return study.id


def study_id_for(s: Session, study_uid: str) -> int | None:
    return s.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
