"""Similar-case retrieval: the k most similar earlier images by cosine similarity of the
encoder's CLS embedding.

The database is the record: each worker writes one ``embeddings`` row per analysed image (unit
float32 vector, the checksum of the bundle that made it) in the transaction of the job's
results. The agent holds the index: one usearch HNSW index per bundle checksum (vectors of
different bundles are never compared), filled from the table and caught up on every query with
the rows it has not seen (ids above the last one seen, plus a window below it for
transactions that committed late). Nothing lives only on one host: any agent, on SQLite or on
PostgreSQL, rebuilds the same index from the table; a snapshot on disk (optional) only makes the
rebuild faster and is thrown away when it does not match the database.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_agent.db.models import Embedding
from pacs_agent.db.session import Database

log = logging.getLogger(__name__)

__all__ = [
    "Hit",
    "IndexService",
    "IndexUnavailable",
    "SimilarityIndex",
    "decode_vector",
    "encode_vector",
    "make_index",
]

# HNSW parameters measured with `pacs-agent bench retrieval` (docs/benchmarks.md, Retrieval).
CONNECTIVITY = 16
EXPANSION_ADD = 64
EXPANSION_SEARCH = 256
INDEX_DTYPE = "f16"  # half the memory of f32 at the same recall on CLS-like data
# Rows with ids this far below the last one seen are looked at again on each catch-up: a
# transaction that took its id earlier but committed later is not missed.
LATE_COMMIT_WINDOW = 4096
BATCH_ROWS = 20_000


def encode_vector(v: Sequence[float] | np.ndarray) -> bytes:
    """A vector as stored: unit norm, little-endian float32. Raises ValueError for an empty,
    non-finite or zero vector."""
    a = np.asarray(v, dtype=np.float32).reshape(-1)
    if a.size == 0 or not np.all(np.isfinite(a)):
        raise ValueError("an embedding must be a non-empty finite vector")
    norm = float(np.linalg.norm(a))
    if norm == 0.0:
        raise ValueError("an embedding must not be the zero vector")
    return (a / norm).astype("<f4").tobytes()


def decode_vector(b: bytes, dim: int) -> np.ndarray:
    a = np.frombuffer(b, dtype="<f4")
    if a.size != dim:
        raise ValueError(f"stored vector has {a.size} values, its row says {dim}")
    return a.astype(np.float32)


def make_index(dim: int, dtype: str = INDEX_DTYPE) -> Any:
    """An empty cosine HNSW index (usearch) with the measured parameters."""
    from usearch.index import Index

    return Index(
        ndim=dim,
        metric="cos",
        dtype=dtype,
        connectivity=CONNECTIVITY,
        expansion_add=EXPANSION_ADD,
        expansion_search=EXPANSION_SEARCH,
    )


@dataclass(frozen=True)
class Hit:
    embedding_id: int
    distance: float  # cosine distance, 1 - cos(a, b): 0 identical, 2 opposite


@dataclass
class _BundleIndex:
    dim: int
    index: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


class SimilarityIndex:
    """The agent's index over the ``embeddings`` table, one HNSW graph per bundle checksum.

    ``refresh`` adds the rows not yet in it (the first call loads the whole table, or the
    snapshot plus the rows after it); ``search`` answers the nearest earlier images of a vector
    within one bundle. Thread-safe: requests of the API share one instance.
    """

    def __init__(self, db: Database | None, snapshot_dir: Path | None = None) -> None:
        self.db = db
        self.snapshot_dir = snapshot_dir
        self._bundles: dict[str, _BundleIndex] = {}
        self._last_id = 0
        self._lock = threading.Lock()
        self._loaded = False

    # ----------------------------------------------------------------------------------------
    # filling

    def __len__(self) -> int:
        return sum(len(b.index) for b in self._bundles.values())

    @property
    def last_id(self) -> int:
        return self._last_id

    def bundles(self) -> list[str]:
        return sorted(self._bundles)

    def _bundle(self, checksum: str, dim: int) -> _BundleIndex:
        b = self._bundles.get(checksum)
        if b is None:
            b = self._bundles[checksum] = _BundleIndex(dim, make_index(dim))
        elif b.dim != dim:
            raise ValueError(f"bundle {checksum[:12]}: vectors of {dim} values, index has {b.dim}")
        return b

    def add(self, rows: Iterable[tuple[int, str, int, bytes]]) -> int:
        """Add (id, bundle_checksum, dim, vector bytes) rows; ids already present are skipped."""
        groups: dict[str, tuple[list[int], list[np.ndarray], int]] = {}
        for row_id, checksum, dim, vector in rows:
            try:
                v = decode_vector(vector, dim)
            except ValueError as exc:
                log.warning("embedding %s left out of the index: %s", row_id, exc)
                continue
            keys, vecs, _ = groups.setdefault(checksum, ([], [], dim))
            keys.append(int(row_id))
            vecs.append(v)
        added = 0
        for checksum, (keys, vecs, _dim) in groups.items():
            try:
                added += self.add_vectors(checksum, np.asarray(keys), np.stack(vecs))
            except ValueError as exc:
                log.warning("%d embeddings left out of the index: %s", len(keys), exc)
        return added

    def add_vectors(self, checksum: str, keys: np.ndarray, vectors: np.ndarray) -> int:
        """Add unit vectors [n, dim] under their embedding ids; ids already present are
        skipped. Returns the number added."""
        if len(keys) == 0:
            return 0
        b = self._bundle(checksum, int(vectors.shape[1]))
        key_array = np.asarray(keys, dtype=np.uint64)
        with b.lock:
            if len(b.index):
                fresh = np.flatnonzero(~np.asarray(b.index.contains(key_array), dtype=bool))
            else:
                fresh = np.arange(len(key_array))
            if fresh.size:
                b.index.add(key_array[fresh], vectors[fresh], threads=_threads())
        self._last_id = max(self._last_id, int(key_array.max()))
        return int(fresh.size)

    def memory_bytes(self) -> int:
        return sum(int(b.index.memory_usage) for b in self._bundles.values())

    def refresh(self) -> int:
        """Catch up with the table: returns the number of vectors added."""
        if self.db is None:
            raise RuntimeError("this index has no database to catch up with")
        with self._lock:
            if not self._loaded:
                self._load_snapshot()
                self._loaded = True
            added = 0
            with self.db.session() as s:
                # ids of the late-commit window the index does not hold yet
                low = max(0, self._last_id - LATE_COMMIT_WINDOW)
                late = [
                    (i, c)
                    for i, c in s.execute(
                        select(Embedding.id, Embedding.bundle_checksum).where(
                            Embedding.id > low, Embedding.id <= self._last_id
                        )
                    )
                    if c not in self._bundles or i not in self._bundles[c].index
                ]
                if late:
                    added += self.add(_rows(s, Embedding.id.in_([i for i, _ in late])))
                while True:
                    before = self._last_id
                    batch = list(
                        _rows(
                            s,
                            Embedding.id > self._last_id,
                            limit=BATCH_ROWS,
                        )
                    )
                    if not batch:
                        break
                    added += self.add(batch)
                    self._last_id = max(before, max(r[0] for r in batch))
            return added

    # ----------------------------------------------------------------------------------------
    # searching

    def search(
        self,
        checksum: str,
        vector: np.ndarray,
        k: int,
        *,
        accept: Any = None,
    ) -> list[Hit]:
        """The k nearest vectors of bundle ``checksum`` (cosine distance, nearest first) that
        ``accept(embedding_id)`` lets through (all when None). Asks the graph for more
        candidates until k are accepted or the bundle has no more."""
        b = self._bundles.get(checksum)
        if b is None or len(b.index) == 0 or k < 1:
            return []
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        if q.size != b.dim:
            raise ValueError(f"query has {q.size} values, bundle index has {b.dim}")
        total = len(b.index)
        want = min(total, max(4 * k, k + 16))
        while True:
            with b.lock:
                m = b.index.search(q, want, threads=1)
            keys = np.asarray(m.keys).reshape(-1)
            dists = np.asarray(m.distances).reshape(-1)
            hits = [
                Hit(int(key), float(d))
                for key, d in zip(keys, dists, strict=True)
                if accept is None or accept(int(key))
            ]
            if len(hits) >= k or want >= total:
                return hits[:k]
            want = min(total, want * 4)

    # ----------------------------------------------------------------------------------------
    # snapshot

    def save_snapshot(self) -> None:
        """Write each bundle's graph and the last id seen (atomic per file)."""
        if self.snapshot_dir is None or self.db is None:
            return
        with self._lock:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
            with self.db.session() as s:
                anchor = s.get(Embedding, self._last_id) if self._last_id else None
            meta = {
                "last_id": self._last_id,
                # the row that proves the snapshot belongs to this database
                "anchor_sop": anchor.sop_instance_uid if anchor else None,
                "bundles": {c: b.dim for c, b in self._bundles.items()},
            }
            for c, b in self._bundles.items():
                tmp = self.snapshot_dir / f"{c}.usearch.tmp"
                with b.lock:
                    b.index.save(str(tmp))
                tmp.replace(self.snapshot_dir / f"{c}.usearch")
            tmp_meta = self.snapshot_dir / "index.json.tmp"
            tmp_meta.write_text(json.dumps(meta))
            tmp_meta.replace(self.snapshot_dir / "index.json")

    def _load_snapshot(self) -> None:
        if self.db is None or self.snapshot_dir is None:
            return
        if not (self.snapshot_dir / "index.json").exists():
            return
        try:
            meta = json.loads((self.snapshot_dir / "index.json").read_text())
            last_id = int(meta["last_id"])
            with self.db.session() as s:
                anchor = s.get(Embedding, last_id) if last_id else None
            if last_id and (anchor is None or anchor.sop_instance_uid != meta["anchor_sop"]):
                log.info("retrieval snapshot does not match the database: rebuilding")
                return
            bundles: dict[str, _BundleIndex] = {}
            for c, dim in meta["bundles"].items():
                index = make_index(int(dim))
                index.load(str(self.snapshot_dir / f"{c}.usearch"))
                bundles[c] = _BundleIndex(int(dim), index)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.warning("retrieval snapshot not used (%s): rebuilding from the database", exc)
            return
        self._bundles = bundles
        self._last_id = last_id
        log.info("retrieval snapshot loaded: %d vectors up to id %d", len(self), last_id)


