"""Destinations for results: DICOM C-STORE, DICOMweb STOW-RS, Orthanc REST, a folder.

A destination is a URL:
  dicom://AET@host:port            C-STORE (pynetdicom SCU, one association per batch)
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
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


@dataclass
class DicomSender:
    url: str
    called_ae: str
    host: str
    port: int
    calling_ae: str = "PACSAGENT"
    tls: ssl.SSLContext | None = None

    def send(self, files: Sequence[Path]) -> None:
        from pynetdicom import AE

        datasets = [dcmread(f) for f in files]
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = 30
        ae.dimse_timeout = 120
        ae.network_timeout = 60
        contexts: set[tuple[str, str]] = set()
        for ds in datasets:
            contexts.add((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
        for sop_class, ts in sorted(contexts):
            tss = [ts] + [t for t in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if t != ts]
            ae.add_requested_context(sop_class, tss)
        tls_args = (self.tls, self.host) if self.tls is not None else None
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae, tls_args=tls_args)
        if not assoc.is_established:
            raise DeliveryError(f"association with {self.called_ae}@{self.host}:{self.port} failed")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code is None:
                    raise DeliveryError(f"no C-STORE response for {ds.SOPInstanceUID}")
                if int(code) not in _STORED:
                    raise DeliveryError(
                        f"C-STORE of {ds.SOPInstanceUID} refused with status 0x{int(code):04X}"
                    )
        finally:
            assoc.release()


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
) -> Sender:
    p = urlparse(url)
    if p.scheme in ("dicom", "dicom+tls"):
        if not p.username or not p.hostname or not p.port:
            raise ValueError(f"destination {url!r}: expected {p.scheme}://AET@host:port")
        if p.scheme == "dicom+tls":
            tls = tls or client_tls_context(None, None, None)
        else:
            tls = None
        return DicomSender(url, unquote(p.username), p.hostname, p.port, calling_ae, tls)
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
