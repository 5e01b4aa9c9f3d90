"""C-STORE received in several processes (``PACS_AGENT_DICOM_PROCESSES``, issue 12): a real
`pacs-agent serve` with 2 or 3 receiving processes on one port, dcmtk's storescu as the modalities.

Where a test must know that a child process (not the agent's own) served an association, the
agent's process is paused (SIGSTOP) while storescu sends: only the children can accept then, and
what they relay (metrics, the release completion, logs) waits in their pipes until it resumes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from pacs_agent.db.models import Instance, Study
from pacs_agent.db.session import Database
from pacs_agent.receiving.dimse import ListenerBusy, open_listener, start_scp
from pacs_agent.receiving.ingest import Ingestor
from pacs_agent.receiving.processes import Receivers
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.settings import Settings
from tests.conftest import AgentEnv, Proc, free_port, sample_path
from tests.support.storescu import acknowledged
from tests.test_tls import pki  # noqa: F401  (the throw-away CA of the TLS tests)

STORESCU = "/usr/bin/storescu"  # dcmtk's (the venv has a pynetdicom `storescu` too)
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def _copies(folder: Path, n: int) -> list[Path]:
    """``n`` copies of pydicom's CT_small in one new study, each its own SOP Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = dcmread(sample_path("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        path = folder / f"ct{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def _storescu(port: int, files: list[Path], aet: str = "MODALITY") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [STORESCU, "-aet", aet, "-aec", "PACSAGENT", "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=DCMTK_ENV,
    )


def _sent(proc: subprocess.Popen[str], timeout: float = 120) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out


@pytest.fixture
def agent_env(tmp_path: Path, demo_bundle: Path) -> Iterator[AgentEnv]:
    from pacs_agent.db.migrate import upgrade

    db_url = f"sqlite:///{tmp_path / 'agent.db'}"
    upgrade(db_url)
    agent = AgentEnv(tmp_path, db_url, f"redis://127.0.0.1:{free_port()}/0", demo_bundle, "")
    agent.env["PACS_AGENT_QUIET_PERIOD_S"] = "3600"  # only a release completes a study here
    agent.env["PACS_AGENT_DICOM_PROCESSES"] = "3"
    yield agent
    agent.stop()


def _receivers(pid: int) -> list[int]:
    """The agent's receiving child processes (multiprocessing "spawn" children of ``pid``)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"multiprocessing.spawn" in cmdline:
                found.append(child)
    return sorted(found)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait(what: str, check: object, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < end, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def _healthy(agent: AgentEnv) -> bool:
    try:
        return httpx.get(f"{agent.url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _received_metric(agent: AgentEnv) -> float:
    r = httpx.get(f"{agent.url}/metrics", headers=agent.auth(), timeout=10)
    r.raise_for_status()
    m = re.search(r'^pacs_agent_instances_received_total\{door="dimse"\} (\S+)$', r.text, re.M)
    return float(m.group(1)) if m else 0.0


def _rows(agent: AgentEnv, study_uid: str | None = None) -> int:
    db = Database(agent.env["PACS_AGENT_DATABASE_URL"])
    try:
        with db.session() as s:
            q = select(func.count(Instance.id)).join(Study, Study.id == Instance.study_id)
            if study_uid is not None:
                q = q.where(Study.study_instance_uid == study_uid)
            return int(s.scalar(q) or 0)
    finally:
        db.dispose()


@contextmanager
def _paused(proc: Proc) -> Iterator[None]:
    """The agent's own process stopped: only its children accept meanwhile."""
    os.kill(proc.popen.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.popen.pid, signal.SIGCONT)


def test_concurrent_associations_are_all_stored_and_counted(
    agent_env: AgentEnv, tmp_path: Path
) -> None:
    proc = agent_env.start_agent()
    assert len(_receivers(proc.popen.pid)) == 2  # 3 processes: the agent and two children
    batches = [_copies(tmp_path / f"batch{g}", 15) for g in range(4)]
    senders = [
        _storescu(agent_env.dicom_port, files, aet=f"MOD{g}") for g, files in enumerate(batches)
    ]
    for sender in senders:
        _sent(sender)
    assert _rows(agent_env) == 60
    store = agent_env.data_dir / "instances"
    assert sum(1 for p in store.rglob("*.dcm")) == 60
    for files in batches:
        study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assert _rows(agent_env, study) == 15
    _wait("the metric counts every instance", lambda: _received_metric(agent_env) == 60, 10)

    # Children alone (the agent paused): stored, and counted once the agent reads their pipes.
    more = _copies(tmp_path / "children", 6)
    with _paused(proc):
        _sent(_storescu(agent_env.dicom_port, more))
    assert _rows(agent_env) == 66
    _wait("the children's instances counted", lambda: _received_metric(agent_env) == 66, 10)
    assert "stored sop=" + str(dcmread(more[0]).SOPInstanceUID) in proc.log_path.read_text()


