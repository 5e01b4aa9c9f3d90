"""Durable instance store: files named by UID only, fsynced before anyone is told "stored"."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# A received file at least this large has its bytes flushed to disk in a helper thread while
# the handler computes its SHA-256 (both release the GIL): for a 7 MB radiograph the two took
# about the same time one after the other. A small file is flushed inline (a thread hand-off
# would cost more than it saves).
_OVERLAP_MIN_BYTES = 512 * 1024
_SYNC_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store-sync")
# Folders remembered as durable at most (then forgotten all at once: only costs fsyncs).
_DURABLE_ENTRIES_MAX = 65_536


class StoreError(Exception):
    pass


@dataclass(frozen=True)
class StoredFile:
    relpath: str
    size: int
    sha256: str
    # "new": written now; "same": an identical file was already there (idempotent re-send);
    # "conflict": a different file had this SOP Instance UID; the new bytes were kept aside.
    outcome: str


@dataclass(frozen=True)
class StagedFile:
    """A file fsynced under its final name; durable once ``folders_to_sync`` are fsynced.

    ``entries``: the folders whose own entry (in their parent) was not known durable when the
    file was staged, and ``generation`` the store's folder-creation count at that moment: after
    the fsyncs, ``InstanceStore.entries_synced(entries, generation)`` remembers them, so that the
    next instances of the same series fsync their series folder only."""

    stored: StoredFile
    folders_to_sync: tuple[Path, ...]
    entries: tuple[Path, ...] = ()
    generation: int = -1


def _check_uid(uid: str, what: str) -> str:
    if not uid or len(uid) > 64 or not _UID_RE.match(uid):
        raise StoreError(f"invalid {what} for a file name")
    return uid


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fdatasync_path(path: Path) -> None:
    """The file's data and size on disk (not its modification time)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class InstanceStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        # Study and series folders whose entry in their parent folder this process has fsynced
        # since it last saw them missing. Starts empty: a folder made by an earlier process
        # that crashed before its fsync is fsynced again on first use.
        self._durable_entries: set[Path] = set()
        # Folders this store has set out to create; a mark made by a group staged before the
        # latest creation is dropped (the folder may be another one under the same name, made
        # again after retention removed it).
        self._generation = 0
        self._lock = threading.Lock()

    def path_for(self, relpath: str) -> Path:
        p = (self.root / relpath).resolve()
        if self.root.resolve() not in p.parents:
            raise StoreError("path outside the instance store")
        return p

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def write(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> StoredFile:
        """Write ``data`` (a DICOM Part 10 file) durably and return where it went."""
        parts = (
            _check_uid(study_uid, "Study Instance UID"),
            _check_uid(series_uid, "Series Instance UID"),
        )
        _check_uid(sop_uid, "SOP Instance UID")
        folder = self.root.joinpath(*parts)
        parents = self._make_folders(folder)
        digest = hashlib.sha256(data).hexdigest()
        target = folder / f"{sop_uid}.dcm"
        outcome = "new"
        if target.exists():
            if sha256_file(target) == digest:
                return StoredFile(self._rel(target), len(data), digest, "same")
            target = folder / f"{sop_uid}.conflict-{digest[:12]}.dcm"
            outcome = "conflict"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".incoming-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            for parent in (*parents, folder):
                fsync_dir(parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredFile(self._rel(target), len(data), digest, outcome)

    def write_file(self, study_uid: str, series_uid: str, sop_uid: str, src: Path) -> StoredFile:
        """Like write(), from a file (streamed: a large dataset is never held in memory).

        ``src`` is left in place; it is hard-linked when it lies on the same filesystem.
        """
        staged = self.stage_file(study_uid, series_uid, sop_uid, src)
        for folder in staged.folders_to_sync:
            fsync_dir(folder)
        self.entries_synced(staged.entries, staged.generation)
        return staged.stored

    def stage_file(self, study_uid: str, series_uid: str, sop_uid: str, src: Path) -> StagedFile:
        """The file part of write_file(): the instance's own bytes are fsynced and it has its
        final name, but that name is durable only once ``folders_to_sync`` are fsynced (the
        group committer does that once per folder for every instance that arrived together).

        ``src`` is left in place; it is hard-linked when it lies on the same filesystem.
        """
        parts = (
            _check_uid(study_uid, "Study Instance UID"),
            _check_uid(series_uid, "Series Instance UID"),
        )
        _check_uid(sop_uid, "SOP Instance UID")
        folder = self.root.joinpath(*parts)
        self._make_folders(folder)
        size = src.stat().st_size
        src_sync: Future[None] | None = None
        if size >= _OVERLAP_MIN_BYTES:
            src_sync = _SYNC_POOL.submit(fdatasync_path, src)
        try:
            digest = sha256_file(src)
        finally:
            if src_sync is not None:
                src_sync.result()  # also when hashing failed: no flush left running behind
        target = folder / f"{sop_uid}.dcm"
        outcome = "new"
        if target.exists():
            if sha256_file(target) == digest:
                # Already there; its folder may still await the fsync of another group.
                return self._staged(folder, StoredFile(self._rel(target), size, digest, "same"))
            target = folder / f"{sop_uid}.conflict-{digest[:12]}.dcm"
            outcome = "conflict"
        tmp = folder / f".incoming-{uuid.uuid4().hex}.part"
        try:
            try:
                os.link(src, tmp)  # the same inode: its data flushed above stays flushed
                synced = src_sync is not None
            except OSError:  # another filesystem: copy in chunks
                with open(src, "rb") as fin, open(tmp, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
                synced = False
            if not synced:
                # Data and the size needed to read it back (the folder fsync makes the entry
                # that points to it durable); not the modification time.
                fdatasync_path(tmp)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self._staged(folder, StoredFile(self._rel(target), size, digest, outcome))

    def _staged(self, folder: Path, stored: StoredFile) -> StagedFile:
        """What must be fsynced for ``stored`` (in ``folder``, which exists now) to be durable:
        ``folder`` itself (the new name), and the parent of each of the series and study
        folders whose entry this process has not fsynced yet. Read after the file is in place,
        so a folder made again meanwhile (``_make_folders`` forgets it first) is included."""
        with self._lock:
            entries = tuple(f for f in (folder.parent, folder) if f not in self._durable_entries)
            generation = self._generation
        to_sync = tuple(f.parent for f in entries) + (folder,)
        return StagedFile(stored, to_sync, entries, generation)

    def entries_synced(self, entries: Iterable[Path], generation: int) -> None:
        """Called once the folders of a StagedFile were fsynced: its ``entries`` are durable,
        unless a folder was made since it was staged (then nothing is remembered; the next
        instance fsyncs the parents again)."""
        with self._lock:
            if generation == self._generation:
                if len(self._durable_entries) >= _DURABLE_ENTRIES_MAX:
                    self._durable_entries.clear()
                self._durable_entries.update(entries)

    def _make_folders(self, folder: Path) -> tuple[Path, ...]:
        """Create ``folder`` (study/series) if needed; return the parents whose entries must be
        durable too (for write(), which fsyncs them all): a new study folder is an entry in the
        store root, a new series folder one in its study folder. Before creating, the folder
        and its study folder are forgotten as durable (retention may have removed them)."""
        if not folder.is_dir():
            with self._lock:
                self._durable_entries.discard(folder)
                self._durable_entries.discard(folder.parent)
                self._generation += 1
            folder.mkdir(parents=True, exist_ok=True)
        return (self.root, folder.parent)

    def _rel(self, p: Path) -> str:
        return p.relative_to(self.root).as_posix()
