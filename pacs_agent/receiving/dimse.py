"""The DICOM listener: C-ECHO and C-STORE. The handler stores and returns; nothing else.

Each failure stage has its own status (see pacs_agent.dicom_facts); an escaped exception becomes
0xC211 and is logged with UIDs only. Every refusal is also a row in ``refusals``
(pacs_agent.receiving.refusals), best effort: the status is answered even if that write fails.
"""

from __future__ import annotations

import logging
import socket
import ssl
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer
from pynetdicom.utils import make_target

from pacs_agent.dicom_facts import (
    ANALYSABLE_SOP_CLASSES,
    NON_IMAGE_SOP_CLASSES,
    OTHER_IMAGE_SOP_CLASSES,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_PROCESSING_FAILURE,
    RejectedDataset,
)
from pacs_agent.receiving.ingest import Ingestor, Peer
from pacs_agent.receiving.refusals import RefusedUids, clean_uid, record_refusal, uids_from_file
from pacs_agent.settings import Settings

log = logging.getLogger(__name__)

# Every transfer syntax pydicom (with the pylibjpeg plugins) can decode; stored as received.
TRANSFER_SYNTAXES: list[UID] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
]


def storage_sop_classes() -> Iterable[str]:
    yield from ANALYSABLE_SOP_CLASSES
    yield from OTHER_IMAGE_SOP_CLASSES
    yield from NON_IMAGE_SOP_CLASSES


def handle_echo(event: Event) -> int:
    return 0x0000


class ReleaseTracker:
    """Remembers which studies each association stored, to report them when it is released,
    and how many C-STOREs each association has in its handler now (``drain`` waits for them)."""

    def __init__(self, on_release: Callable[[set[str], str], None] | None) -> None:
        self.on_release = on_release
        self._studies: dict[int, set[str]] = {}
        self._handling: dict[int, int] = {}
        self._lock = threading.Lock()

    def stored(self, assoc: Any, study_uid: str) -> None:
        with self._lock:
            self._studies.setdefault(id(assoc), set()).add(study_uid)

    def pop(self, assoc: Any) -> set[str]:
        with self._lock:
            return self._studies.pop(id(assoc), set())

    def handling(self, assoc: Any, delta: int) -> None:
        with self._lock:
            n = self._handling.get(id(assoc), 0) + delta
            if n > 0:
                self._handling[id(assoc)] = n
            else:
                self._handling.pop(id(assoc), None)

    def idle(self, assoc: Any) -> bool:
        """No C-STORE of this association is being handled (its dataset may still arrive)."""
        with self._lock:
            return id(assoc) not in self._handling


