"""`pacs-agent bench chaos`: nothing lost while the parts are killed, measured.

A deployment of its own in a temporary folder, made of the real parts: Debian's Orthanc
(/usr/sbin/Orthanc, the result destination, reached by C-STORE as in docker-compose.yml), a
redis-server (append-only file, as in docker-compose.yml), a fresh database on the local
PostgreSQL, `pacs-agent serve` with the DEMO bundle (`pacs-agent models demo`) and two
`pacs-agent worker` processes, each in its own working directory (no shared folder). The bench
sends N small synthetic studies (one to three CR or DX images, seeded pixels and UIDs) with
dcmtk's /usr/bin/storescu, one file per call, retrying a file until the agent acknowledges it (as
a modality does). Meanwhile, at seeded random moments, it kills the agent, a worker, Redis or
Orthanc with SIGKILL (the whole process group) and starts it again. A part that exits on its own
is started again too (as `restart: unless-stopped` would) and reported.

Then it waits, at most --wait seconds (300) after the last kill (or the last send, if later),
for every acknowledged study to reach a terminal state, and counts from the agent's database and
from Orthanc:

- stuck: acknowledged studies not done, skipped or failed;
- lost: acknowledged instances missing from the agent's database, plus the expected outputs
  missing from Orthanc for each terminal, non-skipped acknowledged study (a stuck study's outputs
  are not counted again): one SR per study, and a SEG, a heatmap SC and a Parametric Map per
  acknowledged source image (what workers/pipeline.py writes for the DEMO bundle with the default
  settings);
- duplicated: Orthanc instances beyond the first with the same SOP Instance UID, outputs beyond
  the first of a kind for one source image (or one SR per study), and outputs that name no single
  source image of their study.

Outputs are attributed from the objects themselves (SOP Class, the source SOP Instance UIDs they
reference), not from the agent's bookkeeping. Printed: each kill and how long the part took to be
ready again, the recovery figures (time from each kill to the next job completed after it), the
wall time, the details of any problem with the study's events, and last, exactly:
``chaos: N studies, K kills, lost L, duplicated D, stuck S``. Exit status 1 unless L, D and S are
all 0 (2 when the deployment could not be set up).

A killed worker's job comes back when its job heartbeat is older than
PACS_AGENT_JOB_HEARTBEAT_TIMEOUT_S (product default 60 s; --heartbeat-timeout and --lease
override the product defaults for an experiment). Delivery backoff is shortened
(PACS_AGENT_DELIVERY_BACKOFF_S 1 s, _MAX_S 10 s) so that a run ends in minutes; the broker
visibility timeout keeps its product default.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import functools
import io
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacs_agent.bench_ingest import BenchError, cpu_model, free_port, sample

STORESCU = "/usr/bin/storescu"  # dcmtk's, not the venv's pynetdicom script of the same name
ORTHANC = "/usr/sbin/Orthanc"
PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
TARGETS = ("agent", "worker", "redis", "orthanc")
TERMINAL = ("done", "skipped", "failed")
PER_IMAGE_KINDS = ("seg", "sc", "pm")  # and one "sr" per study (DEMO bundle, default settings)
AGENT_AE = "PACSAGENT"
MODALITY_AE = "CHAOSMOD"

_SR = "1.2.840.10008.5.1.4.1.1.88."
_SC = "1.2.840.10008.5.1.4.1.1.7"
KIND_BY_SOP_CLASS = {
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",
    "1.2.840.10008.5.1.4.1.1.30": "pm",
    "1.2.840.10008.5.1.4.1.1.88.59": "ko",
}


def output_kind(sop_class_uid: str) -> str:
    """The kind of an output object from its SOP Class (``other`` when none of ours)."""
    if sop_class_uid in KIND_BY_SOP_CLASS:
        return KIND_BY_SOP_CLASS[sop_class_uid]
    if sop_class_uid.startswith(_SR):
        return "sr"
    if sop_class_uid == _SC or sop_class_uid.startswith(_SC + "."):
        return "sc"
    return "other"


def referenced_uids(ds: Any) -> set[str]:
    """Every Referenced SOP Instance UID anywhere in a dataset (sequences included)."""
    found: set[str] = set()

    def walk(d: Any) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.keyword == "ReferencedSOPInstanceUID":
                found.add(str(elem.value))

    walk(ds)
    return found


# --- studies -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _template() -> Any:
    from pydicom import dcmread

    return dcmread(sample("RG1_UNCR.dcm"), stop_before_pixels=True)


@dataclass
class StudyPlan:
    index: int
    study_uid: str
    files: list[tuple[str, Path]]  # (SOP Instance UID, file)


def make_studies(n: int, out: Path, seed: int, size: int = 64) -> list[StudyPlan]:
    """``n`` studies of one to three small CR or DX images: seeded pixels, distinct seeded UIDs."""
    import numpy as np
    from pydicom.uid import (
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    plans = []
    for i in range(n):

        def uid(what: str, i: int = i) -> str:
            return str(generate_uid(entropy_srcs=[f"pacs-agent bench chaos {seed} {i} {what}"]))

        study_uid, series_uid = uid("study"), uid("series")
        dx = rng.random() < 0.5
        files = []
        for j in range(rng.randint(1, 3)):
            ds = copy.deepcopy(_template())
            pix = np.random.default_rng([seed, i, j])
            yy, xx = np.mgrid[0:size, 0:size]
            img = 8000 + 6000 * np.sin(xx / (3 + (i + j) % 7)) * np.cos(yy / 5)
            img = img + pix.normal(0, 800, (size, size))
            ds.Rows = ds.Columns = size
            ds.PixelData = np.clip(img, 0, 32767).astype(np.uint16).tobytes()
            ds["PixelData"].VR = "OW"
            if dx:
                ds.SOPClassUID = DigitalXRayImageStorageForPresentation
                ds.Modality = "DX"
                ds.PresentationIntentType = "FOR PRESENTATION"
            else:
                ds.SOPClassUID = ComputedRadiographyImageStorage
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = uid(f"image {j}")
            ds.InstanceNumber = j + 1
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            path = out / f"study{i:04d}-{j}.dcm"
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            path.write_bytes(buf.getvalue())
            files.append((str(ds.SOPInstanceUID), path))
        plans.append(StudyPlan(i, study_uid, files))
    return plans


def store_one(port: int, path: Path, timeout: float = 30) -> tuple[bool, str]:
    """Send one file with dcmtk's storescu: (acknowledged with a success status, why not)."""
    try:
        r = subprocess.run(
            [
                STORESCU,
                "-v",
                "-aet",
                MODALITY_AE,
                "-aec",
                AGENT_AE,
                "-to",
                "10",
                "-ta",
                "10",
                "-td",
                "20",
                "127.0.0.1",
                str(port),
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    except subprocess.TimeoutExpired:
        return False, "storescu timed out"
    text = r.stdout + r.stderr
    if r.returncode == 0 and text.count("Received Store Response (Success)") == 1:
        return True, ""
    lines = [ln for ln in text.splitlines() if ln.startswith(("E:", "F:", "W:"))]
    return False, f"rc {r.returncode}: " + " | ".join(lines[-2:])


# --- the parts ---------------------------------------------------------------------------------


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Part:
    """One product or peer process, in its own process group (a SIGKILL takes all of it)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    ready: Callable[[Part], bool]
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {self.starts + 1} at {time.time():.3f}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait_ready(self, timeout: float) -> float:
        """Seconds until ready; BenchError if it exits or is not ready in time."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not self.alive():
                raise BenchError(f"{self.name} exited while starting:\n{self.tail()}")
            try:
                if self.ready(self):
                    return time.monotonic() - t0
            except Exception:  # noqa: BLE001 - not ready yet, whatever the client says
                pass
            time.sleep(0.2)
        raise BenchError(f"{self.name} not ready within {timeout} s:\n{self.tail()}")

    def signal_group(self, sig: int) -> None:
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(timeout=30)

    def stop(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        self.signal_group(signal.SIGKILL)  # and whatever it left in its group
        if self.popen.poll() is None:
            self.popen.wait(timeout=10)

    def tail(self, n: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return f"--- {self.log_path.name}\n" + "\n".join(lines[-n:])


def _orthanc_config(work: Path, http_port: int, dicom_port: int) -> Path:
    storage = work / "storage"
    cfg = {
        "Name": "chaos-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "DicomScpTimeout": 30,
    }
    path = work / "orthanc.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def ensure_postgres(admin_url: str) -> None:
    """Start the local PostgreSQL cluster (Debian's pg_ctlcluster) when it is not listening."""
    if _port_open(5432) or "127.0.0.1:5432" not in admin_url:
        return
    etc = Path("/etc/postgresql")
    versions = sorted(os.listdir(etc)) if etc.is_dir() else []
    if not versions:
        raise BenchError("PostgreSQL is not installed (make system-deps installs it)")
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"], check=False
    )
    end = time.monotonic() + 30
    while not _port_open(5432):
        if time.monotonic() > end:
            raise BenchError("PostgreSQL did not start on 127.0.0.1:5432")
        time.sleep(0.2)


@dataclass
class Kill:
    target: str  # agent | worker-1 | worker-2 | redis | orthanc
    at: float  # time.time() of the SIGKILL
    mono: float  # time.monotonic() of the SIGKILL
    ready_after_s: float | None = None  # SIGKILL -> ready again
    next_job_s: float | None = None  # SIGKILL -> next job completed


@dataclass
class Cluster:
    work: Path
    bundle: Path
    pg_admin_url: str
    lease_s: int
    quiet_period_s: float
    threads: int
    heartbeat_timeout_s: float = 0
    parts: dict[str, Part] = field(default_factory=dict)
    db_name: str = ""
    database_url: str = ""
    crashes: list[tuple[str, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def setup(self) -> None:
        from sqlalchemy import create_engine, text

        ensure_postgres(self.pg_admin_url)
        self.db_name = f"pacs_agent_chaos_{secrets.token_hex(6)}"
        eng = create_engine(self.pg_admin_url, isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            c.execute(text(f'CREATE DATABASE "{self.db_name}"'))
        eng.dispose()
        self.database_url = self.pg_admin_url.rsplit("/", 1)[0] + f"/{self.db_name}"

        redis_port, orthanc_http, orthanc_dicom = free_port(), free_port(), free_port()
        self.agent_dicom, agent_http = free_port(), free_port()
        self.orthanc_url = f"http://127.0.0.1:{orthanc_http}"
        base = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT_")}
        package_root = str(Path(__file__).resolve().parents[1])
        self.agent_url = f"http://127.0.0.1:{agent_http}"
        agent_data = self.work / "agent"
        agent_data.mkdir(parents=True)
        env = {
            **base,
            "PYTHONPATH": os.pathsep.join(p for p in (package_root, base.get("PYTHONPATH")) if p),
            "PACS_AGENT_DATA_DIR": str(agent_data),
            "PACS_AGENT_DATABASE_URL": self.database_url,
            "PACS_AGENT_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
            "PACS_AGENT_BUNDLE": str(self.bundle),
            "PACS_AGENT_AE_TITLE": AGENT_AE,
            "PACS_AGENT_DICOM_HOST": "127.0.0.1",
            "PACS_AGENT_DICOM_PORT": str(self.agent_dicom),
            "PACS_AGENT_HTTP_HOST": "127.0.0.1",
            "PACS_AGENT_HTTP_PORT": str(agent_http),
            "PACS_AGENT_AGENT_URL": self.agent_url,
            "PACS_AGENT_API_TOKEN": secrets.token_urlsafe(24),
            "PACS_AGENT_DESTINATIONS": f"dicom://ORTHANC@127.0.0.1:{orthanc_dicom}",
            "PACS_AGENT_QUIET_PERIOD_S": str(self.quiet_period_s),
            "PACS_AGENT_COMPLETION_POLL_S": "0.2",
            "PACS_AGENT_MIN_FREE_DISK_MB": "50",
            "PACS_AGENT_WORKER_DEVICE": "cpu",
            "PACS_AGENT_DELIVERY_BACKOFF_S": "1",
            "PACS_AGENT_DELIVERY_BACKOFF_MAX_S": "10",
            "OMP_NUM_THREADS": str(self.threads),
        }
        # A killed worker's job comes back when its heartbeat is older than the timeout (product
        # default 60 s); --lease / --heartbeat-timeout override the product defaults.
        if self.lease_s:
            env["PACS_AGENT_JOB_LEASE_S"] = str(self.lease_s)
        if self.heartbeat_timeout_s:
            env["PACS_AGENT_JOB_HEARTBEAT_S"] = str(self.heartbeat_timeout_s / 4)
            env["PACS_AGENT_JOB_HEARTBEAT_TIMEOUT_S"] = str(self.heartbeat_timeout_s)
        self.env = env
        cli = [sys.executable, "-m", "pacs_agent.cli"]
        up = subprocess.run([*cli, "db", "upgrade"], env=env, capture_output=True, cwd=agent_data)
        if up.returncode != 0:
            raise BenchError(f"pacs-agent db upgrade failed: {up.stderr.decode()[-2000:]}")

        (self.work / "redis").mkdir()
        (self.work / "orthanc").mkdir()
        import httpx

        self.parts["redis"] = Part(
            "redis",
            [
                shutil.which("redis-server") or "/usr/bin/redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(redis_port),
                "--dir",
                str(self.work / "redis"),
                "--appendonly",
                "yes",
                "--save",
                "",
            ],
            base,
            self.work / "redis",
            self.work / "redis.log",
            lambda p: _port_open(redis_port),
        )
        self.parts["orthanc"] = Part(
            "orthanc",
            [ORTHANC, str(_orthanc_config(self.work / "orthanc", orthanc_http, orthanc_dicom))],
            base,
            self.work / "orthanc",
            self.work / "orthanc.log",
            lambda p: httpx.get(f"{self.orthanc_url}/system", timeout=2).is_success,
        )
        self.parts["agent"] = Part(
            "agent",
            [*cli, "serve"],
            env,
            agent_data,
            self.work / "agent.log",
            lambda p: (
                httpx.get(f"{self.agent_url}/health", timeout=2).is_success
                and _port_open(self.agent_dicom)
            ),
        )
        for i in (1, 2):
            wdir = self.work / f"worker-{i}"
            wdir.mkdir()
            wenv = {**env, "PACS_AGENT_DATA_DIR": str(wdir)}  # its own folder: no shared files
            self.parts[f"worker-{i}"] = Part(
                f"worker-{i}",
                [*cli, "worker"],
                wenv,
                wdir,
                self.work / f"worker-{i}.log",
                self._worker_ready,
            )
        for names in (("redis", "orthanc"), ("agent",), ("worker-1", "worker-2")):
            for name in names:
                self.parts[name].start()
            for name in names:
                self.parts[name].wait_ready(180)

    def _worker_ready(self, part: Part) -> bool:
        """A heartbeat row of this very process (the worker's name is host:pid)."""
        from sqlalchemy import text

        assert part.popen is not None
        eng = self._engine()
        with eng.connect() as c:
            names = c.execute(text("SELECT name FROM workers")).scalars().all()
        return any(n.endswith(f":{part.popen.pid}") for n in names)

    @functools.cached_property
    def _engine_obj(self) -> Any:
        from sqlalchemy import create_engine

        return create_engine(self.database_url, pool_pre_ping=True)

    def _engine(self) -> Any:
        return self._engine_obj

    def kill_and_restart(self, name: str, delay_s: float, ready_timeout: float) -> Kill:
        part = self.parts[name]
        with self.lock:
            k = Kill(name, time.time(), time.monotonic())
            part.kill()
            time.sleep(delay_s)
            part.start()
        try:
            part.wait_ready(ready_timeout)
            k.ready_after_s = time.time() - k.at
        except BenchError as exc:
            print(f"chaos: {name} not ready again after its kill: {exc}", file=sys.stderr)
        return k

    def watchdog(self) -> None:
        """Start again a part that exited on its own (restart: unless-stopped); note it."""
        with self.lock:
            for name, part in self.parts.items():
                if part.popen is not None and not part.alive():
                    self.crashes.append((name, time.monotonic()))
                    n = sum(1 for c, _ in self.crashes if c == name)
                    if n == 1:  # the first time with its log; a crash loop is counted at the end
                        print(
                            f"chaos: {name} exited on its own (status {part.popen.returncode}); "
                            f"started again\n{part.tail(8)}",
                            file=sys.stderr,
                        )
                    part.start()

    def stop(self, keep_db: bool = False) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not stop the clean-up
        for name in ("worker-2", "worker-1", "agent", "orthanc", "redis"):
            if name in self.parts:
                try:
                    self.parts[name].stop()
                except Exception as exc:  # noqa: BLE001 - stop the others all the same
                    print(f"chaos: could not stop {name}: {exc}", file=sys.stderr)
        if "_engine_obj" in self.__dict__:
            self._engine_obj.dispose()
        if self.db_name and not keep_db:
            from sqlalchemy import create_engine, text

            eng = create_engine(self.pg_admin_url, isolation_level="AUTOCOMMIT")
            with eng.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
            eng.dispose()


# --- the run -----------------------------------------------------------------------------------


def kill_schedule(
    rng: random.Random, kills: int, start: float, end: float
) -> list[tuple[float, str]]:
    """``kills`` (offset s, target) pairs: uniform times, targets cycling through a shuffled
    order of agent / a worker / Redis / Orthanc so that each is killed when kills >= 4."""
    times = sorted(rng.uniform(start, end) for _ in range(kills))
    out = []
    order: list[str] = []
    for t in times:
        if not order:
            order = list(TARGETS)
            rng.shuffle(order)
        target = order.pop()
        if target == "worker":
            target = rng.choice(("worker-1", "worker-2"))
        out.append((t, target))
    return out


@dataclass
class Sent:
    acknowledged: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    refused: dict[str, int] = field(default_factory=Counter)  # study -> files never acknowledged
    retries: int = 0


def send_all(
    cluster: Cluster, plans: Sequence[StudyPlan], rate: float, t0: float, give_up_s: float
) -> Sent:
    sent = Sent()
    for plan in plans:
        time.sleep(max(0.0, t0 + plan.index / rate - time.monotonic()))
        for sop, path in plan.files:
            end = time.monotonic() + give_up_s
            while True:
                ok, why = store_one(cluster.agent_dicom, path)
                if ok:
                    sent.acknowledged[plan.study_uid].add(sop)
                    break
                if time.monotonic() > end:
                    sent.refused[plan.study_uid] += 1
                    print(f"chaos: {sop} never acknowledged: {why}", file=sys.stderr)
                    break
                sent.retries += 1
                time.sleep(0.3)
    return sent


def _utc(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def study_states(cluster: Cluster, uids: Sequence[str]) -> dict[str, str]:
    from sqlalchemy import text

    with cluster._engine().connect() as c:
        rows = c.execute(text("SELECT study_instance_uid, status FROM studies")).all()
    wanted = set(uids)
    return {u: s for u, s in rows if u in wanted}


def wait_terminal(cluster: Cluster, uids: Sequence[str], deadline: float) -> dict[str, str]:
    while True:
        cluster.watchdog()
        try:
            states = study_states(cluster, uids)
        except Exception as exc:  # noqa: BLE001 - the database is not a chaos target; say so
            raise BenchError(f"the database stopped answering: {exc}") from exc
        if all(states.get(u) in TERMINAL for u in uids) or time.monotonic() > deadline:
            return states
        time.sleep(1.0)


@dataclass
class OrthancOutput:
    orthanc_id: str
    study_uid: str
    sop_uid: str
    kind: str
    refs: set[str]


def orthanc_outputs(url: str) -> Iterator[OrthancOutput]:
    import httpx
    from pydicom import dcmread

    with httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        ids = client.get("/instances").raise_for_status().json()
        for oid in ids:
            data = client.get(f"/instances/{oid}/file").raise_for_status().content
            ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
            yield OrthancOutput(
                oid,
                str(ds.StudyInstanceUID),
                str(ds.SOPInstanceUID),
                output_kind(str(ds.SOPClassUID)),
                referenced_uids(ds),
            )


@dataclass
class Count:
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    problem_studies: set[str] = field(default_factory=set)


def count(
    acknowledged: dict[str, set[str]],
    states: dict[str, str],
    in_db: set[str],
    outputs: Sequence[OrthancOutput],
) -> Count:
    """Lost, duplicated and stuck, each with a line per finding (UIDs only)."""
    c = Count()
    for sop, n in Counter(o.sop_uid for o in outputs).items():
        if n > 1:
            c.duplicated.append(f"SOP Instance UID {sop} is in Orthanc {n} times")
    by_study: dict[str, list[OrthancOutput]] = defaultdict(list)
    for o in outputs:
        by_study[o.study_uid].append(o)
    for study, sops in sorted(acknowledged.items()):
        for sop in sorted(sops - in_db):
            c.lost.append(f"study {study}: acknowledged instance {sop} not in the agent's database")
            c.problem_studies.add(study)
        state = states.get(study)
        if state not in TERMINAL:
            c.stuck.append(f"study {study}: {state or 'not in the database'}")
            c.problem_studies.add(study)
            continue
        found: Counter[tuple[str, str | None]] = Counter()
        for o in by_study.get(study, []):
            if o.kind == "sr":
                found["sr", None] += 1
                continue
            srcs = o.refs & sops
            if o.kind not in PER_IMAGE_KINDS or len(srcs) != 1:
                c.duplicated.append(
                    f"study {study}: unexpected {o.kind} output {o.sop_uid} "
                    f"(refers to {len(srcs)} acknowledged source images)"
                )
                c.problem_studies.add(study)
                continue
            found[o.kind, srcs.pop()] += 1
        for key, n in sorted(found.items(), key=str):
            if n > 1:
                c.duplicated.append(
                    f"study {study}: {n} {key[0]} outputs for "
                    + (f"source {key[1]}" if key[1] else "the study")
                )
                c.problem_studies.add(study)
        if state == "skipped":
            continue
        expected: list[tuple[str, str | None]] = [("sr", None)]
        expected += [(k, sop) for sop in sorted(sops) for k in PER_IMAGE_KINDS]
        for key in expected:
            if found[key] == 0:
                c.lost.append(
                    f"study {study} ({state}): no {key[0]} output in Orthanc"
                    + (f" for source {key[1]}" if key[1] else "")
                )
                c.problem_studies.add(study)
    return c


def study_events(cluster: Cluster, study_uid: str, limit: int = 30) -> list[str]:
    from sqlalchemy import text

    with cluster._engine().connect() as c:
        rows = c.execute(
            text(
                "SELECT e.at, e.kind, e.job_id, e.message FROM events e, studies s "
                "WHERE s.study_instance_uid = :u AND (e.study_id = s.id OR e.job_id IN "
                "(SELECT id FROM jobs WHERE study_id = s.id)) ORDER BY e.at, e.id"
            ),
            {"u": study_uid},
        ).all()
        jobs = c.execute(
            text(
                "SELECT j.id, j.study_version, j.status, j.attempts, j.worker, j.error FROM jobs j "
                "JOIN studies s ON s.id = j.study_id WHERE s.study_instance_uid = :u"
            ),
            {"u": study_uid},
        ).all()
    out = [
        f"    job {j[0]} v{j[1]} {j[2]} attempts {j[3]} worker {j[4]} error {j[5]}" for j in jobs
    ]
    out += [
        f"    {_utc(a).strftime('%H:%M:%S.%f')[:-3]} {k} job {jid}: {m}" for a, k, jid, m in rows
    ]
    return out[-limit:]


def recovery(cluster: Cluster, kills: list[Kill]) -> None:
    from sqlalchemy import text

    with cluster._engine().connect() as c:
        finished = sorted(
            _utc(f).timestamp()
            for (f,) in c.execute(
                text(
                    "SELECT finished_at FROM jobs WHERE status = 'done' AND finished_at IS NOT NULL"
                )
            ).all()
        )
    for k in kills:
        after = [f for f in finished if f > k.at]
        k.next_job_s = after[0] - k.at if after else None


def run(args: argparse.Namespace, work: Path) -> tuple[int, list[str]]:
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    rng = random.Random(args.seed)
    wall0 = time.monotonic()
    bundle = work / "bundle"
    demo = subprocess.run(
        [sys.executable, "-m", "pacs_agent.cli", "models", "demo", "--out", str(bundle)],
        capture_output=True,
    )
    if demo.returncode != 0:
        raise BenchError(f"pacs-agent models demo failed: {demo.stderr.decode()[-2000:]}")
    plans = make_studies(args.studies, work / "studies", args.seed, args.size)
    threads = args.threads or max(1, (os.cpu_count() or 1) // 2)
    cluster = Cluster(
        work,
        bundle,
        args.postgres_admin_url,
        args.lease,
        args.quiet_period,
        threads,
        args.heartbeat_timeout,
    )
    kills: list[Kill] = []
    try:
        cluster.setup()
        say(
            f"chaos bench: {args.studies} studies ({sum(len(p.files) for p in plans)} images, "
            f"{args.size}x{args.size}, CR/DX) at {args.rate:g} studies/s with dcmtk storescu; "
            f"{args.kills} SIGKILLs (seed {args.seed}); PostgreSQL, Redis (AOF), Orthanc "
            f"{ORTHANC}, the agent and two workers ({threads} torch thread(s) each); "
            f"job lease {args.lease or 'product default '}s, heartbeat timeout "
            f"{args.heartbeat_timeout or 'product default '}s, "
            f"quiet period {args.quiet_period:g} s; "
            f"{cpu_model()}, {os.cpu_count()} CPU cores"
        )
        setup_s = time.monotonic() - wall0
        send_span = args.studies / args.rate
        schedule = kill_schedule(
            rng, args.kills, 2.0, max(4.0, send_span + args.quiet_period + args.kill_tail)
        )
        t0 = time.monotonic()
        sent_box: dict[str, Sent] = {}
        sender = threading.Thread(
            target=lambda: sent_box.setdefault(
                "sent", send_all(cluster, plans, args.rate, t0, args.give_up)
            ),
            name="chaos-sender",
        )
        sender.start()
        for offset, target in schedule:
            while time.monotonic() < t0 + offset:
                cluster.watchdog()
                time.sleep(0.2)
            k = cluster.kill_and_restart(target, rng.uniform(0.2, 2.0), 180)
            kills.append(k)
            ready = f"ready again after {k.ready_after_s:.1f} s" if k.ready_after_s else "NOT ready"
            say(f"kill {len(kills)}: {target} at +{k.mono - t0:.1f} s, {ready}")
        while sender.is_alive():
            cluster.watchdog()
            sender.join(timeout=0.5)
        sent = sent_box["sent"]
        # At most --wait seconds after the last kill (or after the last send, if later).
        deadline = max(kills[-1].mono if kills else t0, time.monotonic()) + args.wait
        uids = sorted(sent.acknowledged)
        states = wait_terminal(cluster, uids, deadline)
        settled_s = time.monotonic() - t0
        from sqlalchemy import text

        with cluster._engine().connect() as c:
            in_db = set(c.execute(text("SELECT sop_instance_uid FROM instances")).scalars().all())
        outputs = list(orthanc_outputs(cluster.orthanc_url))
        result = count(sent.acknowledged, states, in_db, outputs)
        recovery(cluster, kills)
        n_ack = sum(len(s) for s in sent.acknowledged.values())
        say(
            f"sent: {len(uids)} studies acknowledged ({n_ack} instances, "
            f"{sent.retries} storescu retries, {sum(sent.refused.values())} never acknowledged); "
            f"{len(outputs)} objects in Orthanc; terminal: "
            + ", ".join(f"{k} {v}" for k, v in sorted(Counter(states.values()).items()))
        )
        if cluster.crashes:
            by_part = Counter(n for n, _ in cluster.crashes)
            say(
                "parts that exited on their own (started again): "
                + ", ".join(f"{n} {c} time(s)" for n, c in sorted(by_part.items()))
                + f", first at +{cluster.crashes[0][1] - t0:.1f} s"
            )
        say("recovery (SIGKILL -> part ready again -> next job completed):")
        for i, k in enumerate(kills, 1):
            ready = f"{k.ready_after_s:6.1f} s" if k.ready_after_s is not None else "   never"
            nxt = f"{k.next_job_s:6.1f} s" if k.next_job_s is not None else "   none"
            say(f"  kill {i:>2} {k.target:<9} ready {ready}, next job completed {nxt}")
        nexts = sorted(k.next_job_s for k in kills if k.next_job_s is not None)
        if nexts:
            say(
                f"recovery: next completed job after a kill: median "
                f"{nexts[len(nexts) // 2]:.1f} s, "
                f"max {nexts[-1]:.1f} s ({len(nexts)} of {len(kills)} kills followed by one)"
            )
        for what, items in (
            ("lost", result.lost),
            ("duplicated", result.duplicated),
            ("stuck", result.stuck),
        ):
            for item in items[:40]:
                say(f"{what}: {item}")
        for study in sorted(result.problem_studies)[:10]:
            say(f"events of study {study}:")
            for ev in study_events(cluster, study):
                say(ev)
        say(
            f"wall time: {time.monotonic() - wall0:.0f} s (set-up {setup_s:.0f} s, first send to "
            f"all terminal or the deadline {settled_s:.0f} s)"
        )
        final = (
            f"chaos: {args.studies} studies, {len(kills)} kills, lost {len(result.lost)}, "
            f"duplicated {len(result.duplicated)}, stuck {len(result.stuck)}"
        )
        say(final)
        bad = result.lost or result.duplicated or result.stuck
        return (1 if bad else 0), lines
    finally:
        cluster.stop(keep_db=args.keep)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pacs-agent bench chaos", description=__doc__)
    p.add_argument("--studies", type=int, default=200, help="studies to send (N)")
    p.add_argument("--kills", type=int, default=0, help="SIGKILLs (default: max(4, N / 20))")
    p.add_argument("--rate", type=float, default=2.0, help="studies sent per second")
    p.add_argument("--size", type=int, default=64, help="image rows and columns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait", type=float, default=300, help="max seconds after the last kill")
    p.add_argument(
        "--lease", type=int, default=0, help="PACS_AGENT_JOB_LEASE_S (0: the product default)"
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=0,
        help="PACS_AGENT_JOB_HEARTBEAT_TIMEOUT_S, heartbeats every quarter of it (0: the product "
        "defaults)",
    )
    p.add_argument("--quiet-period", type=float, default=20, help="PACS_AGENT_QUIET_PERIOD_S")
    p.add_argument(
        "--kill-tail",
        type=float,
        default=20,
        help="kills fall in [2 s, sending time + quiet period + this] after the first send",
    )
    p.add_argument("--give-up", type=float, default=240, help="s to retry one file's C-STORE")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker")
    p.add_argument("--postgres-admin-url", default=PG_ADMIN_URL)
    p.add_argument("--keep", action="store_true", help="keep the work folder and the database")
    return p


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwind, so that every part is stopped and the database dropped


def main(argv: Sequence[str]) -> int:
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _terminate)
    args = build_parser().parse_args(list(argv))
    if args.kills <= 0:
        args.kills = max(4, args.studies // 20)
    for exe in (STORESCU, ORTHANC):
        if not Path(exe).is_file():
            print(f"bench chaos: {exe} not found (dcmtk, orthanc)", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="pacs-agent-bench-chaos-"))
    try:
        rc, _lines = run(args, work)
    except BenchError as exc:
        print(f"bench chaos failed: {exc}", file=sys.stderr)
        print(f"logs kept in {work}", file=sys.stderr)
        return 2
    if args.keep or rc != 0:
        print(f"work folder (logs): {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return rc
