"""Named destinations and notification channels: URL checks, credential masking, the test action.

A destination is a URL (see ``pacs_agent.dispatching.senders`` for the result kinds and
``pacs_agent.dispatching.notify`` for the notification channels). Credentials inside a URL
(``user:password@``, a token in the query) are never shown back: ``mask`` replaces them with
``***``, and ``unmask`` puts the stored value back when an edit sends the masked form again, but
only while the scheme, host and port stay the same (a secret is never carried to another host).

``test_url`` checks that a destination answers, with short timeouts and without sending data:
C-ECHO for DICOM, a QIDO-RS query for DICOMweb, ``GET /system`` for Orthanc, a write-and-delete
of a temporary file for a folder, a TCP connect for MLLP and webhooks (and the TLS handshake for
``webhook+https``; no fake notification is posted).
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import SplitResult, unquote, urlsplit

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_agent.settings import Settings

Purpose = Literal["destination", "notify"]
MASK = "***"

RESULT_SCHEMES = (
    "dicom",
    "dicom+tls",
    "dicomweb+http",
    "dicomweb+https",
    "orthanc+http",
    "orthanc+https",
    "file",
)
NOTIFY_SCHEMES = ("webhook+http", "webhook+https", "mllp", "orthanc+http", "orthanc+https")
SCHEMES: dict[str, tuple[str, ...]] = {"destination": RESULT_SCHEMES, "notify": NOTIFY_SCHEMES}

# Query parameters that carry a credential (compared case-insensitively).
SECRET_PARAMS = frozenset(
    {
        "token",
        "access_token",
        "auth",
        "auth_token",
        "authorization",
        "api_key",
        "apikey",
        "api-key",
        "key",
        "secret",
        "client_secret",
        "password",
        "passwd",
        "pwd",
        "sig",
        "signature",
        "code",
    }
)
_DICOM = ("dicom", "dicom+tls")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Names a rule uses for something else, or that settings entries carry.
RESERVED_NAMES = frozenset({"sender"})
SETTINGS_PREFIX = "settings:"


class DestinationError(ValueError):
    """A destination that cannot be saved: ``field`` and a reason that never quotes a secret."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


# --------------------------------------------------------------------------------------------
# parsing, masking


@dataclass(frozen=True)
class _Parts:
    scheme: str
    user: str | None  # raw (percent-encoded) as written
    password: str | None
    hostport: str
    path: str
    query: list[tuple[str, str | None]]  # raw key, raw value (None: no "=")
    fragment: str

    @classmethod
    def of(cls, url: str) -> _Parts:
        sp: SplitResult = urlsplit(url)
        userinfo, _, hostport = sp.netloc.rpartition("@")
        user: str | None = None
        password: str | None = None
        if _:
            u, colon, pw = userinfo.partition(":")
            user = u
            password = pw if colon else None
        query: list[tuple[str, str | None]] = []
        if sp.query:
            for part in sp.query.split("&"):
                k, eq, v = part.partition("=")
                query.append((k, v if eq else None))
        return cls(sp.scheme.lower(), user, password, hostport, sp.path, query, sp.fragment)

    def url(self) -> str:
        netloc = self.hostport
        if self.user is not None:
            cred = self.user if self.password is None else f"{self.user}:{self.password}"
            netloc = f"{cred}@{netloc}"
        out = f"{self.scheme}://{netloc}{self.path}"
        if self.query:
            out += "?" + "&".join(k if v is None else f"{k}={v}" for k, v in self.query)
        if self.fragment:
            out += "#" + self.fragment
        return out

    def with_(self, **changes: object) -> _Parts:
        return _Parts(**{**self.__dict__, **changes})  # type: ignore[arg-type]


def _secret_param(key: str) -> bool:
    return unquote(key).strip().lower() in SECRET_PARAMS


def _user_is_secret(p: _Parts) -> bool:
    """A user name alone is a credential for HTTP-like schemes (``https://TOKEN@host``); for
    ``dicom://`` it is the called AE title."""
    return p.scheme not in _DICOM and p.password is None and bool(p.user)


