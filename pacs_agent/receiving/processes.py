"""C-STORE received in several processes (``PACS_AGENT_DICOM_PROCESSES``).

One Python process spends 11-20 ms of CPU per small instance under the GIL (parse, hash, rows),
so one process caps ingest whatever the number of associations; dcmtk's storescp forks a process
per association. With N > 1 the agent's process opens the DICOM port (``open_listener``: a busy
port fails start-up as before) and starts N-1 receiving processes (multiprocessing, "spawn": a
fresh interpreter, no forked threads or locks); the listening socket is passed to each, and every
process, the agent's own included, accepts on it and receives with its own pynetdicom server,
``Database``, ``InstanceStore`` and ``Ingestor`` (its own group committer) and its own spool folder
(``<data>/spool/<k>``). All write to the same instance store and database.

What must happen in the agent's process is relayed over one pipe per child (a
``multiprocessing`` duplex ``Connection``), read by a thread of the agent (``Receivers``):

- the ingest metrics (``metrics.received``, ``metrics.refused``): the child swaps those two
  functions of ``pacs_agent.metrics`` for relaying ones (the child is a process of its own, so
  the swap touches nothing else), and the agent's thread calls the real ones: ``/metrics`` counts
  every process without prometheus's multiprocess mode;
- the association-release completion: ``on_release(study_uids, calling_ae)``;
- log records: a child's records are handled by the agent's own handlers and format.

Lifecycle: the agent asks each child to stop (graceful: ``dimse.drain``); a child also stops when
its pipe reaches end-of-file, which is what a kill -9 of the agent leaves, and then closes its
copy of the listening socket at once, so that a restarted agent can bind the port again. A child
that dies is logged and started again (after a back-off when it keeps dying); meanwhile
``running()`` is False, so ``/health`` says the listener is not running.

A killed child leaves what a killed agent leaves: a partial temporary file in its spool folder
(emptied when a process with that number starts, and every spool folder when the agent starts)
and, at worst, an instance file without its row (never acknowledged): the start-up repair of the
shared store (``repair_store``, before any receiver starts) indexes it.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from pacs_agent import metrics
from pacs_agent.db.session import Database
from pacs_agent.receiving.dimse import drain, empty_folder, open_listener, start_scp
from pacs_agent.receiving.ingest import Ingestor
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.settings import Settings

log = logging.getLogger(__name__)

OnRelease = Callable[[set[str], str], None]

# A child that dies sooner than this after its start is restarted after a growing back-off.
_STABLE_S = 10.0
_BACKOFF_MAX_S = 30.0
# Stopping: associations get ``drain``'s grace; a child still there after this is killed.
_STOP_LIMIT_S = 45.0


def make_ingestor(settings: Settings, db: Database, store: InstanceStore) -> Ingestor:
    """The Ingestor of an agent process (the same in every receiving process)."""
    return Ingestor(
        db,
        store,
        min_free_bytes=settings.min_free_disk_mb * 1024 * 1024,
        stat_calling_aes=settings.stat_calling_aes,
        stored_by=settings.resolved_agent_url,
    )


def clear_spools(spool: Path) -> None:
    """Empty the spool folder and every per-process folder in it (``spool/<k>``): what an
    abort or a crash left, whatever the number of processes was then."""
    if not spool.is_dir():
        return
    empty_folder(spool)
    for entry in spool.iterdir():
        if entry.is_dir():
            empty_folder(entry)


class Receivers:
    """The DICOM listener of the agent: one server in this process, or (``dicom_processes`` >
    1) one here and one in each child process, all accepting on one listening socket."""

    def __init__(
        self, settings: Settings, ingestor: Ingestor, on_release: OnRelease | None
    ) -> None:
        self.settings = settings
        self.ingestor = ingestor
        self.on_release = on_release
        self.server: ThreadedAssociationServer | None = None
        self.listener: socket.socket | None = None
        self.children: list[_Child] = []
        self._ctx = multiprocessing.get_context("spawn")
        self._stopping = threading.Event()
        self._lock = threading.RLock()
        self._monitor: threading.Thread | None = None
        self._releases: queue.SimpleQueue[tuple[set[str], str] | None] = queue.SimpleQueue()
        self._release_thread: threading.Thread | None = None

    @property
    def processes(self) -> int:
        return self.settings.dicom_processes

    def start(self) -> None:
        spool = self.settings.resolved_data_dir / "spool"
        clear_spools(spool)
        if self.processes <= 1:  # one process: pynetdicom's own listener, as always
            self.server = start_scp(self.settings, self.ingestor, on_release=self.on_release)
            return
        self.listener = open_listener(self.settings)  # a busy port fails here, before children
        self.children = [_Child(k) for k in range(1, self.processes)]
        self._release_thread = threading.Thread(
            target=self._relay_releases, name="dicom-release", daemon=True
        )
        self._release_thread.start()
        self._monitor = threading.Thread(target=self._watch, name="dicom-processes", daemon=True)
        try:
            for child in self.children:
                self._spawn(child)
            self.server = start_scp(
                self.settings,
                self.ingestor,
                on_release=self.on_release,
                listener=self.listener,
                spool=spool / "0",
            )
            self._monitor.start()
        except BaseException:
            self.stop()  # no child outlives a failed start
            raise
        log.info("DICOM receiving in %d processes", self.processes)

    def running(self) -> bool:
        """The listener accepts here and every child is up and accepting."""
        server = self.server
        if server is None or server.socket is None or server.socket.fileno() == -1:
            return False
        with self._lock:
            return all(
                c.ready and c.process is not None and c.process.is_alive() for c in self.children
            )

    def stop(self) -> None:
        if self.processes <= 1:
            if self.server is not None:
                self.server.shutdown()
            return
        with self._lock:  # (no restart is under way: the watcher restarts under this lock)
            self._stopping.set()
            children = list(self.children)
        for child in children:
            child.send(("stop",))
        if self.server is not None:
            drain(self.server)
        deadline = time.monotonic() + _STOP_LIMIT_S
        for child in children:
            proc = child.process
            if proc is None:
                continue
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("DICOM receiving process %d did not stop: killed", child.index)
                proc.kill()
                proc.join(10)
        if self._monitor is not None and self._monitor.is_alive():
            self._monitor.join(10)  # it relays what the children said until they are gone
        for child in children:
            child.close()
        if self._release_thread is not None:
            self._releases.put(None)
            self._release_thread.join(10)

    def _relay_releases(self) -> None:
        """Association-release completions relayed by the children, one after the other."""
        while (item := self._releases.get()) is not None:
            if self.on_release is None:
                continue
            try:
                self.on_release(*item)
            except Exception:
                log.exception("association-release completion failed")

    # --- the agent's side ---------------------------------------------------------------------

    def _spawn(self, child: _Child) -> None:
        assert self.listener is not None
        ours, theirs = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=child_main,
            args=(child.index, self.settings, self.listener, theirs, _log_levels()),
            name=f"dicom-receiver-{child.index}",
            # Daemonic: if the agent exits without stop() (a failed start), multiprocessing
            # terminates the children at exit (SIGTERM: they drain) instead of waiting on them.
            daemon=True,
        )
        proc.start()
        theirs.close()  # the child's end lives in the child only: its exit is our EOF
        with self._lock:
            child.process, child.conn, child.ready = proc, ours, False
            child.started_at = time.monotonic()
            child.restart_at = None
        log.info("DICOM receiving process %d started (pid %s)", child.index, proc.pid)

    def _watch(self) -> None:
        """Relay what the children send; restart a child that died (unless stopping)."""
        while True:
            with self._lock:
                children = list(self.children)
            if self._stopping.is_set() and all(
                c.process is None or not c.process.is_alive() for c in children
            ):
                # Gone: what they sent before exiting is still in the pipes.
                for child in children:
                    self._read(child, until_eof=True)
                return
            waitables: list[Any] = []
            for c in children:
                if c.conn is not None:
                    waitables.append(c.conn)
                if c.process is not None and c.process.exitcode is None:
                    waitables.append(c.process.sentinel)
            now = time.monotonic()
            timeout = 0.5
            for c in children:
                if c.restart_at is not None:
                    timeout = max(0.0, min(timeout, c.restart_at - now))
            ready = multiprocessing.connection.wait(waitables, timeout=timeout) if waitables else []
            if not waitables:
                time.sleep(timeout)
            for child in children:
                if child.conn is not None and child.conn in ready:
                    self._read(child)
                proc = child.process
                # exitcode (read above, or by running()) reaps a dead child: its sentinel may
                # then never be waited on again, so a known exit code counts as well.
                if (
                    proc is not None
                    and child.restart_at is None
                    and (proc.sentinel in ready or proc.exitcode is not None)
                ):
                    self._died(child)
                if child.restart_at is not None and time.monotonic() >= child.restart_at:
                    self._restart(child)

    def _restart(self, child: _Child) -> None:
        with self._lock:
            if self._stopping.is_set():
                child.restart_at = None  # no restart now: the watcher must not spin on it
                return
            try:
                self._spawn(child)
            except Exception as exc:  # e.g. out of memory: try again later
                child.failures += 1
                child.restart_at = time.monotonic() + _BACKOFF_MAX_S
                log.error(
                    "could not start DICOM receiving process %d (%s); again in %.0f s",
                    child.index,
                    type(exc).__name__,
                    _BACKOFF_MAX_S,
                )

    def _died(self, child: _Child) -> None:
        proc = child.process
        assert proc is not None
        proc.join(1)
        self._read(child, until_eof=True)
        if self._stopping.is_set():
            return
        lived = time.monotonic() - child.started_at
        child.failures = 0 if lived >= _STABLE_S else child.failures + 1
        delay = 0.0 if child.failures == 0 else min(_BACKOFF_MAX_S, 0.5 * 2**child.failures)
        log.error(
            "DICOM receiving process %d (pid %s) exited with code %s after %.0f s; "
            "restarting in %.1f s",
            child.index,
            proc.pid,
            proc.exitcode,
            lived,
            delay,
        )
        with self._lock:
            child.ready = False
            child.close()
            child.restart_at = time.monotonic() + delay

    def _read(self, child: _Child, until_eof: bool = False) -> None:
        """Handle every message waiting in the child's pipe (to its end when ``until_eof``)."""
        conn = child.conn
        if conn is None:
            return
        try:
            while until_eof or conn.poll():
                if until_eof and not conn.poll(0.5):
                    return
                self._handle(child, conn.recv())
        except (EOFError, OSError):
            with self._lock:
                child.ready = False
                child.close()

    def _handle(self, child: _Child, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        try:
            if kind == "received":
                metrics.received(msg[1], msg[2])
            elif kind == "refused":
                metrics.refused(msg[1], msg[2])
            elif kind == "released":
                # Database work: not in this thread, which must keep draining the pipes (a
                # child blocked on a full pipe may hold a database lock the completion needs).
                self._releases.put((msg[1], msg[2]))
            elif kind == "log":
                record: logging.LogRecord = msg[1]
                logging.getLogger(record.name).handle(record)
            elif kind == "ready":
                with self._lock:
                    child.ready = True
                log.info("DICOM receiving process %d ready", child.index)
        except Exception:
            log.exception("could not handle a %s message of DICOM receiving process", kind)


@dataclass(eq=False)
class _Child:
    index: int
    process: BaseProcess | None = None
    conn: Connection | None = None
    ready: bool = False
    started_at: float = 0.0
    restart_at: float | None = None
    failures: int = 0
    _send_lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, msg: tuple[Any, ...]) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            with self._send_lock:
                conn.send(msg)
        except (OSError, ValueError):
            pass  # it is gone: its sentinel tells the watcher

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()


