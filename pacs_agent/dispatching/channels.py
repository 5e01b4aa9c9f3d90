"""Notification channels: where a triage flag goes, each a URL like a result destination.

  webhook+http(s)://[user:password@]host[:port]/path
        POST of a JSON document, HMAC-SHA256 signed (pacs_agent.webhook_auth): headers
        X-PACS-Agent-Timestamp and X-PACS-Agent-Signature, plus Idempotency-Key. 2xx: sent.
  mllp://host:port
        an HL7 v2.5.1 ORU^R01 over MLLP (python ``hl7``: framing and parsing); the ACK decides:
        MSA-1 AA or CA: sent; AE, AR, CE, CR, or no ACK within the timeout: a failed attempt.
  orthanc+http(s)://[user:password@]host:port
        the study flagged inside Orthanc: a label (AI-CRITICAL, AI-URGENT) where the server
        supports labels (Orthanc 1.12+, REST ApiVersion >= 20), else the user-defined metadata
        ``AITriage`` on the study (declared in Orthanc's "UserMetadata"; orthanc/orthanc.json).

Every message carries a stable idempotency key (the webhook's ``idempotency_key``, the HL7
message control id), so a receiver can drop the repeat that at-least-once sending can produce.
Credentials in a URL are used to connect and never logged or shown (``mask_url``, which is
pacs_agent.destinations.mask).
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import hl7
import httpx
from hl7.client import MLLPClient

from pacs_agent import __version__
from pacs_agent.destinations import check_url
from pacs_agent.destinations import mask as mask_url
from pacs_agent.webhook_auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

KINDS = ("webhook", "mllp", "orthanc")
IDEMPOTENCY_HEADER = "Idempotency-Key"
# Orthanc: user-defined metadata written where labels are not supported (declare it in Orthanc's
# "UserMetadata"), and the first REST API version with labels (Orthanc 1.12.0).
ORTHANC_METADATA = "AITriage"
ORTHANC_LABELS_API_VERSION = 20
# HL7 v2: who we are in MSH-3/MSH-4.
HL7_SENDING_APPLICATION = "PACS-AGENT"
HL7_VERSION = "2.5.1"
_MLLP_MAX_ACK = 1 << 20


class NotifyError(Exception):
    """A failed attempt; the message says why (never with credentials or patient data)."""


@dataclass
class Message:
    """What one notification says: the stored payload snapshot plus, read by the agent at send
    time, what the study's header tells (accession number, description; the patient id only for
    HL7, which goes to the RIS; the name only when PACS_AGENT_NOTIFY_PATIENT_NAME is set)."""

    notification_id: int
    idempotency_key: str
    study_instance_uid: str
    study_version: int
    level: str  # urgent | critical
    priority: str  # the class: stat | urgent | routine | offpeak
    findings: list[dict[str, Any]] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)
    random_weights: bool = False
    accession_number: str | None = None
    study_description: str | None = None
    study_datetime: str | None = None  # HL7 DTM (YYYYMMDD[HHMMSS])
    patient_id: str | None = None
    patient_id_issuer: str | None = None
    patient_name: str | None = None  # DICOM PN (family^given^...); None unless allowed

    @property
    def control_id(self) -> str:
        """The HL7 message control id (MSH-10): stable per notification, at most 20 characters."""
        return f"PACSAGENT{self.notification_id}"


class Channel(Protocol):
    url: str  # masked

    def send(self, message: Message) -> str:
        """Send once; return a short note on success, raise NotifyError on a failed attempt."""
        ...


# URLs -----------------------------------------------------------------------------------------


def channel_kind(url: str) -> str:
    """``webhook``, ``mllp`` or ``orthanc``; ValueError for anything else."""
    scheme = urlparse(url.strip()).scheme.lower()
    if scheme in ("webhook+http", "webhook+https"):
        return "webhook"
    if scheme == "mllp":
        return "mllp"
    if scheme in ("orthanc+http", "orthanc+https"):
        return "orthanc"
    raise ValueError(
        f"not a notification channel URL: {mask_url(url)!r} (webhook+http(s)://host/path, "
        "mllp://host:port, orthanc+http(s)://host:port)"
    )


def check_channel_url(url: str) -> str:
    """Validate a channel URL (scheme, host, port; pacs_agent.destinations.check_url); return it
    stripped. ValueError (DestinationError) if it is not a usable channel."""
    url = url.strip()
    check_url(url, "notify")
    channel_kind(url)
    return url


def _split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """The URL without user info, and (user, password) when it had some."""
    p = urlparse(url)
    if not p.username and not p.password:
        return url, None
    host = p.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{p.port}" if p.port else host
    auth = (unquote(p.username or ""), unquote(p.password or ""))
    return p._replace(netloc=netloc).geturl(), auth


def channel_for(
    url: str,
    *,
    secret: str,
    timeout_s: float = 10.0,
    include_patient_name: bool = False,
) -> Channel:
    """The channel object for a URL (see the module docstring for the forms)."""
    url = check_channel_url(url)
    kind = channel_kind(url)
    inner, auth = _split_credentials(url.split("+", 1)[1] if kind != "mllp" else url)
    if kind == "webhook":
        return WebhookChannel(
            mask_url(url),
            target=inner,
            auth=auth,
            secret=secret,
            timeout_s=timeout_s,
            include_patient_name=include_patient_name,
        )
    if kind == "orthanc":
        p = urlparse(inner)
        return OrthancChannel(
            mask_url(url),
            base=f"{p.scheme}://{p.netloc}{p.path.rstrip('/')}",
            auth=auth,
            timeout_s=timeout_s,
        )
    p = urlparse(url)
    assert p.hostname is not None and p.port is not None  # check_channel_url
    return MllpChannel(mask_url(url), host=p.hostname, port=p.port, timeout_s=timeout_s)


# Webhook --------------------------------------------------------------------------------------


def webhook_body(message: Message, *, include_patient_name: bool = False) -> dict[str, Any]:
    """The JSON document a webhook channel posts (documented in the README)."""
    body: dict[str, Any] = {
        "event": "triage",
        "idempotency_key": message.idempotency_key,
        "notification_id": message.notification_id,
        "study_instance_uid": message.study_instance_uid,
        "study_version": message.study_version,
        "accession_number": message.accession_number,
        "level": message.level,
        "priority": message.priority,
        "findings": [
            {
                "label": f.get("label"),
                "probability": f.get("probability"),
                "present": bool(f.get("present")),
            }
            for f in message.findings
        ],
        "links": dict(message.links),
        "random_weights": message.random_weights,
    }
    if include_patient_name and message.patient_name:
        body["patient_name"] = message.patient_name
    return body


@dataclass
class WebhookChannel:
    url: str
    target: str
    auth: tuple[str, str] | None
    secret: str
    timeout_s: float = 10.0
    include_patient_name: bool = False

    def send(self, message: Message) -> str:
        body = json.dumps(
            webhook_body(message, include_patient_name=self.include_patient_name),
            separators=(",", ":"),
        ).encode("utf-8")
        ts = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"pacs-agent/{__version__}",
            TIMESTAMP_HEADER: str(ts),
            SIGNATURE_HEADER: sign(self.secret, ts, body),
            IDEMPOTENCY_HEADER: message.idempotency_key,
        }
        try:
            r = httpx.post(
                self.target,
                content=body,
                headers=headers,
                auth=self.auth,
                timeout=self.timeout_s,
                follow_redirects=False,
            )
        except httpx.HTTPError as exc:
            raise NotifyError(f"webhook {self.url}: {type(exc).__name__}: {_no_url(exc)}") from None
        if not 200 <= r.status_code < 300:
            raise NotifyError(f"webhook {self.url} answered HTTP {r.status_code}")
        return f"HTTP {r.status_code}"


def _no_url(exc: Exception) -> str:
    """An httpx error's text; httpx puts no URL in connection errors, but be sure of it."""
    text = str(exc) or type(exc).__name__
    return text.split(" for url ", 1)[0][:300]


