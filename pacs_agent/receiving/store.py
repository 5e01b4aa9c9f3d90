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
        folder.mkdir(parents=True, exist_ok=True)
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
            fsync_dir(folder)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredFile(self._rel(target), len(data), digest, outcome)

    def write_file(self, study_uid: str, series_uid: str, sop_uid: str, src: Path) -> StoredFile:
        """Like write(), from a file (streamed: a large dataset is never held in memory).

        ``src`` is left in place; it is hard-linked when it lies on the same filesystem.
        """
        parts = (
            _check_uid(study_uid, "Study Instance UID"),
            _check_uid(series_uid, "Series Instance UID"),
        )
        _check_uid(sop_uid, "SOP Instance UID")
        folder = self.root.joinpath(*parts)
        folder.mkdir(parents=True, exist_ok=True)
        digest = sha256_file(src)
        size = src.stat().st_size
        target = folder / f"{sop_uid}.dcm"
        outcome = "new"
        if target.exists():
            if sha256_file(target) == digest:
                return StoredFile(self._rel(target), size, digest, "same")
            target = folder / f"{sop_uid}.conflict-{digest[:12]}.dcm"
            outcome = "conflict"
        tmp = folder / f".incoming-{uuid.uuid4().hex}.part"
        try:
            try:
                os.link(src, tmp)
            except OSError:  # another filesystem: copy in chunks
                with open(src, "rb") as fin, open(tmp, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
            fsync_dir(folder)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StoredFile(self._rel(target), size, digest, outcome)

    def _rel(self, p: Path) -> str:
        return p.relative_to(self.root).as_posix()
