"""Similar-case retrieval: the k most similar earlier images by cosine similarity of the
encoder's CLS embedding.

The database is the record: each worker writes one ``embeddings`` row per analysed image (unit
float32 vector, the checksum of the bundle that made it) in the transaction of the job's
results. The agent holds the index: one FAISS index per bundle checksum (vectors of
different bundles are never compared), filled from the table and caught up on every query with
the rows it has not seen (ids above the last one seen, plus a window below it for
transactions that committed late). Nothing lives only on one host: any agent, on SQLite or on
PostgreSQL, rebuilds the same index from the table; a snapshot on disk (optional) only makes the
rebuild faster and is thrown away when it does not match the database.

Why FAISS inverted lists and not a graph (docs/benchmarks.md, Retrieval): a usearch HNSW graph
(M=16) answered within 5 ms at 1M vectors but its recall@10 stopped near 0.9 however wide the
search, and a denser graph builds in tens of minutes on two cores. A bundle is searched exactly
(half-precision flat scan) up to ``EXACT_MAX`` vectors; beyond that it becomes an IVF index
(k-means coarse lists, half-precision vectors, ``NPROBE`` lists per query) that is retrained
from its own vectors each time the bundle has doubled, so the lists follow the data as it grows
and drifts. Training, adding and retraining run in the catch-up thread; searches go on against
the previous index until the new one is swapped in.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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
]

# Parameters measured with `pacs-agent bench retrieval` (docs/benchmarks.md, Retrieval).
EXACT_MAX = 20_000  # a bundle this small is scanned exactly (under 2 ms at 768-d)
LIST_SIZE = 500  # an IVF is (re)trained with about N / LIST_SIZE lists (a power of two)
NPROBE = 16  # lists scanned per query
TRAIN_PER_LIST = 40  # k-means sample: this many vectors per list (FAISS asks for 39 or more)
REGROW = 2.0  # retrain when the bundle has this many times the vectors it was trained on
KMEANS_ITERATIONS = 10  # FAISS's default is 25; lists this coarse settle in fewer
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


@dataclass(frozen=True)
class Hit:
    embedding_id: int
    distance: float  # cosine distance, 1 - cos(a, b): 0 identical, 2 opposite


@functools.cache
def _faiss() -> Any:
    """FAISS, imported once on first use (the agent starts without it when nobody searches)."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it chose
    import faiss

    return faiss


def _lists_for(n: int) -> int:
    """Inverted lists for n vectors: the power of two nearest above n / LIST_SIZE, at least 64."""
    return max(64, 1 << max(0, int(np.ceil(np.log2(max(1.0, n / LIST_SIZE))))))


class _BundleIndex:
    """The vectors of one bundle: an exact half-precision scan while small, then an IVF index
    retrained as the bundle grows. ``add`` is called by one writer (the catch-up); ``search``
    from any number of request threads."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.lock = threading.Lock()
        self.ids = np.empty(0, dtype=np.int64)  # insertion order; the exact scan's row -> id
        self.known: set[int] = set()
        self.trained_on = 0  # vectors the IVF was trained with; 0 while exact
        self.nprobe = NPROBE
        faiss = _faiss()
        self.index: Any = faiss.IndexScalarQuantizer(
            dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, key: int) -> bool:
        return int(key) in self.known

    @property
    def exact(self) -> bool:
        return self.trained_on == 0

    @property
    def nlist(self) -> int:
        return 0 if self.exact else int(self.index.nlist)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        return np.fromiter((int(k) in self.known for k in keys), dtype=bool, count=len(keys))

    def memory_bytes(self) -> int:
        """An estimate: half-precision codes and ids, plus the IVF's centroids."""
        per = self.dim * 2 + (8 if not self.exact else 0)
        centroids = 0 if self.exact else int(self.index.nlist) * self.dim * 4
        return len(self.ids) * per + centroids + len(self.ids) * 8

    def vectors(self, extra: int = 0) -> np.ndarray:
        """Every vector held, in ``self.ids`` order (from the half-precision codes), in an array
        with ``extra`` more rows left for the caller to fill (one copy when retraining)."""
        out = np.empty((len(self.ids) + extra, self.dim), dtype=np.float32)
        if self.exact:
            if len(self.ids):
                out[: len(self.ids)] = self.index.reconstruct_n(0, len(self.ids))
            return out
        for start in range(0, len(self.ids), 65536):
            chunk = self.ids[start : start + 65536]
            out[start : start + len(chunk)] = self.index.reconstruct_batch(chunk)
        return out

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add new (key, unit vector) rows, retraining first when the bundle outgrows its lists."""
        keys = np.asarray(keys, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        total = len(self.ids) + len(keys)
        if total > EXACT_MAX and (self.exact or total >= REGROW * self.trained_on):
            all_ids = np.concatenate([self.ids, keys])
            everything = self.vectors(extra=len(keys))
            everything[len(self.ids) :] = vectors
            fresh = _train_ivf(self.dim, everything, all_ids)
            with self.lock:
                self.index, self.ids, self.trained_on = fresh, all_ids, total
        else:
            with self.lock:
                if self.exact:
                    self.index.add(vectors)
                else:
                    self.index.add_with_ids(vectors, keys)
                self.ids = np.concatenate([self.ids, keys])
        self.known.update(int(k) for k in keys)

    def search(self, q: np.ndarray, want: int, widen: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(ids, cosine distances) of up to ``want`` nearest, nearest first; ``widen`` scans
        that many times ``nprobe`` lists."""
        faiss = _faiss()
        with self.lock:
            if self.exact:
                sims, rows = self.index.search(q.reshape(1, -1), want)
                rows = rows[0]
                ids = np.where(rows >= 0, self.ids[np.clip(rows, 0, None)], -1)
            else:
                nprobe = min(self.index.nlist, self.nprobe * widen)
                params = faiss.SearchParametersIVF(nprobe=nprobe)
                sims, found = self.index.search(q.reshape(1, -1), want, params=params)
                ids = found[0]
        keep = ids >= 0
        return ids[keep], 1.0 - sims[0][keep]

    def save(self, path: Path) -> None:
        faiss = _faiss()
        with self.lock:
            faiss.write_index(self.index, str(path.with_suffix(".faiss.tmp")))
            np.save(path.with_suffix(".ids.tmp.npy"), self.ids)
            trained_on = self.trained_on
        path.with_suffix(".faiss.tmp").replace(path.with_suffix(".faiss"))
        path.with_suffix(".ids.tmp.npy").replace(path.with_suffix(".ids.npy"))
        path.with_suffix(".json").write_text(json.dumps({"trained_on": trained_on}))

    @classmethod
    def load(cls, path: Path, dim: int) -> _BundleIndex:
        faiss = _faiss()
        b = cls(dim)
        index = faiss.read_index(str(path.with_suffix(".faiss")))
        ids = np.load(path.with_suffix(".ids.npy"))
        trained_on = int(json.loads(path.with_suffix(".json").read_text())["trained_on"])
        if index.d != dim or index.ntotal != len(ids):
            raise ValueError("snapshot files do not agree with each other")
        if trained_on:  # read_index gives the concrete IVF class; its direct map is kept
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
        b.index, b.ids, b.trained_on = index, ids.astype(np.int64), trained_on
        b.known = {int(k) for k in ids}
        return b