# HL7 v2 over MLLP -----------------------------------------------------------------------------

# A message whose only purpose is to give hl7's escape() the standard separators.
_SEPARATORS = hl7.parse("MSH|^~\\&|")


def hl7_escape(value: object) -> str:
    """A field value made safe: separators and the escape character become HL7 escape sequences
    (\\F\\, \\S\\, \\R\\, \\T\\, \\E\\), line breaks \\.br\\, non-ASCII \\Xhh\\."""
    if value is None:
        return ""
    text = str(value).replace("\r\n", "\r").replace("\n", "\r")
    return str(_SEPARATORS.escape(text))


def _hl7_name(pn: str | None) -> str:
    """A DICOM PN (family^given^middle^prefix^suffix) as an HL7 XPN, each part escaped."""
    if not pn:
        return ""
    alphabetic = pn.split("=", 1)[0]
    parts = alphabetic.split("^")[:5]
    # XPN: family^given^second^suffix^prefix
    order = [0, 1, 2, 4, 3]
    comps = [hl7_escape(parts[i]) if i < len(parts) else "" for i in order]
    return "^".join(comps).rstrip("^")


def _segment(name: str, fields: dict[int, str]) -> str:
    """One segment from {field number: already escaped value}; fields not given are empty."""
    last = max(fields) if fields else 0
    return "|".join([name, *(fields.get(i, "") for i in range(1, last + 1))])


