"""One way in for every door (C-STORE, Orthanc pull, STOW-RS): check, store durably, record.

The caller is told "stored" only after the file is fsynced and its row committed. Files that
arrive as files (C-STORE, STOW-RS) are committed in groups: each caller fsyncs its own file, then
one committer thread fsyncs each folder once and commits the rows of every instance waiting at
that moment in one transaction, and only then releases each caller (``GroupCommitter``).
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import queue
import threading
import time
import warnings
from collections.abc import Collection
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement, convert_raw_data_element
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
from pacs_agent.receiving.store import InstanceStore, StoredFile, fsync_dir
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


# Element values already decoded without error, by everything their decoding depends on (see
# _verified_key): the instances of a series repeat most of their header (patient, study, series,
# equipment, geometry), so most elements of the next instance are known good. Bounded: emptied
# when full; a value longer than _VERIFIED_VALUE_MAX is decoded every time.
_VERIFIED: dict[tuple[object, ...], None] = {}
_VERIFIED_MAX = 16_384
_VERIFIED_VALUE_MAX = 256


def _verified_key(item: RawDataElement, encoding: object, mode: int) -> tuple[object, ...] | None:
    """What decoding ``item`` depends on, or None when it depends on more (its dataset).

    pydicom's conversion of a raw element is a function of its tag, VR (explicit, or the
    dictionary's for a public tag), endianness, value bytes, character set and pydicom's
    reading validation ``mode`` (RAISE turns its warnings into errors); only a private tag
    without an explicit VR (or with UN) looks further, at its private creator element.
    Sequences are never cached (their items are checked one by one)."""
    value = item.value
    if (
        value is None
        or len(value) > _VERIFIED_VALUE_MAX
        or item.tag.is_private
        and item.VR in (None, "UN")
    ):
        return None
    enc = tuple(encoding) if isinstance(encoding, list) else encoding
    return (item.tag, item.VR, item.is_implicit_VR, item.is_little_endian, enc, mode, value)


def _decode_small_elements(ds: Dataset) -> None:
    """Decode every element (so malformed values fail now) but leave deferred ones on disk.

    ``Dataset.iterall()`` would read deferred values into memory. A value decoded without error
    before (``_VERIFIED``: the same bytes, VR and character set) is not decoded again; about
    two thirds of the parse of a small CT slice was this decoding.
    """
    encoding = None
    mode = pydicom_config.settings.reading_validation_mode
    for tag in list(ds.keys()):
        item = ds.get_item(tag, keep_deferred=True)
        if isinstance(item, RawDataElement) and item.value is None:
            continue  # deferred: a large value, checked without reading it
        elem = None
        key = None
        if isinstance(item, RawDataElement) and tag != 0x00080005:
            # Converted and dropped, not stored back: ``ds[tag]`` also replaces the raw element
            # in the dataset, which cost about a quarter of the parse. Any doubt (an ambiguous
            # VR, say): pydicom's own path below decides.
            if encoding is None:
                encoding = ds.original_character_set or ds._character_set
            key = _verified_key(item, encoding, mode)
            if key is not None and key in _VERIFIED:
                continue
            try:
                elem = convert_raw_data_element(item, encoding=encoding, ds=ds)
            except Exception:
                elem = None
                key = None  # pydicom's path may look at the dataset: not remembered
        if elem is None:
            try:
                elem = ds[tag]
            except Exception:  # the value cannot be decoded; pydicom's text would quote it
                raise RejectedDataset(
                    STATUS_CANNOT_UNDERSTAND, f"{_tag_name(tag)} cannot be decoded"
                ) from None
        if elem.VR == "SQ":
            for child in elem.value:
                _decode_small_elements(child)
        elif key is not None:
            if len(_VERIFIED) >= _VERIFIED_MAX:
                _VERIFIED.clear()
            _VERIFIED[key] = None


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
        group_window_s: float = 0.002,
    ) -> None:
        self.db = db
        self.store = store
        # Instances that arrive as files are committed in groups (one folder fsync, one
        # transaction); a lone instance is committed at once, without waiting for company.
        self.committer = GroupCommitter(self, window_s=group_window_s)
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
        with self.committer.staging():
            if ds is None:
                ds = parse_part10_file(path)
            facts = examine(ds, transfer_syntax, source=path)
            self._check_space(path.stat().st_size)
            staged = self.store.stage_file(facts.study_uid, facts.series_uid, facts.sop_uid, path)
            pending = _Pending(
                facts,
                staged.stored,
                transfer_syntax,
                source,
                calling_ae,
                peer,
                staged.folders_to_sync,
                staged.entries,
                staged.generation,
            )
            self.committer.submit(pending)
        study_id = self.committer.wait(pending)  # durable and recorded, or raises
        return self._outcome(facts, staged.stored, source, study_id)

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
        return self._outcome(facts, stored, source, study_id)

    def _outcome(
        self, facts: DatasetFacts, stored: StoredFile, source: str, study_id: int
    ) -> IngestOutcome:
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
        with self.db.session() as s:
            _fast_commit(s)
            return self._record_in(
                s, facts, stored, transfer_syntax, source, calling_ae, orthanc_id, peer
            )

    def record_group(self, group: list[_Pending]) -> list[int]:
        """The rows of several staged instances in one transaction (study ids, in order).

        Their studies, series and any earlier instances with their SOP Instance UIDs are read
        once for the group (three queries), and the new instance rows are inserted together
        when the transaction commits."""
        with self.db.session() as s:
            _fast_commit(s)
            cache = _GroupCache()
            study_uids = {p.facts.study_uid for p in group}
            series_uids = {p.facts.series_uid for p in group}
            sop_uids = {p.facts.sop_uid for p in group}
            for study in s.scalars(select(Study).where(Study.study_instance_uid.in_(study_uids))):
                cache.studies[study.study_instance_uid] = study
            for ser in s.scalars(select(Series).where(Series.series_instance_uid.in_(series_uids))):
                cache.series[ser.series_instance_uid] = ser
            for inst in s.scalars(select(Instance).where(Instance.sop_instance_uid.in_(sop_uids))):
                cache.instances[inst.sop_instance_uid] = inst
            return [
                self._record_in(
                    s,
                    p.facts,
                    p.stored,
                    p.transfer_syntax,
                    p.source,
                    p.calling_ae,
                    None,
                    p.peer,
                    cache=cache,
                )
                for p in group
            ]

    def _record_in(
        self,
        s: Session,
        facts: DatasetFacts,
        stored: StoredFile,
        transfer_syntax: UID,
        source: str,
        calling_ae: str | None,
        orthanc_id: str | None,
        peer: Peer | None = None,
        cache: _GroupCache | None = None,
    ) -> int:
        now = utcnow()
        if cache is None:
            study = s.scalar(select(Study).where(Study.study_instance_uid == facts.study_uid))
        else:
            study = cache.studies.get(facts.study_uid)
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
            record_event(s, "study.receiving", f"first instance via {source}", study_id=study.id)
            if cache is not None:
                cache.studies[facts.study_uid] = study
        if cache is None:
            existing = s.scalar(select(Instance).where(Instance.sop_instance_uid == facts.sop_uid))
        else:
            existing = cache.instances.get(facts.sop_uid)
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
        if cache is None:
            series = s.scalar(select(Series).where(Series.series_instance_uid == facts.series_uid))
        else:
            series = cache.series.get(facts.series_uid)
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
            if cache is not None:
                cache.series[facts.series_uid] = series
        instance = Instance(
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
        s.add(instance)
        if cache is not None:
            cache.instances[facts.sop_uid] = instance
        study.last_received_at = now
        incoming = facts.requested_priority
        if calling_ae and calling_ae in self.stat_calling_aes:
            incoming = "stat"
        if incoming is not None:  # keep the most urgent class the study was sent with
            study.incoming_priority = more_urgent(study.incoming_priority, incoming)
        if orthanc_id:
            study.orthanc_id = orthanc_id
        return study.id


def _fast_commit(s: Session) -> None:
    if s.get_bind().dialect.name == "postgresql":
        # As for SQLite: the fsynced file is the durable record, repair rebuilds the row.
        s.execute(text("SET LOCAL synchronous_commit TO OFF"))


@dataclass
class _GroupCache:
    """What one group's transaction has read or added, by UID (so each is queried once)."""

    studies: dict[str, Study] = field(default_factory=dict)
    series: dict[str, Series] = field(default_factory=dict)
    instances: dict[str, Instance] = field(default_factory=dict)


