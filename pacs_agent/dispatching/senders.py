"""Destinations for results: DICOM C-STORE, DICOMweb STOW-RS, Orthanc REST, a folder.

A destination is a URL:
  dicom://AET@host:port            C-STORE (pynetdicom SCU; with an AssociationPool the
                                   association stays open a short idle time for the next job)
  dicom+tls://AET@host:port        the same over TLS (CA and client certificate from settings)
  dicomweb+http(s)://[user:password@]host:port/...
                                   STOW-RS (dicomweb-client); basic auth from the URL, or a
                                   bearer token from PACS_AGENT_DICOMWEB_TOKEN
  orthanc+http(s)://host:port      Orthanc REST upload (orthanc-api-client)
  file:///absolute/path            a folder: <path>/<study UID>/<series UID>/<SOP UID>.dcm
"""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs_agent.destinations import identity
from pacs_agent.receiving.store import fsync_dir

# C-STORE statuses that mean "stored" (0xB000/0xB006/0xB007 are warnings, still stored).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


class DeliveryError(Exception):
    pass


class Sender(Protocol):
    url: str

    def send(self, files: Sequence[Path]) -> None: ...


def redact(url: str) -> str:
    """The destination's identity: the URL without credentials, everything else kept (the AE
    title of ``dicom://`` and ``dicom+tls://`` included), for logs and the database."""
    return identity(url)


Contexts = frozenset[tuple[str, str]]  # (SOP Class UID, Transfer Syntax UID)