def build_oru(
    message: Message,
    *,
    now: dt.datetime | None = None,
    receiving_application: str = "",
    receiving_facility: str = "",
) -> str:
    """The ORU^R01 for a notification (segments joined by CR, no MLLP framing).

    MSH (control id stable per notification), PID (patient id; name only when allowed), OBR
    (accession number as placer and filler order number, the study's description), NTE when the
    model has random weights, one OBX per finding (probability; OBX-8 ``A`` when present, ``N``
    when not), one OBX for the triage level (OBX-8 ``AA`` for critical, ``A`` for urgent), and
    the IHE ZDS segment with the Study Instance UID.
    """
    now = now or dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%d%H%M%S")
    e = hl7_escape
    pid3 = e(message.patient_id)
    if pid3 and message.patient_id_issuer:
        pid3 = f"{pid3}^^^{e(message.patient_id_issuer)}^PI"
    accession = e(message.accession_number)
    description = e(message.study_description) or "AI triage"
    # MSH-1 is the field separator itself: the fields below are numbered from MSH-2.
    msh = _segment(
        "MSH",
        {
            1: "^~\\&",
            2: HL7_SENDING_APPLICATION,
            4: e(receiving_application),
            5: e(receiving_facility),
            6: stamp,
            8: "ORU^R01^ORU_R01",
            9: message.control_id,
            10: "P",
            11: HL7_VERSION,
        },
    )
    segments = [
        msh,
        _segment("PID", {1: "1", 3: pid3, 5: _hl7_name(message.patient_name)}),
        _segment(
            "OBR",
            {
                1: "1",
                2: accession,
                3: accession,
                4: f"AI-TRIAGE^{description}^L",
                5: "S" if message.level == "critical" else "",
                7: e(message.study_datetime) or stamp,
                22: stamp,
                25: "F",
            },
        ),
    ]
    if message.random_weights:
        segments.append(
            _segment(
                "NTE",
                {1: "1", 2: "L", 3: "DEMO model with random weights: not a clinical result"},
            )
        )
    n = 0
    for f in message.findings:
        n += 1
        label = str(f.get("label", ""))
        probability = f.get("probability")
        segments.append(
            _segment(
                "OBX",
                {
                    1: str(n),
                    2: "NM",
                    3: f"{e(label.upper().replace(' ', '_'))}^{e(label)}^L",
                    5: "" if probability is None else f"{float(probability):.4f}",
                    6: "1^^UCUM",
                    8: "A" if f.get("present") else "N",
                    11: "F",
                    14: stamp,
                },
            )
        )
    segments.append(
        _segment(
            "OBX",
            {
                1: str(n + 1),
                2: "ST",
                3: "AI-TRIAGE^AI triage level^L",
                5: e(message.level),
                8: "AA" if message.level == "critical" else "A",
                11: "F",
                14: stamp,
            },
        )
    )
    # IHE Radiology: the Study Instance UID as a reference pointer in a ZDS segment.
    segments.append(
        _segment(
            "ZDS",
            {1: f"{e(message.study_instance_uid)}^{HL7_SENDING_APPLICATION}^Application^DICOM"},
        )
    )
    return "\r".join(segments)


class _TimedMLLPClient(MLLPClient):  # type: ignore[misc]
    """hl7's MLLP client with a connect and read timeout, reading the ACK to its end block
    (hl7's own client connects without a timeout and reads one recv())."""

    def __init__(self, host: str, port: int, timeout_s: float, encoding: str = "utf-8") -> None:
        self.socket = socket.create_connection((host, port), timeout=timeout_s)
        self.encoding = encoding

    def send(self, data: bytes) -> bytes:
        from hl7.client import EB

        self.socket.sendall(data)
        buf = b""
        deadline = time.monotonic() + (self.socket.gettimeout() or 10.0)
        while EB not in buf:
            if time.monotonic() > deadline:
                raise TimeoutError("ACK not complete in time")
            chunk = self.socket.recv(4096)
            if not chunk:
                raise NotifyError("MLLP peer closed the connection before a complete ACK")
            buf += chunk
            if len(buf) > _MLLP_MAX_ACK:
                raise NotifyError("MLLP ACK too large")
        return buf