@dataclass
class _Pending:
    """One staged instance waiting for its group: its file is fsynced, its folders and row not."""

    facts: DatasetFacts
    stored: StoredFile
    transfer_syntax: UID
    source: str
    calling_ae: str | None
    peer: Peer | None
    folders: tuple[Path, ...]
    entries: tuple[Path, ...] = ()  # see StagedFile
    generation: int = -1
    future: Future[int] = field(default_factory=Future)


# A handler waits at most this long for its group; past it, the C-STORE fails (0xC211).
_COMMIT_WAIT_S = 300.0
_MAX_GROUP = 256
_IDLE_EXIT_S = 60.0


class GroupCommitter:
    """Group commit for ingest: one thread takes every staged instance waiting at that moment,
    fsyncs each of their folders once (the new names become durable), commits all their rows in
    one transaction, and only then resolves each instance's future; each caller answers its
    C-STORE after its own future. Nothing is acknowledged before it is durable and recorded.

    While other callers are still staging (parsing, fsyncing their file), a group waits up to
    ``window_s`` for them; a lone caller is committed at once. If the group's transaction fails,
    each member is retried in a transaction of its own, so one bad row fails only its own
    C-STORE; a failed folder fsync fails every member of the group.
    """

    def __init__(self, ingestor: Ingestor, window_s: float = 0.002) -> None:
        self.ingestor = ingestor
        self.window_s = max(0.0, window_s)
        self._queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._staging = 0  # callers between the start of staging and submit()
        self._thread: threading.Thread | None = None
        # Figures for the profile and the bench: groups committed, instances in them.
        self.groups = 0
        self.instances = 0

    def staging(self) -> _Staging:
        return _Staging(self)

    def submit(self, pending: _Pending) -> None:
        with self._lock:
            self._queue.put(pending)
            if self._thread is None:  # started on demand, ends after a quiet minute
                self._thread = threading.Thread(
                    target=self._run, name="ingest-group-commit", daemon=True
                )
                self._thread.start()

    def wait(self, pending: _Pending) -> int:
        try:
            return pending.future.result(timeout=_COMMIT_WAIT_S)
        except TimeoutError:
            raise RuntimeError("group commit did not finish in time") from None

    def _run(self) -> None:
        while True:
            try:
                group = [self._queue.get(timeout=_IDLE_EXIT_S)]
            except queue.Empty:
                with self._lock:  # submit() puts and starts under this lock: nothing is lost
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            deadline = time.monotonic() + self.window_s
            while len(group) < _MAX_GROUP:
                try:
                    group.append(self._queue.get_nowait())
                    continue
                except queue.Empty:
                    pass
                with self._lock:
                    others_staging = self._staging > 0
                remaining = deadline - time.monotonic()
                if not others_staging or remaining <= 0:
                    break
                try:
                    group.append(self._queue.get(timeout=min(remaining, 0.0005)))
                except queue.Empty:
                    continue
            try:
                self._commit(group)
            except BaseException as exc:  # never leave a caller waiting
                for p in group:
                    if not p.future.done():
                        p.future.set_exception(exc)

    def _commit(self, group: list[_Pending]) -> None:
        try:
            for folder in dict.fromkeys(f for p in group for f in p.folders):
                fsync_dir(folder)
        except OSError as exc:
            err: Exception = exc
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                err = RejectedDataset(STATUS_OUT_OF_RESOURCES, "disk full: cannot store")
            for p in group:
                p.future.set_exception(err)
            return
        for p in group:
            self.ingestor.store.entries_synced(p.entries, p.generation)
        try:
            ids = self.ingestor.record_group(group)
        except Exception:
            # One member spoiled the transaction (or a race with another agent on the same
            # database): each on its own, so only the bad one fails.
            for p in group:
                try:
                    p.future.set_result(
                        self.ingestor._record_retrying(
                            p.facts,
                            p.stored,
                            p.transfer_syntax,
                            p.source,
                            p.calling_ae,
                            None,
                            p.peer,
                        )
                    )
                except Exception as exc:
                    p.future.set_exception(exc)
        else:
            for p, study_id in zip(group, ids, strict=True):
                p.future.set_result(study_id)
        self.groups += 1
        self.instances += len(group)


class _Staging:
    """Counts a caller as staging (so that a forming group waits a moment for it)."""

    def __init__(self, committer: GroupCommitter) -> None:
        self.committer = committer

    def __enter__(self) -> None:
        with self.committer._lock:
            self.committer._staging += 1

    def __exit__(self, *exc: object) -> None:
        with self.committer._lock:
            self.committer._staging -= 1


def study_id_for(s: Session, study_uid: str) -> int | None:
    return s.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