def test_release_by_a_whole_study_sender_completes_its_study_from_a_child(
    agent_env: AgentEnv, tmp_path: Path
) -> None:
    agent_env.env["PACS_AGENT_COMPLETE_ON_RELEASE_AES"] = "WHOLESTUDY"
    proc = agent_env.start_agent()
    files = _copies(tmp_path / "study", 3)
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with _paused(proc):  # a child receives it and relays the release
        _sent(_storescu(agent_env.dicom_port, files, aet="WHOLESTUDY"))
    # The broker is unreachable: the study completes; its job waits for the broker.
    _wait(
        "completed on release",
        lambda: (agent_env.study(study) or {}).get("status") not in (None, "receiving"),
        30,
    )


def test_kill_9_of_the_agent_stops_its_children_and_frees_the_port(
    agent_env: AgentEnv, tmp_path: Path
) -> None:
    proc = agent_env.start_agent()
    children = _receivers(proc.popen.pid)
    assert len(children) == 2
    os.kill(proc.popen.pid, signal.SIGKILL)  # the agent only, not its process group
    proc.popen.wait(timeout=10)
    _wait("the children exit", lambda: not any(_alive(c) for c in children), 30)

    # They saw their pipe's end (their logs go to the agent's stderr once it is gone).
    assert proc.log_path.read_text().count("the agent is gone; stopping") == 2
    proc.stop()  # (closes its log; nothing is left in its process group to kill)

    again = agent_env.start_agent()  # binds the same DICOM port (healthy: listening)
    _sent(_storescu(agent_env.dicom_port, _copies(tmp_path / "after", 2)))
    assert _rows(agent_env) == 2
    assert len(_receivers(again.popen.pid)) == 2


def test_a_killed_child_is_restarted_and_the_listener_keeps_accepting(
    agent_env: AgentEnv, tmp_path: Path
) -> None:
    agent_env.env["PACS_AGENT_DICOM_PROCESSES"] = "2"
    proc = agent_env.start_agent()
    [child] = _receivers(proc.popen.pid)
    os.kill(child, signal.SIGKILL)
    # Not healthy while it is down (a restart takes the imports of a fresh interpreter).
    _wait("/health says the listener is down", lambda: not _healthy(agent_env), 30)
    _sent(_storescu(agent_env.dicom_port, _copies(tmp_path / "meanwhile", 2)))  # the agent's
    _wait("a new child", lambda: _receivers(proc.popen.pid) not in ([], [child]), 30)
    _wait("healthy again", lambda: _healthy(agent_env), 60)
    log = proc.log_path.read_text()
    assert re.search(r"DICOM receiving process 1 \(pid \d+\) exited with code -9", log), log
    with _paused(proc):  # the new child accepts
        _sent(_storescu(agent_env.dicom_port, _copies(tmp_path / "after", 2)))
    assert _rows(agent_env) == 4


def test_tls_applies_in_every_receiving_process(
    agent_env: AgentEnv,
    tmp_path: Path,
    pki: Path,  # noqa: F811
) -> None:
    agent_env.env.update(
        PACS_AGENT_DICOM_PROCESSES="2",
        PACS_AGENT_TLS_CERT_FILE=str(pki / "server.crt"),
        PACS_AGENT_TLS_KEY_FILE=str(pki / "server.key"),
        PACS_AGENT_TLS_CA_FILE=str(pki / "ca.crt"),
    )
    proc = agent_env.start_agent()
    tls = ("+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt"))

    def send(*flags: str) -> subprocess.CompletedProcess[str]:
        files = _copies(tmp_path / f"tls{len(list(tmp_path.iterdir()))}", 1)
        return subprocess.run(
            [STORESCU, *flags, "-aec", "PACSAGENT", "127.0.0.1", str(agent_env.dicom_port)]
            + [str(f) for f in files],
            capture_output=True,
            text=True,
            timeout=60,
            env=DCMTK_ENV,
        )

    with _paused(proc):  # the child alone
        assert send().returncode != 0  # no TLS: refused
        ok = send(*tls)
        assert ok.returncode == 0, ok.stdout + ok.stderr
    assert send(*tls).returncode == 0
    assert _rows(agent_env) == 2