def mask(url: str) -> str:
    """The URL with every credential replaced by ``***`` (for the API, the console and logs)."""
    try:
        p = _Parts.of(url)
    except ValueError:
        return MASK
    if p.password:
        p = p.with_(password=MASK)
    elif _user_is_secret(p):
        p = p.with_(user=MASK)
    if any(v and _secret_param(k) for k, v in p.query):
        p = p.with_(query=[(k, MASK if v and _secret_param(k) else v) for k, v in p.query])
    return p.url()


def secrets_in(url: str) -> list[str]:
    """The credential strings inside a URL (raw and decoded), to scrub them from any text."""
    try:
        p = _Parts.of(url)
    except ValueError:
        return []
    out: list[str] = []
    if p.password:
        out.append(p.password)
    elif _user_is_secret(p) and p.user:
        out.append(p.user)
    out += [v for k, v in p.query if v and _secret_param(k)]
    return sorted({x for s in out for x in (s, unquote(s)) if x and x != MASK}, key=len)[::-1]


def scrub(text: str, url: str) -> str:
    """``text`` with the URL's credentials replaced by ``***`` (a belt to the braces of never
    putting a URL in a message; secrets under 3 characters are left, or every word would go)."""
    for secret in secrets_in(url):
        if len(secret) >= 3:
            text = text.replace(secret, MASK)
    return text


def unmask(new: str, stored: str | None) -> str:
    """``new`` with every ``***`` credential taken from ``stored``: what a PUT of the masked form
    means. Refused (DestinationError) when there is nothing stored to keep, or when the scheme,
    host or port changed (the secret would go to another peer)."""
    if MASK not in new:
        return new
    p = _Parts.of(new)
    old = _Parts.of(stored) if stored else None
    uses_mask = (
        p.password == MASK
        or p.user == MASK
        or any(v == MASK and _secret_param(k) for k, v in p.query)
    )
    if not uses_mask:
        return new
    if old is None:
        raise DestinationError("url", "'***' stands for a stored credential, and none is stored")
    if (p.scheme, p.hostport.lower()) != (old.scheme, old.hostport.lower()):
        raise DestinationError(
            "url", "the scheme, host or port changed: enter the credentials again"
        )
    if p.password == MASK:
        if not old.password:
            raise DestinationError("url", "'***' stands for a stored password, and none is stored")
        p = p.with_(password=old.password)
    if p.user == MASK:
        if not old.user or not _user_is_secret(old):
            raise DestinationError(
                "url", "'***' stands for a stored credential, and none is stored"
            )
        p = p.with_(user=old.user)
    stored_params = {unquote(k).lower(): v for k, v in old.query if v}
    query: list[tuple[str, str | None]] = []
    for k, v in p.query:
        if v == MASK and _secret_param(k):
            kept = stored_params.get(unquote(k).lower())
            if kept is None:
                raise DestinationError(
                    "url", f"'***' stands for a stored {unquote(k)!r} parameter, and none is stored"
                )
            v = kept
        query.append((k, v))
    return p.with_(query=query).url()


def identity(url: str) -> str:
    """What makes a destination one place: the URL without its credentials, everything else
    kept (scheme, AE title, host, port, path, the other query parameters). Deliveries are
    unique per (result, identity), so two AE titles on one host are two destinations, and the
    same peer reached with other credentials is the same one. Safe for logs and the database."""
    try:
        p = _Parts.of(url)
    except ValueError:
        return MASK
    if p.scheme in _DICOM:
        p = p.with_(password=None)  # the user part is the called AE title
    else:
        p = p.with_(user=None, password=None)  # HTTP basic user and password, or a token
    return p.with_(query=[(k, v) for k, v in p.query if not (v and _secret_param(k))]).url()


def reference(url: str) -> str:
    """What a job stores for a destination: the URL with each credential replaced by ``***``
    (``mask``). The secret stays where it was configured (the destinations table or
    PACS_AGENT_DESTINATIONS) and ``resolve_reference`` fetches it at delivery time."""
    masked = mask(url)
    return url if masked == url else masked


class CredentialsNotFound(LookupError):
    """A job's destination needs credentials that are no longer configured anywhere."""