def read_ack(raw: bytes, control_id: str) -> tuple[str, str]:
    """(MSA-1 code, MSA-3 text) of an MLLP-framed ACK; NotifyError when it is not one."""
    from hl7.client import CR, EB, SB

    text = raw.strip().strip(SB + EB + CR).decode("utf-8", errors="replace")
    try:
        ack = hl7.parse(text)
        msa = ack.segment("MSA")
    except Exception as exc:
        raise NotifyError(f"unreadable HL7 ACK ({type(exc).__name__})") from None
    code = str(msa(1)).strip().upper()
    about = str(msa(2)).strip() if len(msa) > 2 else ""
    note = str(msa(3)).strip() if len(msa) > 3 else ""
    if about and about != control_id:
        raise NotifyError(f"ACK for another message ({about!r}, expected {control_id!r})")
    return code, note


@dataclass
class MllpChannel:
    url: str
    host: str
    port: int
    timeout_s: float = 10.0

    def send(self, message: Message) -> str:
        text = build_oru(message)
        try:
            with _TimedMLLPClient(self.host, self.port, self.timeout_s) as client:
                raw = client.send_message(text)
        except TimeoutError:
            raise NotifyError(
                f"MLLP {self.url}: no connection or no ACK within {self.timeout_s:g} s"
            ) from None
        except OSError as exc:
            raise NotifyError(
                f"MLLP {self.url}: {type(exc).__name__}: {exc.strerror or exc}"
            ) from None
        code, note = read_ack(raw, message.control_id)
        if code in ("AA", "CA"):
            return f"ACK {code}"
        detail = f": {note}" if note else ""
        raise NotifyError(f"MLLP {self.url} answered ACK {code or '(none)'}{detail}"[:500])


# Orthanc --------------------------------------------------------------------------------------


def orthanc_supports_labels(system: dict[str, Any]) -> bool:
    """Whether an Orthanc (its GET /system answer) can label studies: 1.12+ (ApiVersion >= 20),
    and its database back-end says so where it reports ``HasLabels``."""
    if "HasLabels" in system:
        return bool(system["HasLabels"])
    try:
        return int(system.get("ApiVersion", 0)) >= ORTHANC_LABELS_API_VERSION
    except (TypeError, ValueError):
        return False


def orthanc_label(level: str) -> str:
    """AI-CRITICAL, AI-URGENT (Orthanc labels allow letters, digits, '-' and '_')."""
    return "AI-" + "".join(c for c in level.upper() if c.isalnum() or c in "-_")


@dataclass
class OrthancChannel:
    url: str
    base: str
    auth: tuple[str, str] | None
    timeout_s: float = 10.0

    def send(self, message: Message) -> str:
        try:
            with httpx.Client(base_url=self.base, auth=self.auth, timeout=self.timeout_s) as client:
                system = self._json(client.get("/system"), "GET /system")
                r = client.post("/tools/lookup", content=message.study_instance_uid)
                hits = self._json(r, "POST /tools/lookup")
                study_id = next(
                    (h.get("ID") for h in hits if isinstance(h, dict) and h.get("Type") == "Study"),
                    None,
                )
                if not study_id:
                    raise NotifyError(f"Orthanc {self.url}: study not found")
                if orthanc_supports_labels(system):
                    label = orthanc_label(message.level)
                    r = client.put(f"/studies/{study_id}/labels/{label}", content=b"")
                    self._ok(r, "PUT label")
                    return f"label {label}"
                r = client.put(
                    f"/studies/{study_id}/metadata/{ORTHANC_METADATA}",
                    content=message.level.encode(),
                    headers={"Content-Type": "text/plain"},
                )
                self._ok(r, f"PUT metadata {ORTHANC_METADATA} (declared in UserMetadata?)")
                return f"metadata {ORTHANC_METADATA}={message.level}"
        except httpx.HTTPError as exc:
            raise NotifyError(f"Orthanc {self.url}: {type(exc).__name__}: {_no_url(exc)}") from None

    def _ok(self, r: httpx.Response, what: str) -> None:
        if not 200 <= r.status_code < 300:
            raise NotifyError(f"Orthanc {self.url}: {what} answered HTTP {r.status_code}")

    def _json(self, r: httpx.Response, what: str) -> Any:
        self._ok(r, what)
        try:
            return r.json()
        except ValueError:
            raise NotifyError(f"Orthanc {self.url}: {what} did not answer JSON") from None