def test_a_busy_port_fails_start_up_before_any_child(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, dicom_host="127.0.0.1", dicom_port=free_port(), dicom_processes=3
    )
    taken = open_listener(settings)
    db = Database(f"sqlite:///{tmp_path / 'unused.db'}")
    receivers = Receivers(settings, Ingestor(db, InstanceStore(tmp_path / "store")), None)
    try:
        with pytest.raises(ListenerBusy, match=rf"DICOM port 127.0.0.1:{settings.dicom_port}"):
            receivers.start()
        assert receivers.children == [] and receivers.server is None
    finally:
        taken.close()
        db.dispose()


def test_servers_sharing_a_listener_all_stop_promptly_after_accept_races(tmp_path: Path) -> None:
    """Every server wakes up for each connection and all but one lose the race: with a blocking
    listener the losers would wait in accept() (pynetdicom's own: up to its 60 s timeout) and
    their shutdown() with them."""
    settings = Settings(data_dir=tmp_path, dicom_host="127.0.0.1", dicom_port=free_port())
    listener = open_listener(settings)
    db = Database(f"sqlite:///{tmp_path / 'unused.db'}")
    ingestor = Ingestor(db, InstanceStore(tmp_path / "store"))
    servers = [
        start_scp(settings, ingestor, listener=listener, spool=tmp_path / "spool" / str(k))
        for k in range(3)
    ]
    try:
        # What a server that lost the race does next: accept() with nothing left to accept
        # answers at once (EAGAIN; socketserver ignores an OSError from get_request()).
        lost = time.monotonic()
        with pytest.raises(BlockingIOError):
            servers[0].get_request()
        assert time.monotonic() - lost < 1
        for _ in range(3):
            echo = subprocess.run(
                ["/usr/bin/echoscu", "-aec", "PACSAGENT", "127.0.0.1", str(settings.dicom_port)],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert echo.returncode == 0, echo.stderr
    finally:
        started = time.monotonic()
        for server in servers:
            server.shutdown()
        took = time.monotonic() - started
        db.dispose()
    assert took < 5, f"shutdown took {took:.1f} s"
    assert listener.fileno() == -1


def _paced_sender(port: int, acked: list[str], result: dict[str, bool]) -> None:
    """A modality that keeps its association open: a C-STORE every 0.1 s until it is cut."""
    from pynetdicom import AE

    ae = AE(ae_title="SLOWMOD")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    ds = dcmread(sample_path("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAGENT")
    end = time.monotonic() + 90
    while assoc.is_established and time.monotonic() < end:
        ds.SOPInstanceUID = generate_uid()
        status = assoc.send_c_store(ds)
        if status and status.Status == 0:
            acked.append(str(ds.SOPInstanceUID))
        time.sleep(0.1)
    result["aborted"] = assoc.is_aborted
    if assoc.is_established:
        assoc.release()


def test_stop_during_transfers_answers_and_loses_nothing(
    agent_env: AgentEnv, tmp_path: Path
) -> None:
    """SIGTERM while a storescu and a modality that keeps its association open send: the agent
    and its children exit on their own, storescu finishes within the grace period, the open
    association is cut between C-STOREs after it, and every instance a sender was told was
    stored is there."""
    import threading

    agent_env.env["PACS_AGENT_DICOM_PROCESSES"] = "2"
    proc = agent_env.start_agent()
    children = _receivers(proc.popen.pid)
    log = tmp_path / "storescu.log"
    with open(log, "w") as out:
        sender = subprocess.Popen(
            [STORESCU, "-v", "-aec", "PACSAGENT", "127.0.0.1", str(agent_env.dicom_port)]
            + [str(f) for f in _copies(tmp_path / "batch", 30)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=DCMTK_ENV,
        )
    paced: list[str] = []
    result: dict[str, bool] = {}
    slow = threading.Thread(target=_paced_sender, args=(agent_env.dicom_port, paced, result))
    slow.start()
    _wait("transfers under way", lambda: bool(paced and acknowledged(log.read_text())), 60)
    stopping = time.monotonic()
    proc.popen.terminate()
    assert proc.popen.wait(timeout=60) == 0, proc.log_tail()
    assert time.monotonic() - stopping < 25  # the 5 s grace, not the 30 s limit of drain()
    assert not any(_alive(c) for c in children)
    assert sender.wait(timeout=60) == 0  # it finished within the grace period
    slow.join(timeout=60)
    assert result == {"aborted": True}  # cut by the agent, not by the sender's own end
    acked = [str(dcmread(f).SOPInstanceUID) for f in acknowledged(log.read_text())]
    assert len(acked) == 30
    db = Database(agent_env.env["PACS_AGENT_DATABASE_URL"])
    try:
        with db.session() as s:
            stored = set(s.scalars(select(Instance.sop_instance_uid)))
    finally:
        db.dispose()
    assert set(acked) <= stored and set(paced) <= stored
    assert re.search(r"DICOM receiving process 1 \(pid \d+\) stopped", proc.log_path.read_text())