class IndexUnavailable(Exception):
    """The index is still loading (or its last catch-up failed): try again later."""


class IndexService:
    """The agent's one ``SimilarityIndex``: each query starts a catch-up with the table in a
    background thread and waits for it at most ``wait_s`` (the first load of a large table
    takes longer: the query is answered 503 meanwhile, and the load goes on). A snapshot is
    written in the background at most every ``snapshot_every_s``."""

    def __init__(
        self,
        db: Database,
        snapshot_dir: Path | None = None,
        *,
        wait_s: float = 10.0,
        snapshot_every_s: float = 600.0,
    ) -> None:
        self.index = SimilarityIndex(db, snapshot_dir)
        self.wait_s = wait_s
        self.snapshot_every_s = snapshot_every_s
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._ready = False
        self._saved_at = time.monotonic()
        self._unsaved = 0

    def _catch_up(self) -> None:
        try:
            self._unsaved += self.index.refresh()
            self._error = None
            self._ready = True
            if self._unsaved and time.monotonic() - self._saved_at >= self.snapshot_every_s:
                self.index.save_snapshot()
                self._saved_at = time.monotonic()
                self._unsaved = 0
        except Exception as exc:  # kept for the waiting query, which reports it
            log.warning("retrieval index catch-up failed: %s", type(exc).__name__)
            self._error = exc

    def current(self, wait_s: float | None = None) -> SimilarityIndex:
        """The index, caught up with the table; raises IndexUnavailable when it is not ready
        within the wait."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._catch_up, name="retrieval-index", daemon=True
                )
                self._thread.start()
            thread = self._thread
        thread.join(self.wait_s if wait_s is None else wait_s)
        if thread.is_alive():
            if not self._ready:
                raise IndexUnavailable(
                    f"the similarity index is loading ({len(self.index)} so far)"
                )
            return self.index  # a slow catch-up: answer from what is there
        if self._error is not None:
            raise IndexUnavailable(
                f"the similarity index could not catch up: {type(self._error).__name__}"
            )
        return self.index


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def _rows(
    s: Session, *where: Any, limit: int | None = None
) -> Iterable[tuple[int, str, int, bytes]]:
    stmt = (
        select(Embedding.id, Embedding.bundle_checksum, Embedding.dim, Embedding.vector)
        .where(*where)
        .order_by(Embedding.id)
    )
    if limit is not None:
        stmt = stmt.limit(limit)
    for row_id, checksum, dim, vector in s.execute(stmt):
        yield int(row_id), str(checksum), int(dim), bytes(vector)