def _log_levels() -> dict[str, int]:
    """The levels set on the agent's loggers, for a child to log (and relay) the same records."""
    levels = {"": logging.getLogger().level}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


# --- the child's side ---------------------------------------------------------------------------


class _Relay:
    """The child's end of the pipe: sends metrics, releases and log records to the agent.
    Several threads send (associations, the group committer): one at a time. Once the agent is
    gone, nothing is sent (its counters are gone too) and logs go to this process's stderr."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        self.broken = False

    def send(self, msg: tuple[Any, ...]) -> bool:
        if self.broken:
            return False
        try:
            with self._lock:
                self.conn.send(msg)
            return True
        except (OSError, ValueError):
            self.broken = True
            return False

    def received(self, door: str, size: int) -> None:
        self.send(("received", door, size))

    def refused(self, door: str, status: int) -> None:
        self.send(("refused", door, status))

    def released(self, study_uids: set[str], calling_ae: str) -> None:
        self.send(("released", set(study_uids), calling_ae))


class _RelayLogHandler(logging.Handler):
    """A child's log records to the agent's handlers (formatted there, as the agent's own)."""

    def __init__(self, relay: _Relay) -> None:
        super().__init__()
        self.relay = relay
        self.fallback = logging.StreamHandler()
        self.fallback.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # As logging.handlers.QueueHandler.prepare: the message merged, no arguments or
            # traceback objects (they may not pickle); a traceback's text is kept.
            msg = record.getMessage()
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            copy = logging.makeLogRecord(record.__dict__)
            copy.msg, copy.args, copy.exc_info = msg, None, None
            if not self.relay.send(("log", copy)):
                self.fallback.handle(record)
        except Exception:
            self.handleError(record)


def child_main(
    index: int,
    settings: Settings,
    listener: socket.socket,
    conn: Connection,
    log_levels: dict[str, int],
) -> None:
    """A receiving process: receive on ``listener`` until the agent says stop or is gone."""
    relay = _Relay(conn)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_RelayLogHandler(relay))
    for name, level in log_levels.items():
        logging.getLogger(name or None).setLevel(level)
    # The agent's process handles Ctrl-C for everyone; SIGTERM (e.g. systemd stopping the whole
    # group) stops this process gracefully, as the agent's request does.
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    # This process's ingest metrics are counted by the agent (see the module's docstring).
    setattr(metrics, "received", relay.received)  # noqa: B010
    setattr(metrics, "refused", relay.refused)  # noqa: B010

    db = Database(settings.resolved_database_url)
    store = InstanceStore(settings.instance_dir)
    ingestor = make_ingestor(settings, db, store)
    server = start_scp(
        settings,
        ingestor,
        on_release=relay.released,
        listener=listener,
        spool=settings.resolved_data_dir / "spool" / str(index),
    )
    relay.send(("ready",))

    def watch_agent() -> None:
        try:
            while not stop.is_set():
                if conn.recv() == ("stop",):
                    break
        except (EOFError, OSError):
            log.warning("DICOM receiving process %d: the agent is gone; stopping", index)
        stop.set()

    threading.Thread(target=watch_agent, name="agent-watch", daemon=True).start()
    while not stop.wait(1.0):
        pass
    drain(server)  # closes this process's listening socket first
    db.dispose()
    log.info("DICOM receiving process %d (pid %d) stopped", index, os.getpid())