def _train_ivf(dim: int, vectors: np.ndarray, ids: np.ndarray) -> Any:
    """An IVF index (half-precision codes, inner product on unit vectors) trained on a sample
    of ``vectors`` and holding all of them under ``ids``."""
    faiss = _faiss()
    nlist = _lists_for(len(vectors))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )
    index.cp.seed = 1234
    index.cp.niter = KMEANS_ITERATIONS
    sample = min(len(vectors), nlist * TRAIN_PER_LIST)
    rng = np.random.default_rng(len(vectors))
    pick = np.sort(rng.choice(len(vectors), sample, replace=False))
    t0 = time.perf_counter()
    index.train(vectors[pick])
    index.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct by id for retraining
    index.add_with_ids(vectors, ids)
    log.info(
        "similarity index trained: %d vectors, %d lists, %.1f s",
        len(vectors),
        nlist,
        time.perf_counter() - t0,
    )
    return index


class SimilarityIndex:
    """The agent's index over the ``embeddings`` table, one FAISS index per bundle checksum.

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
        return sum(len(b) for b in self._bundles.values())

    @property
    def last_id(self) -> int:
        return self._last_id

    def bundles(self) -> list[str]:
        return sorted(self._bundles)

    def _bundle(self, checksum: str, dim: int) -> _BundleIndex:
        b = self._bundles.get(checksum)
        if b is None:
            b = self._bundles[checksum] = _BundleIndex(dim)
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
        key_array = np.asarray(keys, dtype=np.int64)
        fresh = np.flatnonzero(~b.contains(key_array)) if len(b) else np.arange(len(key_array))
        if fresh.size:
            _faiss().omp_set_num_threads(_threads())
            b.add(key_array[fresh], np.asarray(vectors, dtype=np.float32)[fresh])
        self._last_id = max(self._last_id, int(key_array.max()))
        return int(fresh.size)

    def memory_bytes(self) -> int:
        return sum(b.memory_bytes() for b in self._bundles.values())

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
                    if c not in self._bundles or i not in self._bundles[c]
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
        if b is None or len(b) == 0 or k < 1:
            return []
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        if q.size != b.dim:
            raise ValueError(f"query has {q.size} values, bundle index has {b.dim}")
        total = len(b)
        want = min(total, max(4 * k, k + 16))
        widen = 1
        while True:
            keys, dists = b.search(q, want, widen)
            hits = [
                Hit(int(key), float(d))
                for key, d in zip(keys, dists, strict=True)
                if accept is None or accept(int(key))
            ]
            if len(hits) >= k or (want >= total and (b.exact or widen * b.nprobe >= b.nlist)):
                return hits[:k]
            want = min(total, want * 4)
            widen *= 4  # more lists too: the accepted ones may lie outside the nearest lists

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
                b.save(self.snapshot_dir / c)
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
                bundles[c] = _BundleIndex.load(self.snapshot_dir / c, int(dim))
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
