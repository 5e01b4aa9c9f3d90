"""Shared fixtures: real PostgreSQL and Redis at their standard local ports (started if they are
not running), fresh databases per test, and helpers to run the agent and a worker as processes."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _wait_port(host: str, port: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if _port_open(host, port):
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(autouse=True)
def _restore_tempdir() -> Iterator[None]:
    """start_scp points Python's temp folder at the agent's spool (process-wide): undo it."""
    import tempfile

    saved = tempfile.tempdir
    yield
    tempfile.tempdir = saved


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_server() -> str:
    """A real Redis at 127.0.0.1:6379, started here if it is not running."""
    if not _port_open(REDIS_HOST, REDIS_PORT):
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (make system-deps installs it)")
        Path("/tmp/pacs-agent-test-redis").mkdir(exist_ok=True)
        subprocess.run(
            [
                exe,
                "--daemonize",
                "yes",
                "--bind",
                "127.0.0.1",
                "--port",
                str(REDIS_PORT),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                "/tmp/pacs-agent-test-redis",
            ],
            check=True,
        )
        if not _wait_port(REDIS_HOST, REDIS_PORT, 15):
            pytest.fail("Redis did not start on 127.0.0.1:6379")
    return f"redis://{REDIS_HOST}:{REDIS_PORT}"


@pytest.fixture
def broker_url(redis_server: str) -> Iterator[str]:
    """A Redis database number of its own for one test, emptied before and after."""
    import redis

    db = 1 + (os.getpid() + int(time.time() * 1000)) % 14
    url = f"{redis_server}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """A real PostgreSQL at 127.0.0.1:5432, started here if it is not running."""
    if not _port_open("127.0.0.1", 5432):
        versions = sorted(os.listdir("/etc/postgresql")) if Path("/etc/postgresql").is_dir() else []
        if not versions:
            pytest.fail("PostgreSQL is not installed (make system-deps installs it)")
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"],
            check=False,
        )
        if not _wait_port("127.0.0.1", 5432, 30):
            pytest.fail("PostgreSQL did not start on 127.0.0.1:5432")
    return PG_ADMIN_URL


def _create_pg_database(admin_url: str, template: str | None = None) -> tuple[str, str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    name = f"pacs_agent_test_{uuid.uuid4().hex[:12]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    eng = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    end = time.monotonic() + 10
    try:
        while True:
            try:
                with eng.connect() as c:
                    c.execute(text(f'CREATE DATABASE "{name}"{copy}'))
                break
            except OperationalError as exc:
                # A template's last connection can take a moment to go after it was closed.
                if "being accessed by other users" not in str(exc) or time.monotonic() > end:
                    raise
                time.sleep(0.1)
    finally:
        eng.dispose()
    return name, admin_url.rsplit("/", 1)[0] + f"/{name}"


def _drop_pg_database(admin_url: str, name: str) -> None:
    from sqlalchemy import create_engine, text

    eng = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    eng.dispose()


@pytest.fixture(scope="session")
def _migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database migrated to head once per session; each test gets a copy."""
    from pacs_agent.db.migrate import upgrade

    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def _pg_template(postgres_server: str) -> Iterator[str]:
    """A PostgreSQL database migrated to head once per session (nobody connects to it after):
    each test's database is created from it (CREATE DATABASE ... TEMPLATE), which is what
    running the migrations again would give, in a fraction of the time."""
    from pacs_agent.db.migrate import upgrade

    name, url = _create_pg_database(postgres_server)
    try:
        upgrade(url)  # (the migrations' engine has no pool: no connection is left open)
        yield name
    finally:
        _drop_pg_database(postgres_server, name)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database: the same tests run on SQLite and on PostgreSQL. Each is a
    copy of a database migrated once per session (the migrations take about a second a
    database; the copy a few milliseconds on SQLite, a few hundred on PostgreSQL)."""
    if request.param == "sqlite":
        import sqlite3

        path = tmp_path / "test.db"
        src = sqlite3.connect(request.getfixturevalue("_migrated_sqlite"))
        dst = sqlite3.connect(path)
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
        yield f"sqlite:///{path}"
        return
    admin = request.getfixturevalue("postgres_server")
    name, url = _create_pg_database(admin, template=request.getfixturevalue("_pg_template"))
    try:
        yield url
    finally:
        _drop_pg_database(admin, name)


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The DEMO bundle (seeded random weights), written once per test session."""
    out = tmp_path_factory.mktemp("bundle") / "demo"
    subprocess.run(
        [sys.executable, "-m", "pacs_agent.cli", "models", "demo", "--out", str(out)],
        check=True,
        cwd=REPO,
    )
    return out


def sample_path(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"test file {name} not found (pydicom / pydicom-data)")
    return Path(str(path))


