"""``pacs-agent bench retrieval [--n N]``: the similar-case index at scale.

Builds the agent's index (pacs_agent.retrieval: FAISS, exact while small, then inverted lists
with half-precision vectors; cosine; the product's parameters) over N 768-d vectors drawn like
real embeddings: a mixture of Gaussians (1,000 clusters by default), each cluster spread along
a few directions of its own plus a little isotropic noise, then normalised (uniform random
high-dimensional vectors have no meaningful neighbours). Queries are new vectors of the same
mixture. Prints build time, memory, query p50/p95 (one query at a time, one thread) and
recall@10 against an exact search (numpy).

``--database-url``: the deployment's path instead: the vectors are written to the
``embeddings`` table of that (migrated) database as the workers write them, and the index is
built from the table by ``SimilarityIndex.refresh``; the rows are removed afterwards.

The last line is exactly ``retrieval: N vectors, recall@10 R, p50 X ms, p95 Y ms``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import uuid
from collections.abc import Sequence

import numpy as np

from pacs_agent import retrieval
from pacs_agent.db.session import Database

DIM = 768
BENCH_BUNDLE = "bench-" + "0" * 58  # a checksum no real bundle has (64 characters)


class Mixture:
    """Clustered unit vectors: cluster centre + low-rank spread + isotropic noise."""

    def __init__(self, dim: int = DIM, clusters: int = 1000, rank: int = 16, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dim, self.clusters, self.rank = dim, clusters, rank
        self.centres = rng.standard_normal((clusters, dim), dtype=np.float32)
        # spread comparable to the distance between centres, along `rank` directions
        self.bases = rng.standard_normal((clusters, rank, dim), dtype=np.float32) * 0.25
        self.noise = 0.1

    def draw(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        which = rng.integers(0, self.clusters, n)
        out = np.empty((n, self.dim), dtype=np.float32)
        order = np.argsort(which, kind="stable")
        bounds = np.searchsorted(which[order], np.arange(self.clusters + 1))
        for c in range(self.clusters):
            rows = order[bounds[c] : bounds[c + 1]]
            if rows.size == 0:
                continue
            z = rng.standard_normal((rows.size, self.rank), dtype=np.float32)
            x = self.centres[c] + z @ self.bases[c]
            x += self.noise * rng.standard_normal(x.shape, dtype=np.float32)
            out[rows] = x
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Row indices of the k largest cosine similarities per query (brute force, chunked)."""
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), k), dtype=np.int64)
    chunk = 100_000
    for start in range(0, len(base), chunk):
        sims = queries @ base[start : start + chunk].T
        kk = min(k, sims.shape[1])
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, part, 1)], axis=1)
        cand_i = np.concatenate([best_i, part + start], axis=1)
        top = np.argsort(-cand_s, axis=1)[:, :k]
        best_s = np.take_along_axis(cand_s, top, 1)
        best_i = np.take_along_axis(cand_i, top, 1)
    return best_i


def _load() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _fill_database(url: str, base: np.ndarray) -> tuple[int, Database, int]:
    """Write the vectors as embeddings rows of a bench study: (first id, database, study id)."""
    from sqlalchemy import func, insert, select

    from pacs_agent.db.models import Embedding, Study

    db = Database(url)
    with db.session() as s:
        study = Study(study_instance_uid=f"2.25.{uuid.uuid4().int}", source="bench")
        s.add(study)
        s.flush()
        study_id = study.id
    batch = 5000
    for start in range(0, len(base), batch):
        rows = [
            {
                "sop_instance_uid": f"2.25.{start + i}",
                "study_id": study_id,
                "bundle_checksum": BENCH_BUNDLE,
                "is_demo": False,
                "dim": DIM,
                "vector": retrieval.encode_vector(v),
            }
            for i, v in enumerate(base[start : start + batch])
        ]
        with db.session() as s:
            s.execute(insert(Embedding), rows)
    with db.session() as s:
        first = s.scalar(select(func.min(Embedding.id)).where(Embedding.study_id == study_id))
    return int(first or 0), db, study_id


def _clear_database(db: Database, study_id: int) -> None:
    from sqlalchemy import delete

    from pacs_agent.db.models import Embedding, Study

    with db.session() as s:
        s.execute(delete(Embedding).where(Embedding.study_id == study_id))
        s.execute(delete(Study).where(Study.id == study_id))