def _accepted(assoc: object) -> Contexts:
    return frozenset(
        (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
        for cx in getattr(assoc, "accepted_contexts", [])
        if cx.transfer_syntax
    )


class AssociationPool:
    """C-STORE associations kept open per destination between deliveries (a worker delivers
    one job after another to the same PACS): after a delivery its association waits here for
    ``idle_s`` seconds for the next one, then is released. Keyed by the destination's identity
    (`redact`: the URL without credentials), the calling AE and the TLS context; an association
    is reused only when it accepted every (SOP class, transfer syntax) the next files need, and
    one that the peer closed meanwhile is dropped. One user at a time per association."""

    def __init__(self, idle_s: float = 10.0) -> None:
        self.idle_s = idle_s
        self.opened = 0  # associations opened since start (tests and logs read it)
        self._idle: dict[tuple[object, ...], list[tuple[object, float]]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._reaper: threading.Thread | None = None

    def acquire(
        self, key: tuple[object, ...], needed: Contexts, open_new: Callable[[Contexts], object]
    ) -> tuple[object, bool]:
        """(association, reused): an idle one of ``key`` that accepted ``needed``, else a new
        one from ``open_new`` (which may raise)."""
        stale: list[object] = []
        found = None
        with self._lock:
            kept = []
            for assoc, since in self._idle.pop(key, []):
                alive = getattr(assoc, "is_established", False)
                if not alive or time.monotonic() - since > self.idle_s:
                    stale.append(assoc)
                elif found is None and needed <= _accepted(assoc):
                    found = assoc
                else:
                    kept.append((assoc, since))
            if kept:
                self._idle[key] = kept
        for assoc in stale:
            _close(assoc)
        if found is not None:
            return found, True
        assoc = open_new(needed)
        with self._lock:
            self.opened += 1
        return assoc, False

    def release(self, key: tuple[object, ...], assoc: object) -> None:
        """A delivery that went well: keep the association for the next one (or release it
        when pooling is off)."""
        if self.idle_s <= 0 or not getattr(assoc, "is_established", False):
            _close(assoc)
            return
        with self._lock:
            self._idle.setdefault(key, []).append((assoc, time.monotonic()))
            if self._reaper is None or not self._reaper.is_alive():
                self._wake.clear()
                self._reaper = threading.Thread(
                    target=self._reap, name="association-reaper", daemon=True
                )
                self._reaper.start()

    def discard(self, assoc: object) -> None:
        """An association a delivery failed on: aborted, never reused."""
        try:
            assoc.abort()  # type: ignore[attr-defined]
        except Exception:
            pass

    def idle(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._idle.values())

    def close(self) -> None:
        with self._lock:
            every = [a for v in self._idle.values() for a, _ in v]
            self._idle.clear()
        self._wake.set()
        for assoc in every:
            _close(assoc)

    def _reap(self) -> None:
        while not self._wake.wait(max(self.idle_s / 2, 0.05)):
            now = time.monotonic()
            expired: list[object] = []
            with self._lock:
                for key in list(self._idle):
                    keep = []
                    for assoc, since in self._idle[key]:
                        if now - since > self.idle_s or not getattr(assoc, "is_established", 0):
                            expired.append(assoc)
                        else:
                            keep.append((assoc, since))
                    if keep:
                        self._idle[key] = keep
                    else:
                        del self._idle[key]
                empty = not self._idle
                if empty:
                    self._reaper = None
            for assoc in expired:
                _close(assoc)
            if empty:
                return


def _close(assoc: object) -> None:
    try:
        if getattr(assoc, "is_established", False):
            assoc.release()  # type: ignore[attr-defined]
    except Exception:
        pass


@dataclass
class DicomSender:
    url: str
    called_ae: str
    host: str
    port: int
    calling_ae: str = "PACSAGENT"
    tls: ssl.SSLContext | None = None
    # Keep the association open for the next delivery (None: one association per send).
    pool: AssociationPool | None = None

    def _open(self, needed: Contexts) -> object:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = 30
        ae.dimse_timeout = 120
        ae.network_timeout = 60
        for sop_class, ts in sorted(needed):
            tss = [ts] + [t for t in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if t != ts]
            ae.add_requested_context(sop_class, tss)
        tls_args = (self.tls, self.host) if self.tls is not None else None
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae, tls_args=tls_args)
        if not assoc.is_established:
            raise DeliveryError(f"association with {self.called_ae}@{self.host}:{self.port} failed")
        return assoc

    def send(self, files: Sequence[Path]) -> None:
        datasets = [dcmread(f) for f in files]
        needed = frozenset(
            (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets
        )
        if len(needed) > 128:  # a presentation context ID is odd and below 256
            raise DeliveryError(f"{len(needed)} presentation contexts needed, at most 128")
        pool = self.pool or AssociationPool(idle_s=0)
        # The TLS context is the process's settings': one per process, so "tls" suffices.
        key = (redact(self.url), self.calling_ae, self.tls is not None)
        remaining = datasets
        while remaining:
            assoc, reused = pool.acquire(key, needed, self._open)
            try:
                remaining = self._store(assoc, remaining, reused)
            except BaseException:
                pool.discard(assoc)
                raise
            if remaining:  # a kept association the peer had closed: again on a new one
                pool.discard(assoc)
                continue
            pool.release(key, assoc)

    def _store(self, assoc: Any, datasets: list[Any], reused: bool) -> list[Any]:
        """C-STORE each dataset; returns those left when a reused association turns out dead
        before its first answer (nothing of them was stored), else [] or raises."""
        for i, ds in enumerate(datasets):
            dead_before_first = reused and i == 0
            try:
                status = assoc.send_c_store(ds)
            except RuntimeError:  # pynetdicom: the association is no longer established
                if dead_before_first and not assoc.is_established:
                    return datasets
                raise
            code = getattr(status, "Status", None)
            if code is None:
                if dead_before_first and not assoc.is_established:
                    return datasets
                raise DeliveryError(f"no C-STORE response for {ds.SOPInstanceUID}")
            if int(code) not in _STORED:
                raise DeliveryError(
                    f"C-STORE of {ds.SOPInstanceUID} refused with status 0x{int(code):04X}"
                )
        return []


@dataclass
class OrthancSender:
    url: str
    base: str
    user: str | None = None
    password: str | None = None

    def send(self, files: Sequence[Path]) -> None:
        from orthanc_api_client import OrthancApiClient

        client = OrthancApiClient(self.base, user=self.user, pwd=self.password)
        for f in files:
            try:
                client.upload(f.read_bytes())
            except Exception as exc:
                raise DeliveryError(f"Orthanc upload failed: {type(exc).__name__}: {exc}") from None


@dataclass
class DicomwebSender:
    url: str
    base: str
    user: str | None = None
    password: str | None = None
    token: str | None = None

    def send(self, files: Sequence[Path]) -> None:
        from dicomweb_client.api import DICOMwebClient
        from dicomweb_client.session_utils import create_session_from_user_pass

        session = (
            create_session_from_user_pass(self.user, self.password or "") if self.user else None
        )
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        client = DICOMwebClient(url=self.base, session=session, headers=headers)
        try:
            client.store_instances(datasets=[dcmread(f) for f in files])
        except Exception as exc:
            raise DeliveryError(f"STOW-RS failed: {type(exc).__name__}: {exc}") from None


@dataclass
class FolderSender:
    url: str
    root: Path

    def send(self, files: Sequence[Path]) -> None:
        for f in files:
            ds = dcmread(f, stop_before_pixels=True)
            folder = self.root / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{ds.SOPInstanceUID}.dcm"
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-")
            with os.fdopen(fd, "wb") as out, open(f, "rb") as src:
                shutil.copyfileobj(src, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
            fsync_dir(folder)


def client_tls_context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext:
    """TLS for outgoing associations: verify the peer against ``ca_file`` (or the system
    store), present our certificate when one is configured."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file and key_file:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def sender_for(
    url: str,
    calling_ae: str = "PACSAGENT",
    *,
    tls: ssl.SSLContext | None = None,
    dicomweb_token: str | None = None,
    associations: AssociationPool | None = None,
) -> Sender:
    """The sender for a destination URL; ``associations``: keep C-STORE associations open
    between sends (`AssociationPool`)."""
    p = urlparse(url)
    if p.scheme in ("dicom", "dicom+tls"):
        if not p.username or not p.hostname or not p.port:
            raise ValueError(f"destination {url!r}: expected {p.scheme}://AET@host:port")
        if p.scheme == "dicom+tls":
            tls = tls or client_tls_context(None, None, None)
        else:
            tls = None
        return DicomSender(
            url, unquote(p.username), p.hostname, p.port, calling_ae, tls, associations
        )
    if p.scheme in ("orthanc+http", "orthanc+https"):
        scheme = p.scheme.split("+", 1)[1]
        host = p.hostname or ""
        netloc = f"{host}:{p.port}" if p.port else host
        base = f"{scheme}://{netloc}{p.path}".rstrip("/")
        return OrthancSender(redact(url), base, p.username, p.password)
    if p.scheme in ("dicomweb+http", "dicomweb+https"):
        scheme = p.scheme.split("+", 1)[1]
        host = p.hostname or ""
        netloc = f"{host}:{p.port}" if p.port else host
        base = f"{scheme}://{netloc}{p.path}".rstrip("/")
        return DicomwebSender(
            redact(url),
            base,
            unquote(p.username) if p.username else None,
            unquote(p.password) if p.password else None,
            dicomweb_token,
        )
    if p.scheme == "file":
        if not p.path:
            raise ValueError(f"destination {url!r}: expected file:///absolute/path")
        return FolderSender(url, Path(unquote(p.path)))
    raise ValueError(
        f"destination {url!r}: unknown scheme (dicom://, dicom+tls://, dicomweb+http://, "
        "orthanc+http://, file://)"
    )