class Proc:
    """A product process (agent or worker) with its log, stopped at the end of the test.

    It runs in a process group of its own so that stopping it also ends what it started: a
    worker's decode pool processes (spawned, with their resource tracker they outlive a
    SIGKILLed worker, about 300 MiB each, for the rest of the session), as `bench chaos` does."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "pacs_agent.cli", *args],
            env=env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._terminated = False

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def signal_stop(self) -> None:
        """Ask the process to stop (SIGTERM, once) without waiting; `stop` waits."""
        if self.popen.poll() is None and not self._terminated:
            self.popen.terminate()
            self._terminated = True

    def stop(self, sig: str = "term") -> None:
        """Stop the process (SIGTERM, or SIGKILL with ``sig="kill"``), then SIGKILL whatever is
        left in its process group. Safe to call again."""
        if self.popen.poll() is None:
            if sig == "kill":
                self.popen.kill()
            else:
                self.signal_stop()
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        if not self._log.closed:  # once: the group id is free for reuse afterwards
            kill_group(self.popen.pid)
        self._log.close()


def kill_group(pgid: int) -> None:
    """SIGKILL every process left in process group ``pgid`` (a stopped product process's
    children, e.g. decode pool processes orphaned by a kill -9 of their worker)."""
    import signal

    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class AgentEnv:
    """Environment for one agent + worker deployment under test."""

    def __init__(
        self, tmp: Path, database_url: str, broker_url: str, bundle: Path, destinations: str
    ) -> None:
        self.data_dir = tmp / "agent-data"
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.env = {
            **os.environ,
            "PACS_AGENT_DATA_DIR": str(self.data_dir),
            "PACS_AGENT_DATABASE_URL": database_url,
            "PACS_AGENT_BROKER_URL": broker_url,
            "PACS_AGENT_BUNDLE": str(bundle),
            "PACS_AGENT_DICOM_PORT": str(self.dicom_port),
            "PACS_AGENT_DICOM_HOST": "127.0.0.1",
            "PACS_AGENT_HTTP_PORT": str(self.http_port),
            "PACS_AGENT_HTTP_HOST": "127.0.0.1",
            "PACS_AGENT_DESTINATIONS": destinations,
            "PACS_AGENT_QUIET_PERIOD_S": "2",
            "PACS_AGENT_DELIVERY_BACKOFF_S": "0.5",
            "PACS_AGENT_MIN_FREE_DISK_MB": "50",
            # Closed by default: the worker fetches instances and the tests read the API with it.
            "PACS_AGENT_API_TOKEN": secrets.token_urlsafe(32),
        }
        self.procs: list[Proc] = []
        self.tmp = tmp

    def start_agent(self) -> Proc:
        p = Proc(["serve"], self.env, self.tmp / f"agent-{len(self.procs)}.log")
        self.procs.append(p)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            if p.popen.poll() is not None:
                pytest.fail(f"agent exited early:\n{p.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return p
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        pytest.fail(f"agent not healthy within 60 s:\n{p.log_tail()}")

    def start_worker(self) -> Proc:
        p = Proc(["worker"], self.env, self.tmp / f"worker-{len(self.procs)}.log")
        self.procs.append(p)
        return p

    def auth(self) -> dict[str, str]:
        """The Authorization header of the service token (which may read, as a viewer)."""
        return {"authorization": f"Bearer {self.env['PACS_AGENT_API_TOKEN']}"}

    def study(self, study_uid: str) -> dict | None:
        r = httpx.get(f"{self.url}/api/studies/{study_uid}", headers=self.auth(), timeout=10)
        return r.json() if r.status_code == 200 else None

    def wait_study(self, study_uid: str, states: set[str], timeout: float = 240) -> dict:
        end = time.monotonic() + timeout
        last = None
        while time.monotonic() < end:
            last = self.study(study_uid)
            if last and last["status"] in states:
                return last
            for p in self.procs:
                if p.popen.poll() is not None:
                    pytest.fail(f"a product process exited:\n{p.log_tail()}")
            time.sleep(0.5)
        logs = "\n---\n".join(p.log_tail(40) for p in self.procs)
        pytest.fail(f"study {study_uid} not in {states} after {timeout} s: {last}\n{logs}")

    def stop(self) -> None:
        # SIGTERM to all first, then wait for each: they shut down at the same time (a worker's
        # warm shutdown and the agent's take seconds each).
        for p in reversed(self.procs):
            p.signal_stop()
        for p in reversed(self.procs):
            p.stop()


_PROPOSE = {
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG extended
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.5": "-xr",  # RLE
    "1.2.840.10008.1.2.1.99": "-xd",  # deflated
}


def storescu(
    port: int,
    *files: Path,
    aet: str = "MODALITY",
    aec: str = "PACSAGENT",
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu as the sending modality, proposing each file's own transfer syntax
    (one association per transfer syntax, files in the order given)."""
    from pydicom import dcmread

    groups: dict[str, list[str]] = {}
    for f in files:
        ts = str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(_PROPOSE.get(ts, "-x="), []).append(str(f))
    result: subprocess.CompletedProcess[str] | None = None
    out, err = "", ""
    for flag, group in groups.items():
        result = subprocess.run(
            [
                "storescu",
                "-v",
                "-aet",
                aet,
                "-aec",
                aec,
                flag,
                *extra,
                "127.0.0.1",
                str(port),
                *group,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            # Debian's dcmtk leaves Nagle's algorithm on: ~90 ms per small C-STORE without this.
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        out += result.stdout
        err += result.stderr
        if result.returncode != 0:
            break
    assert result is not None
    return subprocess.CompletedProcess(result.args, result.returncode, out, err)