def resolve_reference(ref: str, configured: Sequence[str]) -> str:
    """The URL to deliver to for a job's destination reference: the reference itself when it
    holds no masked credential, else the first ``configured`` URL whose reference it is
    (``configured``: the destinations table's URLs first, then the settings' ones). Raises
    CredentialsNotFound, with a message free of secrets, when none matches."""
    if MASK not in ref:
        return ref
    for url in configured:
        if reference(url) == ref:
            return url
    raise CredentialsNotFound(
        f"the credentials of {identity(ref)} are not configured any more (destinations table "
        "or PACS_AGENT_DESTINATIONS): enter them again, then retry the delivery"
    )


def configured_urls(session: Session, settings: Settings) -> list[str]:
    """Every result destination URL that holds credentials here: the destinations table's
    (enabled first), then PACS_AGENT_DESTINATIONS. Unmasked: for ``resolve_reference`` only."""
    from pacs_agent.db.models import Destination

    rows = session.scalars(
        select(Destination)
        .where(Destination.purpose == "destination")
        .order_by(Destination.enabled.desc(), Destination.id)
    ).all()
    return [r.url for r in rows] + [
        e.url for e in settings_entries(settings) if e.purpose == "destination"
    ]


# --------------------------------------------------------------------------------------------
# validation


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise DestinationError(
            "name",
            "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    if name.lower() in RESERVED_NAMES:
        raise DestinationError("name", f"{name!r} is reserved (a rule's 'sender' destination)")


def check_ae_title(ae: str) -> None:
    """DICOM AE title rules (PS3.5 AE VR): 1 to 16 characters of the default repertoire, no
    backslash or control characters, not only spaces."""
    if not ae.strip():
        raise DestinationError("url", "the AE title is empty (expected dicom://AET@host:port)")
    if len(ae) > 16:
        raise DestinationError("url", f"the AE title has {len(ae)} characters (at most 16)")
    if "\\" in ae or any(not (0x20 <= ord(c) < 0x7F) for c in ae):
        raise DestinationError(
            "url", "the AE title may hold printable ASCII only, without backslash"
        )


def check_url(url: str, purpose: str = "destination") -> None:
    """Raise DestinationError when ``url`` is not a usable destination for ``purpose``. The
    reason never quotes the URL (it may hold a credential)."""
    allowed = SCHEMES.get(purpose)
    if allowed is None:
        raise DestinationError("purpose", "expected 'destination' or 'notify'")
    if not url or any(c.isspace() for c in url.strip()) or url != url.strip():
        raise DestinationError("url", "a URL without spaces is required")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise DestinationError("url", "control characters are not allowed")
    try:
        sp = urlsplit(url)
        port = sp.port
        host = sp.hostname
    except ValueError as exc:
        raise DestinationError("url", f"not a valid URL ({_no_url(str(exc))})") from None
    scheme = sp.scheme.lower()
    if scheme not in allowed:
        other = "notify" if purpose == "destination" else "destination"
        if scheme in SCHEMES[other]:
            raise DestinationError(
                "url",
                f"{scheme}:// is a {other} scheme; a {purpose} uses one of: "
                + ", ".join(f"{s}://" for s in allowed),
            )
        raise DestinationError(
            "url",
            f"unknown scheme {scheme + '://' if scheme else '(none)'}; expected one of: "
            + ", ".join(f"{s}://" for s in allowed),
        )
    if scheme == "file":
        if sp.netloc not in ("", "localhost"):
            raise DestinationError("url", "a folder is file:///absolute/path (no host)")
        if not sp.path.startswith("/") or sp.path == "/":
            raise DestinationError("url", "a folder is file:///absolute/path")
        if sp.query or sp.fragment:
            raise DestinationError("url", "a folder URL has no query or fragment")
        return
    if not host:
        raise DestinationError("url", f"{scheme}:// needs a host")
    if scheme in _DICOM:
        if sp.password is not None:
            raise DestinationError(
                "url", "a DICOM destination has no password (dicom://AET@host:port)"
            )
        if sp.username is None:
            raise DestinationError(
                "url", f"the called AE title is missing ({scheme}://AET@host:port)"
            )
        check_ae_title(unquote(sp.username))
        if port is None:
            raise DestinationError("url", f"the port is missing ({scheme}://AET@host:port)")
    if scheme == "mllp" and port is None:
        raise DestinationError("url", "the port is missing (mllp://host:port)")
    if port is not None and not 0 < port < 65536:
        raise DestinationError("url", "the port must be 1 to 65535")


def _no_url(text: str) -> str:
    return re.sub(r"\S+://\S+", "<url>", text)


# --------------------------------------------------------------------------------------------
# entries from settings (read-only defaults)


@dataclass(frozen=True)
class SettingsEntry:
    name: str
    url: str  # unmasked: mask before showing
    purpose: Purpose


def settings_entries(settings: Settings) -> list[SettingsEntry]:
    """PACS_AGENT_DESTINATIONS (and the output folder) and PACS_AGENT_NOTIFY, the defaults used
    when no rule names any, as read-only entries named ``settings:...``."""
    out: list[SettingsEntry] = []
    urls = [d.strip() for d in settings.destinations.split(",") if d.strip()]
    for i, url in enumerate(urls, 1):
        out.append(SettingsEntry(f"{SETTINGS_PREFIX}destinations:{i}", url, "destination"))
    if settings.output_dir is not None:
        url = settings.output_dir.expanduser().resolve().as_uri()
        out.append(SettingsEntry(f"{SETTINGS_PREFIX}output_dir", url, "destination"))
    for i, url in enumerate(settings.notify_urls, 1):
        out.append(SettingsEntry(f"{SETTINGS_PREFIX}notify:{i}", url, "notify"))
    return out


# --------------------------------------------------------------------------------------------
# the test action


@dataclass(frozen=True)
class TestOutcome:
    ok: bool
    detail: str
    elapsed_ms: int


def test_url(url: str, settings: Settings, timeout_s: float = 5.0) -> TestOutcome:
    """Whether the destination at ``url`` answers. Never raises; the detail is free of secrets."""
    started = time.monotonic()
    try:
        ok, detail = _probe(url, settings, timeout_s)
    except Exception as exc:  # any failure is an answer: not reachable, and why
        ok, detail = False, f"{type(exc).__name__}: {_no_url(str(exc))}"
    elapsed = int(round((time.monotonic() - started) * 1000))
    return TestOutcome(ok, scrub(detail, url), elapsed)


# Not a test for pytest to collect, despite the name.
test_url.__test__ = False  # type: ignore[attr-defined]
TestOutcome.__test__ = False  # type: ignore[attr-defined]


def _probe(url: str, settings: Settings, timeout_s: float) -> tuple[bool, str]:
    sp = urlsplit(url)
    scheme = sp.scheme.lower()
    host = sp.hostname or ""
    if scheme in _DICOM:
        return _echo(sp, settings, timeout_s)
    if scheme == "file":
        return _write_check(Path(unquote(sp.path)))
    if scheme in ("dicomweb+http", "dicomweb+https", "orthanc+http", "orthanc+https"):
        return _http_probe(sp, settings, timeout_s)
    if scheme == "mllp":
        return _connect(host, sp.port or 0, timeout_s, tls=False)
    if scheme in ("webhook+http", "webhook+https"):
        tls = scheme == "webhook+https"
        return _connect(host, sp.port or (443 if tls else 80), timeout_s, tls=tls)
    return False, f"no test for {scheme}://"


def _echo(sp: SplitResult, settings: Settings, timeout_s: float) -> tuple[bool, str]:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from pacs_agent.dispatching.senders import client_tls_context

    called = unquote(sp.username or "")
    host, port = sp.hostname or "", sp.port or 0
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.add_requested_context(Verification)
    tls_args = None
    if sp.scheme.lower() == "dicom+tls":
        ctx = client_tls_context(
            settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file
        )
        tls_args = (ctx, host)
    where = f"{called}@{host}:{port}"
    reachable, why = _connect(host, port, timeout_s, tls=False)  # a clear reason when it is not
    if not reachable:
        return False, f"no association with {where}: {why}"
    assoc = ae.associate(host, port, ae_title=called, tls_args=tls_args)
    try:
        if assoc.is_rejected:
            return False, f"association rejected by {where} (is the called AE title right?)"
        if assoc.is_aborted:
            return False, f"association aborted by {where}"
        if not assoc.is_established:
            return False, f"no association with {where}: connection refused or timed out"
        status = assoc.send_c_echo()
        code = getattr(status, "Status", None)
        if code is None:
            return False, f"no C-ECHO response from {where} within {timeout_s:g} s"
        if int(code) != 0:
            return False, f"C-ECHO answered 0x{int(code):04X} by {where}"
        return True, f"C-ECHO answered Success by {where}"
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def _http_probe(sp: SplitResult, settings: Settings, timeout_s: float) -> tuple[bool, str]:
    scheme = sp.scheme.lower()
    kind, proto = scheme.split("+", 1)
    host = sp.hostname or ""
    netloc = f"{host}:{sp.port}" if sp.port else host
    if ":" in host:  # IPv6 literal
        netloc = f"[{host}]:{sp.port}" if sp.port else f"[{host}]"
    base = f"{proto}://{netloc}{sp.path}".rstrip("/")
    headers = {"Accept": "application/json"}
    auth: tuple[str, str] | None = None
    if sp.username:  # basic auth, as the senders use it (a lone user is a token)
        auth = (unquote(sp.username), unquote(sp.password or ""))
    if kind == "dicomweb":
        target, params = f"{base}/studies", {"limit": "1"}
        headers["Accept"] = "application/dicom+json"
        if auth is None and settings.dicomweb_token:
            headers["Authorization"] = f"Bearer {settings.dicomweb_token}"
        what = "QIDO-RS GET /studies?limit=1"
    else:
        target, params, what = f"{base}/system", {}, "GET /system"
    try:
        r = httpx.get(
            target,
            params=params,
            headers=headers,
            auth=auth,
            timeout=timeout_s,
            follow_redirects=False,
        )
    except httpx.TimeoutException:
        return False, f"{what}: no answer from {netloc} within {timeout_s:g} s"
    except httpx.HTTPError as exc:
        return False, f"{what}: cannot reach {netloc} ({type(exc).__name__}: {_no_url(str(exc))})"
    if r.status_code in (401, 403):
        return False, f"{what} answered {r.status_code}: credentials refused"
    if kind == "dicomweb":
        if r.status_code in (200, 204):
            return True, f"{what} answered {r.status_code}"
        return False, f"{what} answered {r.status_code}"
    if r.status_code != 200:
        return False, f"{what} answered {r.status_code}"
    try:
        body = r.json()
    except ValueError:
        return False, f"{what} answered 200 but not with JSON (is this Orthanc?)"
    if not isinstance(body, dict) or "Version" not in body:
        return False, f"{what} answered 200 without a Version (is this Orthanc?)"
    return True, f"Orthanc {body.get('Version')} answered {what}"


def _write_check(root: Path) -> tuple[bool, str]:
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)  # as the first delivery would
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".pacs-agent-test-")
    except OSError as exc:
        return False, f"cannot write in {root}: {exc.strerror or type(exc).__name__}"
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"pacs-agent write check\n")
            f.flush()
            os.fsync(f.fileno())
    finally:
        os.unlink(tmp)
    return True, f"wrote and removed a test file in {root}" + (
        " (folder created)" if created else ""
    )


def _connect(host: str, port: int, timeout_s: float, *, tls: bool) -> tuple[bool, str]:
    where = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            if not tls:
                return True, f"TCP connection to {where} accepted"
            ctx = ssl.create_default_context()
            with ctx.wrap_socket(sock, server_hostname=host):
                return True, f"TLS connection to {where} established (certificate verified)"
    except TimeoutError:
        return False, f"no answer from {where} within {timeout_s:g} s"
    except ssl.SSLError as exc:
        return False, f"TLS handshake with {where} failed: {exc.reason or type(exc).__name__}"
    except OSError as exc:
        return False, f"cannot connect to {where}: {exc.strerror or type(exc).__name__}"
