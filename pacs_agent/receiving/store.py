"""Durable instance store: files named by UID only, fsynced before anyone is told "stored"."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


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
    """A file fsynced under its final name; durable once ``folders_to_sync`` are fsynced."""

    stored: StoredFile
    folders_to_sync: tuple[Path, ...]


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
        parents = self._make_folders(folder)
        digest = sha256_file(src)
        size = src.stat().st_size
        target = folder / f"{sop_uid}.dcm"
        outcome = "new"
        if target.exists():
            if sha256_file(target) == digest:
                # Already there; its folder may still await the fsync of another group.
                stored = StoredFile(self._rel(target), size, digest, "same")
                return StagedFile(stored, (*parents, folder))
            target = folder / f"{sop_uid}.conflict-{digest[:12]}.dcm"
            outcome = "conflict"
        tmp = folder / f".incoming-{uuid.uuid4().hex}.part"
        try:
            try:
                os.link(src, tmp)
            except OSError:  # another filesystem: copy in chunks
                with open(src, "rb") as fin, open(tmp, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StagedFile(StoredFile(self._rel(target), size, digest, outcome), (*parents, folder))

    def _make_folders(self, folder: Path) -> tuple[Path, ...]:
        """Create ``folder`` (study/series) if needed; return the parents whose entries must be
        durable too: a new study folder is an entry in the store root, a new series folder one
        in its study folder. Always both, not only when this call created them: another
        association may have created them a moment ago and not fsynced them yet. An fsync of
        an unchanged folder costs next to nothing (and a group does each folder once)."""
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
        return (self.root, folder.parent)

    def _rel(self, p: Path) -> str:
        return p.relative_to(self.root).as_posix()