def run(
    n: int,
    queries: int = 1000,
    clusters: int = 1000,
    seed: int = 0,
    database_url: str | None = None,
    out: object = sys.stdout,
    sweep: Sequence[int] = (),
) -> dict[str, float]:
    def say(line: str) -> None:
        print(line, file=out, flush=True)  # type: ignore[call-overload]

    source = f"the embeddings table ({database_url.split(':', 1)[0]})" if database_url else "memory"
    say(
        f"retrieval bench: {n} vectors, {DIM}-d, mixture of {clusters} Gaussians; "
        f"{queries} queries; FAISS, exact up to {retrieval.EXACT_MAX:,} vectors, then IVF "
        f"fp16 with about {retrieval.LIST_SIZE} vectors a list, nprobe {retrieval.NPROBE}; "
        f"index from {source}"
    )
    t0 = time.perf_counter()
    mix = Mixture(clusters=clusters, seed=seed)
    base = mix.draw(n, seed + 1)
    q = mix.draw(queries, seed + 2)
    say(f"data: drawn in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    truth = exact_top_k(base, q, 10)
    say(f"exact search (numpy, {queries} queries): {time.perf_counter() - t0:.1f} s")

    rss_before = _rss_mib()
    handle: tuple[Database, int] | None = None
    offset = 0
    if database_url:
        t0 = time.perf_counter()
        offset, db, study_id = _fill_database(database_url, base)
        handle = (db, study_id)
        say(f"table: {n} rows written in {time.perf_counter() - t0:.1f} s")
        del base  # the index reads the table, not this array
        index = retrieval.SimilarityIndex(Database(database_url))
        t0 = time.perf_counter()
        index.refresh()
        build_s = time.perf_counter() - t0
    else:
        index = retrieval.SimilarityIndex(None)
        t0 = time.perf_counter()
        index.add_vectors(BENCH_BUNDLE, np.arange(1, n + 1), base)
        build_s = time.perf_counter() - t0
        offset = 1
    try:
        say(
            f"build: {build_s:.1f} s ({n / build_s:,.0f} vectors/s); index memory "
            f"{index.memory_bytes() / 2**20:,.0f} MiB; process peak RSS {_rss_mib():,.0f} MiB "
            f"({rss_before:,.0f} MiB before the index)"
        )
        lat = np.empty(queries)
        cpu = np.empty(queries)  # this thread's CPU time: the index's cost without the load
        found = 0
        for i in range(queries):
            t, c = time.perf_counter(), time.thread_time()
            hits = index.search(BENCH_BUNDLE, q[i], 10)
            lat[i], cpu[i] = time.perf_counter() - t, time.thread_time() - c
            found += len({h.embedding_id - offset for h in hits} & set(truth[i].tolist()))
    finally:
        if handle is not None:
            _clear_database(*handle)
        bundle = index._bundles[BENCH_BUNDLE]
        if not bundle.exact:
            say(f"index: IVF, {bundle.nlist} lists, trained on {bundle.trained_on:,} vectors")
        for nprobe in sweep:  # the same index searched wider or narrower (not the product's)
            bundle.nprobe = nprobe
            s_lat, s_found = np.empty(queries), 0
            for i in range(queries):
                t = time.perf_counter()
                hits = index.search(BENCH_BUNDLE, q[i], 10)
                s_lat[i] = time.perf_counter() - t
                s_found += len({h.embedding_id - offset for h in hits} & set(truth[i].tolist()))
            bundle.nprobe = retrieval.NPROBE
            say(
                f"sweep nprobe {nprobe}: recall@10 {s_found / (10 * queries):.3f}, "
                f"p50 {np.percentile(s_lat, 50) * 1000:.2f} ms, "
                f"p95 {np.percentile(s_lat, 95) * 1000:.2f} ms"
            )
    recall = found / (10 * queries)
    p50, p95, p99 = (float(np.percentile(lat, p) * 1000) for p in (50, 95, 99))
    c50, c95 = (float(np.percentile(cpu, p) * 1000) for p in (50, 95))
    say(f"query (1 thread, k=10): p50 {p50:.2f} ms, p95 {p95:.2f} ms, p99 {p99:.2f} ms")
    say(f"query CPU time: p50 {c50:.2f} ms, p95 {c95:.2f} ms (load average {_load()})")
    say(f"retrieval: {n} vectors, recall@10 {recall:.3f}, p50 {p50:.2f} ms, p95 {p95:.2f} ms")
    return {"n": n, "recall": recall, "p50_ms": p50, "p95_ms": p95, "build_s": build_s}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pacs-agent bench retrieval",
        description="similar-case index: build time, memory, query latency, recall@10",
    )
    p.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    p.add_argument("--queries", type=int, default=1000, help="query vectors")
    p.add_argument("--clusters", type=int, default=1000, help="Gaussians in the mixture")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--database-url",
        default=None,
        help="build from the embeddings table of this migrated database (rows removed after)",
    )
    p.add_argument(
        "--sweep",
        type=int,
        nargs="*",
        default=[],
        metavar="NPROBE",
        help="also query the built index scanning this many lists (one line each)",
    )
    return p


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if args.n < 10 or args.queries < 1 or args.clusters < 1:
        print(
            "pacs-agent bench retrieval: --n must be at least 10, --queries and --clusters 1",
            file=sys.stderr,
        )
        return 2
    run(args.n, args.queries, args.clusters, args.seed, args.database_url, sweep=args.sweep)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