def _recv_whole(assoc_sock: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` reading straight into one buffer of the wanted size.

    pynetdicom's own reads a PDU 4096 bytes at a time and appends each piece to a growing
    bytearray: about 1,800 Python-level reads and copies per 7 MB instance, under the GIL. Same
    contract: blocks until ``nr_bytes`` are read, returns what was read when the peer closes
    early, lets socket errors (timeouts included) propagate."""
    sock = assoc_sock.socket
    if sock is None:
        raise OSError("no socket")
    buf = bytearray(nr_bytes)
    nr_read = 0
    with memoryview(buf) as view:
        while nr_read < nr_bytes:
            got = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
            if not got:
                break
            nr_read += got
    if nr_read < nr_bytes:
        del buf[nr_read:]
    return buf


def handle_conn_open(event: Event) -> None:
    """Answers leave at once (no Nagle delay behind a C-STORE response), and PDUs are read
    in one buffer each (``_recv_whole``)."""
    assoc_sock = event.assoc.dul.socket
    sock = getattr(assoc_sock, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    if isinstance(assoc_sock, AssociationSocket):
        assoc_sock.recv = types.MethodType(_recv_whole, assoc_sock)  # type: ignore[method-assign]


def tune_listener(server: ThreadedAssociationServer, buffer_bytes: int) -> None:
    """Larger kernel socket buffers on the listening socket (accepted connections inherit
    them): a 7 MB instance streams in fewer, larger reads. 0 leaves the kernel's defaults."""
    if server.socket is not None:
        _set_buffers(server.socket, buffer_bytes)


def _set_buffers(sock: socket.socket, buffer_bytes: int) -> None:
    if buffer_bytes <= 0:
        return
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, buffer_bytes)
        except OSError:
            log.warning("could not set the DICOM listener's socket buffer to %d", buffer_bytes)


def handle_released(event: Event, tracker: ReleaseTracker) -> None:
    studies = tracker.pop(event.assoc)
    if studies and tracker.on_release is not None:
        try:
            tracker.on_release(studies, str(event.assoc.requestor.ae_title).strip())
        except Exception:
            log.exception("association-release completion failed")


def handle_aborted(event: Event, tracker: ReleaseTracker) -> None:
    # An aborted association says nothing about completeness: the quiet period decides.
    tracker.pop(event.assoc)


def handle_store(event: Event, ingestor: Ingestor, tracker: ReleaseTracker | None = None) -> int:
    calling_ae = str(event.assoc.requestor.ae_title).strip()
    address = str(event.assoc.requestor.address or "") or None
    # What the sender announced: the SOP Instance UID is known even when the dataset is garbage.
    announced = RefusedUids(
        clean_uid(getattr(event.request, "AffectedSOPInstanceUID", None)),
        clean_uid(getattr(event.request, "AffectedSOPClassUID", None)),
    )
    if tracker is not None:
        tracker.handling(event.assoc, +1)
    try:
        return _store(event, ingestor, tracker, calling_ae, address, announced)
    finally:
        if tracker is not None:
            tracker.handling(event.assoc, -1)


def _store(
    event: Event,
    ingestor: Ingestor,
    tracker: ReleaseTracker | None,
    calling_ae: str,
    address: str | None,
    announced: RefusedUids,
) -> int:
    path: Path | None = None
    try:
        try:
            path = Path(event.dataset_path)
        except Exception:
            raise RejectedDataset(
                STATUS_CANNOT_UNDERSTAND, "cannot read the dataset stream"
            ) from None
        ts = UID(str(event.context.transfer_syntax))
        # The AE title the sender called (A-ASSOCIATE-RQ), not our own configured title.
        rq = event.assoc.requestor.primitive
        called = rq.called_ae_title if rq is not None else None
        peer = Peer(called_ae=str(called or "").strip() or None, address=address)
        outcome = ingestor.ingest_file(path, ts, source="dimse", calling_ae=calling_ae, peer=peer)
        if tracker is not None:
            tracker.stored(event.assoc, outcome.study_uid)
        return 0x0000
    except RejectedDataset as exc:
        status, reason = exc.status, exc.reason
        log.warning(
            "C-STORE refused from %s sop=%s: 0x%04X %s",
            calling_ae,
            announced.sop_instance_uid,
            status,
            reason,
        )
    except Exception as exc:
        status, reason = STATUS_PROCESSING_FAILURE, f"processing failure ({type(exc).__name__})"
        # No traceback: its frames and messages can quote dataset values.
        log.error(
            "C-STORE failed from %s sop=%s: %s", calling_ae, announced.sop_instance_uid, reason
        )
    uids = announced
    if path is not None:
        uids = announced.or_else(uids_from_file(path))
    record_refusal(
        ingestor.db,
        door="dimse",
        status=status,
        reason=reason,
        uids=uids,
        calling_ae=calling_ae,
        sender_address=address,
    )
    return status


def make_ae(settings: Settings) -> AE:
    # Stream every received dataset to a temporary file instead of memory (pynetdicom's setting
    # is process-wide); the handler moves it into the store, pynetdicom removes the temp file.
    _config.STORE_RECV_CHUNKED_DATASET = True
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    ae.maximum_associations = 16
    if settings.allowed_calling_aes:
        ae.require_calling_aet = list(settings.allowed_calling_aes)
    ae.add_supported_context(Verification)
    for sop_class in storage_sop_classes():
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    return ae


def prepare_spool(spool: Path) -> None:
    """Receive into a spool folder beside the store, emptied at start.

    pynetdicom writes each incoming dataset to a temporary file in Python's temp folder; an
    aborted association leaves its partial file behind. Pointing the temp folder here (for this
    process) keeps those on the data disk, lets the store take finished files by hard link, and
    lets every start remove what an abort or a crash left.
    """
    spool.mkdir(parents=True, exist_ok=True)
    empty_folder(spool)
    tempfile.tempdir = str(spool)


def empty_folder(folder: Path) -> None:
    """Remove the files directly in ``folder`` (what an abort or a crash left in a spool)."""
    for leftover in folder.iterdir():
        if leftover.is_file():
            leftover.unlink(missing_ok=True)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """A server TLS context from settings (TLS 1.2 or later), or None when TLS is off."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
    if settings.tls_ca_file is not None:
        ctx.load_verify_locations(str(settings.tls_ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: only modalities with our CA's certs
    return ctx


class ListenerBusy(OSError):
    """The DICOM port cannot be bound (another process listens on it, or no permission)."""


def open_listener(settings: Settings, backlog: int = 128) -> socket.socket:
    """Bind and listen on the DICOM port, for several receiving processes to accept on.

    Non-blocking: every process waits for a connection in its own select() and all of them wake
    up; the ones that lose the race get EAGAIN from accept(), which socketserver ignores, instead
    of blocking in accept() (which would hold up their shutdown). SO_REUSEADDR as pynetdicom's
    own listener; the socket buffers of ``tune_listener`` (accepted connections inherit them)."""
    host, port = settings.dicom_host, settings.dicom_port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenerBusy(
            exc.errno, f"cannot listen on DICOM port {host}:{port}: {exc.strerror}"
        ) from None
    sock.setblocking(False)
    _set_buffers(sock, settings.dicom_socket_buffer_bytes)
    return sock


# A TLS client has this long to complete its handshake (SharedListenerServer).
_TLS_HANDSHAKE_S = 10.0


class SharedListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server accepting on a listening socket opened elsewhere
    (``open_listener``, shared by the agent's receiving processes) instead of binding its own.

    Closing it closes this process's descriptor only: ``shutdown()`` on a shared listening
    socket would stop it in every process."""

    def __init__(self, *args: Any, listener: socket.socket, **kwargs: Any) -> None:
        self._listener = listener
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()  # the unbound socket TCPServer made
        self._listener.setblocking(False)  # (a descriptor passed to a child forgets it)
        self.socket = self._listener
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass  # already listening

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # BlockingIOError (an OSError, ignored by socketserver) when another process took it.
        client, address = self._listener.accept()
        client.setblocking(True)  # as pynetdicom's own listener gives its connections
        if self.ssl_context:
            # The handshake runs in the accept loop: a client that connects and says nothing
            # must not hold it (nor a stop) for longer than this.
            client.settimeout(_TLS_HANDSHAKE_S)
            try:
                client = self.ssl_context.wrap_socket(client, server_side=True)
            except OSError:  # ignored by socketserver: the next connection is accepted
                client.close()
                raise
            client.settimeout(None)
        return client, address

    def server_close(self) -> None:
        self._listener.close()
        self._threads.join()  # type: ignore[attr-defined]  # ThreadingMixIn's request threads


def start_scp(
    settings: Settings,
    ingestor: Ingestor,
    on_release: Callable[[set[str], str], None] | None = None,
    *,
    listener: socket.socket | None = None,
    spool: Path | None = None,
) -> ThreadedAssociationServer:
    """Start the listener in background threads and return the server (call .shutdown()).

    ``on_release(study_uids, calling_ae)`` is called when an association that stored
    instances is released normally (not when it is aborted). ``listener``: accept on this
    listening socket (``open_listener``, shared with other receiving processes) instead of
    binding one; ``spool``: the spool folder of this process (default ``<data>/spool``).
    """
    prepare_spool(spool or settings.resolved_data_dir / "spool")
    ingestor.committer.window_s = settings.ingest_group_window_ms / 1000
    ae = make_ae(settings)
    tracker = ReleaseTracker(on_release)
    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, handle_conn_open),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ingestor, tracker]),
        (evt.EVT_RELEASED, handle_released, [tracker]),
        (evt.EVT_ABORTED, handle_aborted, [tracker]),
    ]
    ctx = tls_context(settings)
    address = (settings.dicom_host, settings.dicom_port)
    if listener is None:
        server = ae.start_server(address, block=False, evt_handlers=handlers, ssl_context=ctx)
        assert server is not None  # block=False always returns the server
        tune_listener(server, settings.dicom_socket_buffer_bytes)
    else:  # (a shared listener's buffers were set once, by open_listener)
        server = ae.make_server(
            address,
            evt_handlers=handlers,
            ssl_context=ctx,
            server_class=SharedListenerServer,
            listener=listener,
        )
        ae._servers.append(server)  # (as start_server does: its shutdown() removes it)
        target = make_target(server.serve_forever)  # as start_server runs it
        threading.Thread(target=target, name="dicom-accept", daemon=True).start()
    server.tracker = tracker  # type: ignore[attr-defined]  # for drain()
    log.info(
        "DICOM listener %s on port %d%s",
        settings.ae_title,
        settings.dicom_port,
        " (TLS)" if ctx else "",
    )
    return server


def drain(server: ThreadedAssociationServer, grace_s: float = 5.0, limit_s: float = 30.0) -> None:
    """Stop a server gracefully: accept nothing more, let open associations finish for up to
    ``grace_s``, then abort each one between C-STOREs (a C-STORE in its handler is answered
    first; one whose dataset is still arriving is not acknowledged, so its sender sends it
    again), and abort whatever is left at ``limit_s``."""
    server.shutdown()
    tracker: ReleaseTracker | None = getattr(server, "tracker", None)
    start = time.monotonic()
    while server.active_associations:
        waited = time.monotonic() - start
        if waited >= limit_s:
            for assoc in server.active_associations:
                assoc.abort()
            break
        if waited >= grace_s:
            for assoc in server.active_associations:
                if tracker is None or tracker.idle(assoc):
                    assoc.abort()
        time.sleep(0.05)
