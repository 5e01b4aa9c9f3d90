"""`pacs-agent bench ingest`: C-STORE throughput of the agent next to dcmtk's storescp and Orthanc.

All receivers get the same files from dcmtk's storescu in the same run: N copies of the RG1
uncompressed radiograph (pydicom-data RG1_UNCR.dcm, 7.2 MB) and a batch of small CT slices
(pydicom's CT_small.dcm), each copy under its own SOP Instance UID, over 1 and over 4 concurrent
associations (one storescu process each). The agent runs as `pacs-agent serve` in a subprocess
with a fresh SQLite database in a temporary data folder and a broker URL nobody listens on (only
ingest is measured; no study completes during the run). storescp runs with --fork and
--bit-preserving; note that it does not fsync, while the agent fsyncs every file and its folder
and commits its row before it answers (in groups: one folder fsync and one transaction for the
instances that arrive together). Orthanc (Debian's /usr/sbin/Orthanc, when installed) is the
durable peer: SyncStorageArea on (it fsyncs each file), its SQLite index, no plugins, the same
maximum PDU; it is left out, and says so, when it is not installed.

The agent is measured with each ``--dicom-processes`` setting (PACS_AGENT_DICOM_PROCESSES: C-STORE
received in that many processes; default the number of CPUs; ``1,4`` measures both, one agent
each, on the same files): its lines end with ``processes N``.

Printed: MB/s and instances/s per receiver, workload and association count, the agent/storescp
ratio, the agent's CPU time per instance in each round (user + system of its processes: steadier
than rates on a shared machine), and the agent's peak resident memory (VmHWM, summed over its
processes) after each round, so that a long run (--gigabytes) shows whether memory stays flat.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

AGENT_AET = "PACSAGENT"
STORESCP_AET = "STORESCP"
ORTHANC_AET = "ORTHANC"
ORTHANC_BINARY = "/usr/sbin/Orthanc"
UNREACHABLE_BROKER = "redis://127.0.0.1:1/0"
MB = 1_000_000
# Debian's dcmtk leaves Nagle's algorithm on unless TCP_NODELAY=1 is in the environment; with it
# on, every small C-STORE waits ~90 ms for a delayed ACK and both receivers look equally slow.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def _dcmtk(name: str) -> str:
    """dcmtk's tool by its Debian path: pynetdicom installs a `storescu` and a `storescp` of
    its own (other options) into the virtual environment, ahead of /usr/bin on its PATH."""
    return f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else name


STORESCU, STORESCP = _dcmtk("storescu"), _dcmtk("storescp")


@dataclass
class Measurement:
    target: str
    workload: str
    associations: int
    instances: int
    bytes: int
    seconds: float
    # The agent only: its processes' CPU time over the round, per instance.
    cpu_ms_per_instance: float | None = None
    # The agent only: its DICOM receiving processes (PACS_AGENT_DICOM_PROCESSES).
    processes: int | None = None

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds

    def line(self) -> str:
        return (
            f"{self.target:9s} {self.workload:4s} x{self.associations:<2d} "
            f"{self.instances:6d} inst {self.bytes / MB:9.1f} MB {self.seconds:8.2f} s "
            f"{self.mb_per_s:8.1f} MB/s {self.instances_per_s:8.1f} inst/s"
            + (f"  processes {self.processes}" if self.processes is not None else "")
        )


class BenchError(RuntimeError):
    pass


# --- the machine -------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def memory_kb(pid: int, field: str) -> int | None:
    """A ``VmHWM``/``VmRSS`` line of /proc/<pid>/status, in kB (None when unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process so far (/proc/<pid>/stat), None when unreadable.

    On a shared machine wall-clock rates swing with everyone else's load; the CPU the agent
    spends per instance is the steadier figure for comparing two versions of it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the agent's receiving processes), from /proc."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                pass
    return found


def tree_cpu_seconds(pid: int) -> float | None:
    """``cpu_seconds`` summed over the process and its descendants (None: ``pid`` unreadable)."""
    own = cpu_seconds(pid)
    if own is None:
        return None
    return own + sum(cpu_seconds(p) or 0.0 for p in process_tree(pid)[1:])


def tree_memory_kb(pid: int, field: str) -> int | None:
    """``memory_kb`` summed over the process and its descendants."""
    own = memory_kb(pid, field)
    if own is None:
        return None
    return own + sum(memory_kb(p, field) or 0 for p in process_tree(pid)[1:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes], name: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode} before listening")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise BenchError(f"nothing listening on port {port} after {timeout} s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --- test files --------------------------------------------------------------------------------


def sample(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        raise BenchError(f"{name} not found: install pydicom-data")
    return Path(str(path))


def make_copies(src: Path, out_dir: Path, n: int) -> list[Path]:
    """``n`` copies of ``src`` in one new study and series, each with its own SOP Instance UID."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    out_dir.mkdir(parents=True, exist_ok=True)
    ds = dcmread(src)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    files = []
    for i in range(n):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        path = out_dir / f"{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


# --- sending -----------------------------------------------------------------------------------


def send(
    port: int, aec: str, files: list[Path], associations: int, max_pdu: int, logs: Path
) -> float:
    """storescu processes (one association each, files dealt round-robin); wall seconds."""
    groups = [files[i::associations] for i in range(associations)]
    groups = [g for g in groups if g]
    logs.mkdir(parents=True, exist_ok=True)
    total = sum(f.stat().st_size for f in files)
    timeout = 120 + total / MB  # generous: 1 MB/s would be a failure anyway
    started = time.perf_counter()
    procs = []
    for i, group in enumerate(groups):
        log = open(logs / f"storescu-{aec}-{i}.log", "wb")
        procs.append(
            (
                subprocess.Popen(
                    [
                        STORESCU,
                        "-aet",
                        "BENCH",
                        "-aec",
                        aec,
                        "-pdu",
                        str(max_pdu),
                        "127.0.0.1",
                        str(port),
                        *map(str, group),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=DCMTK_ENV,
                ),
                log,
            )
        )
    failed = []
    try:
        for proc, log in procs:
            try:
                rc = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - started)))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = -1
            log.close()
            if rc != 0:
                failed.append(f"{log.name}: exit {rc}")
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    elapsed = time.perf_counter() - started
    if failed:
        raise BenchError("storescu failed: " + "; ".join(failed))
    return elapsed


# --- receivers ---------------------------------------------------------------------------------


class StoreSCP:
    """dcmtk's storescp writing to a folder (one forked child per association)."""

    def __init__(self, work: Path, max_pdu: int) -> None:
        self.port = free_port()
        self.out = work / "storescp-out"
        self.out.mkdir(parents=True, exist_ok=True)
        self._log = open(work / "storescp.log", "wb")
        self.proc = subprocess.Popen(
            [
                STORESCP,
                "--fork",
                "-aet",
                STORESCP_AET,
                "-pdu",
                str(max_pdu),
                "+B",  # write data exactly as read, as the agent does
                "-od",
                str(self.out),
                str(self.port),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=DCMTK_ENV,
        )
        wait_port(self.port, 30, self.proc, "storescp")

    def received(self) -> int:
        return sum(1 for p in self.out.iterdir() if p.is_file())

    def clear(self) -> None:
        for p in self.out.iterdir():
            if p.is_file():
                p.unlink()

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


class OrthancProcess:
    """Orthanc writing to its own storage folder: the durable peer (it fsyncs each file)."""

    def __init__(self, work: Path, max_pdu: int, binary: str = ORTHANC_BINARY) -> None:
        self.dicom_port = free_port()
        self.http_port = free_port()
        root = work / "orthanc"
        storage = root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "bench",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "SyncStorageArea": True,  # fsync each file, as the agent does
            "DicomServerEnabled": True,
            "DicomAet": ORTHANC_AET,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "MaximumPduLength": max_pdu,
            "DicomScpTimeout": 60,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "MaximumStorageSize": 0,
            "MaximumPatientCount": 0,
        }
        cfg_path = root / "orthanc.json"
        cfg_path.write_text(json.dumps(config, indent=2))
        self._log = open(root / "orthanc.log", "wb")
        self.proc = subprocess.Popen(
            [binary, str(cfg_path)],
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_port(self.dicom_port, 60, self.proc, "Orthanc")
        wait_port(self.http_port, 60, self.proc, "Orthanc")

    def instances(self) -> int:
        import httpx

        r = httpx.get(f"http://127.0.0.1:{self.http_port}/statistics", timeout=30)
        r.raise_for_status()
        return int(r.json()["CountInstances"])

    def version(self) -> str:
        import httpx

        try:
            r = httpx.get(f"http://127.0.0.1:{self.http_port}/system", timeout=10)
            return f"Orthanc {r.json().get('Version', '?')}"
        except (httpx.HTTPError, ValueError):
            return "Orthanc (version unknown)"

    def stop(self) -> None:
        stop_process(self.proc, timeout=30)
        self._log.close()


class AgentProcess:
    """`pacs-agent serve` on free ports with a fresh data folder and database."""

    def __init__(
        self, work: Path, max_pdu: int, database_url: str | None, processes: int = 1
    ) -> None:
        self.processes = processes
        self.data_dir = work / f"agent-data-p{processes}"
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.database_url = database_url or f"sqlite:///{self.data_dir / 'pacs_agent.db'}"
        package_root = str(Path(__file__).resolve().parents[1])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT_")}
        env.update(
            PYTHONPATH=os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p),
            PACS_AGENT_DATA_DIR=str(self.data_dir),
            PACS_AGENT_DATABASE_URL=self.database_url,
            PACS_AGENT_BROKER_URL=UNREACHABLE_BROKER,
            PACS_AGENT_AE_TITLE=AGENT_AET,
            PACS_AGENT_DICOM_HOST="127.0.0.1",
            PACS_AGENT_DICOM_PORT=str(self.dicom_port),
            PACS_AGENT_HTTP_HOST="127.0.0.1",
            PACS_AGENT_HTTP_PORT=str(self.http_port),
            PACS_AGENT_MAX_PDU=str(max_pdu),
            PACS_AGENT_QUIET_PERIOD_S="86400",  # nothing completes: ingest only
            PACS_AGENT_MIN_FREE_DISK_MB="100",
            PACS_AGENT_DICOM_PROCESSES=str(processes),
        )
        cli = [sys.executable, "-m", "pacs_agent.cli"]
        self.log_path = work / f"agent-p{processes}.log"
        self._log = open(self.log_path, "wb")
        up = subprocess.run(
            [*cli, "db", "upgrade"], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        if up.returncode != 0:
            raise BenchError(f"pacs-agent db upgrade failed (see {self.log_path})")
        self.proc = subprocess.Popen(
            [*cli, "serve"], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self._wait_healthy(180)  # a loaded machine imports slowly (healthy: every process up)
        self.rss_at_start_kb = tree_memory_kb(self.proc.pid, "VmRSS")

    def _wait_healthy(self, timeout: float) -> None:
        import logging

        import httpx

        logging.getLogger("httpx").setLevel(logging.WARNING)

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise BenchError(f"the agent exited with {self.proc.returncode}: {self.tail()}")
            try:
                r = httpx.get(f"http://127.0.0.1:{self.http_port}/health", timeout=2)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise BenchError(f"the agent was not healthy within {timeout} s: {self.tail()}")

    def tail(self, n: int = 20) -> str:
        self._log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def recorded(self, study_uid: str) -> int:
        from sqlalchemy import func, select

        from pacs_agent.db.models import Instance, Study
        from pacs_agent.db.session import Database

        db = Database(self.database_url)
        try:
            with db.session() as s:
                return int(
                    s.scalar(
                        select(func.count(Instance.id))
                        .join(Study, Study.id == Instance.study_id)
                        .where(Study.study_instance_uid == study_uid)
                    )
                    or 0
                )
        finally:
            db.dispose()

    def peak_rss_kb(self) -> int | None:
        return tree_memory_kb(self.proc.pid, "VmHWM")

    def cpu_seconds(self) -> float | None:
        return tree_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc, timeout=30)
        self._log.close()


# --- the run -----------------------------------------------------------------------------------


def _study_of(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _mb(kb: int | None) -> str:
    return "n/a" if kb is None else f"{kb / 1024:.1f} MiB"


def run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    rg1, ct = sample("RG1_UNCR.dcm"), sample("CT_small.dcm")
    n_rg1 = args.n_rg1
    if args.gigabytes is not None:
        n_rg1 = math.ceil(args.gigabytes * 1e9 / rg1.stat().st_size)
    workloads = [(name, src, n) for name, src, n in (("RG1", rg1, n_rg1), ("CT", ct, args.n_ct))]
    workloads = [w for w in workloads if w[2] > 0]
    if not workloads:
        raise BenchError("nothing to send: --n-rg1 and --n-ct are both 0")
    per_round = sum(src.stat().st_size * n for _, src, n in workloads)
    settings = args.dicom_processes
    # Source copies + storescp's copy of one round, and each agent's copies of every round.
    needed = per_round * (2 + 2 * len(args.associations) * len(settings)) + 500 * MB
    if shutil.disk_usage(work).free < needed:
        raise BenchError(f"not enough free disk in {work}: about {needed / 1e9:.1f} GB needed")

    print(
        f"ingest benchmark: {n_rg1} x RG1_UNCR ({rg1.stat().st_size / MB:.1f} MB), "
        f"{args.n_ct} x CT_small ({ct.stat().st_size / 1000:.0f} kB); associations "
        f"{','.join(map(str, args.associations))}; max PDU {args.max_pdu}; agent DICOM "
        f"processes {','.join(map(str, settings))}"
    )
    print(
        f"machine: {os.cpu_count()} CPU cores, {cpu_model()}; Python "
        f"{platform.python_version()}; {_dcmtk_version()}; load average {_load()}"
    )
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    scp = StoreSCP(work, args.max_pdu)
    agents: list[AgentProcess] = []
    orthanc = None
    results: list[Measurement] = []
    rss: list[dict[str, object]] = []
    peaks: dict[int, int | None] = {}
    try:
        if args.no_orthanc or not Path(args.orthanc).is_file():
            why = "--no-orthanc" if args.no_orthanc else f"{args.orthanc} not found"
            print(f"orthanc: not measured ({why})")
        else:
            orthanc = OrthancProcess(work, args.max_pdu, args.orthanc)
            print(f"orthanc: {orthanc.version()} (SyncStorageArea, SQLite index)")
        for processes in settings:
            agent = AgentProcess(work, args.max_pdu, args.database_url, processes)
            agents.append(agent)
            print(f"agent RSS after start: {_mb(agent.rss_at_start_kb)}  processes {processes}")
        for assoc in args.associations:
            for name, src, n in workloads:
                files = make_copies(src, work / f"src-{name}-{assoc}", n)
                size = sum(f.stat().st_size for f in files)
                study = _study_of(files[0])
                logs = work / "logs"

                secs = send(scp.port, STORESCP_AET, files, assoc, args.max_pdu, logs)
                if scp.received() != n:
                    raise BenchError(f"storescp kept {scp.received()} of {n} {name} files")
                scp.clear()
                m_scp = Measurement("storescp", name, assoc, n, size, secs)

                m_orthanc = None
                if orthanc is not None:
                    before = orthanc.instances()
                    secs = send(orthanc.dicom_port, ORTHANC_AET, files, assoc, args.max_pdu, logs)
                    got = orthanc.instances() - before
                    if got != n:
                        raise BenchError(f"Orthanc kept {got} of {n} {name} instances")
                    m_orthanc = Measurement("orthanc", name, assoc, n, size, secs)

                m_agents = []
                for agent in agents:
                    cpu_before = agent.cpu_seconds()
                    secs = send(agent.dicom_port, AGENT_AET, files, assoc, args.max_pdu, logs)
                    cpu_after = agent.cpu_seconds()
                    got = agent.recorded(study)
                    if got != n:
                        raise BenchError(
                            f"the agent ({agent.processes} processes) recorded {got} of {n} "
                            f"{name} instances"
                        )
                    m_agent = Measurement(
                        "agent", name, assoc, n, size, secs, processes=agent.processes
                    )
                    if cpu_before is not None and cpu_after is not None:
                        m_agent.cpu_ms_per_instance = (cpu_after - cpu_before) * 1000 / n
                    m_agents.append(m_agent)

                shutil.rmtree(work / f"src-{name}-{assoc}")
                results += [m for m in (m_scp, m_orthanc) if m is not None] + m_agents
                print(m_scp.line())
                if m_orthanc is not None:
                    print(m_orthanc.line())
                for m_agent in m_agents:
                    print(m_agent.line())
                for m_agent in m_agents:
                    tag = f"  processes {m_agent.processes}"
                    if m_agent.cpu_ms_per_instance is not None:
                        print(
                            f"agent     {name:4s} x{assoc:<2d} CPU "
                            f"{m_agent.cpu_ms_per_instance:.1f} ms per instance "
                            f"(user + system, all its processes and threads){tag}"
                        )
                    print(
                        f"ratio     {name:4s} x{assoc:<2d} agent/storescp "
                        f"{m_agent.mb_per_s / m_scp.mb_per_s:.2f}{tag}"
                    )
                    if m_orthanc is not None:
                        print(
                            f"ratio     {name:4s} x{assoc:<2d} agent/orthanc "
                            f"{m_agent.mb_per_s / m_orthanc.mb_per_s:.2f}{tag}"
                        )
            for agent in agents:
                hwm = agent.peak_rss_kb()
                rss.append(
                    {"after_associations": assoc, "processes": agent.processes, "peak_rss_kb": hwm}
                )
                print(
                    f"agent peak RSS (VmHWM) after the x{assoc} round: {_mb(hwm)}  "
                    f"processes {agent.processes}"
                )
        for agent in agents:
            peaks[agent.processes] = agent.peak_rss_kb()
            peak = _mb(peaks[agent.processes])
            print(f"agent peak RSS (VmHWM): {peak}  processes {agent.processes}")
    except BaseException:
        for agent in agents:
            print(f"agent log tail ({agent.processes} processes):\n{agent.tail()}", file=sys.stderr)
        raise
    finally:
        for agent in agents:
            agent.stop()
        if orthanc is not None:
            orthanc.stop()
        scp.stop()
    return {
        "n_rg1": n_rg1,
        "n_ct": args.n_ct,
        "associations": args.associations,
        "max_pdu": args.max_pdu,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "results": [
            {**asdict(m), "mb_per_s": m.mb_per_s, "instances_per_s": m.instances_per_s}
            for m in results
        ],
        "dicom_processes": settings,
        # The first --dicom-processes setting's agent (summed over its processes); every one:
        "agent_rss_at_start_kb": agents[0].rss_at_start_kb,
        "agent_peak_rss_kb": peaks[settings[0]],
        "agents": [
            {
                "processes": a.processes,
                "rss_at_start_kb": a.rss_at_start_kb,
                "peak_rss_kb": peaks[a.processes],
            }
            for a in agents
        ],
        "agent_peak_rss_by_round": rss,
    }


def _load() -> str:
    """1-minute load average: other work on the machine skews every figure."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except (OSError, IndexError):
        return "n/a"


def _dcmtk_version() -> str:
    try:
        out = subprocess.run(
            [STORESCU, "--version"], capture_output=True, text=True, timeout=10
        ).stdout
        return out.splitlines()[0].strip("$ ").replace("storescu ", "dcmtk storescu ")
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "dcmtk version unknown"


def _associations(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of integers") from None
    if not values or any(v < 1 or v > 16 for v in values):
        raise argparse.ArgumentTypeError("association counts must be 1 to 16")
    return values


def _processes(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of integers") from None
    if not values or any(v < 1 or v > 64 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError("distinct process counts of 1 to 64")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pacs-agent bench ingest",
        description="C-STORE ingest throughput of the agent next to dcmtk's storescp.",
    )
    p.add_argument("--n-rg1", type=int, default=20, help="RG1 copies (7.2 MB each); default 20")
    p.add_argument("--n-ct", type=int, default=100, help="CT_small copies; default 100")
    p.add_argument(
        "--gigabytes",
        type=float,
        default=None,
        help="send this many GB of RG1 per round instead of --n-rg1 (memory check)",
    )
    p.add_argument(
        "--associations",
        type=_associations,
        default=[1, 4],
        help="concurrent associations per round, comma-separated; default 1,4",
    )
    p.add_argument(
        "--dicom-processes",
        type=_processes,
        default=[os.cpu_count() or 1],
        help="the agent's DICOM receiving processes (PACS_AGENT_DICOM_PROCESSES), "
        "comma-separated to measure several agents (e.g. 1,4); default the number of CPUs",
    )
    p.add_argument(
        "--max-pdu",
        type=int,
        default=131072,
        help="max PDU of both receivers (storescp allows at most 131072); default 131072",
    )
    p.add_argument(
        "--database-url",
        default=None,
        help="an empty database for the agent (default: a fresh SQLite file in the work dir)",
    )
    p.add_argument(
        "--orthanc",
        default=ORTHANC_BINARY,
        help=f"the Orthanc executable, the durable peer; default {ORTHANC_BINARY}",
    )
    p.add_argument("--no-orthanc", action="store_true", help="measure storescp and the agent only")
    p.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if args.n_rg1 < 0 or args.n_ct < 0:
        print("pacs-agent bench ingest: counts must be 0 or more", file=sys.stderr)
        return 2
    if args.database_url and len(args.dicom_processes) > 1:
        # Both agents would record the same files in one database: the second one less work.
        print(
            "pacs-agent bench ingest: --database-url takes one --dicom-processes setting",
            file=sys.stderr,
        )
        return 2
    for exe in (STORESCU, STORESCP):
        if shutil.which(exe) is None:
            print(f"pacs-agent bench ingest: {exe} (dcmtk) is not installed", file=sys.stderr)
            return 2
    try:
        if args.work_dir is not None:
            args.work_dir.mkdir(parents=True, exist_ok=True)
            figures = run(args, args.work_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="pacs-agent-bench-") as tmp:
                figures = run(args, Path(tmp))
    except BenchError as exc:
        print(f"pacs-agent bench ingest: {exc}", file=sys.stderr)
        return 1
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
