"""pacs-agent plugin for Orthanc's embedded Python (orthanc-python >= 3.1).

When a study becomes stable (no new instance for ``StableAge`` seconds), tell the pacs-agent by
POSTing a signed JSON webhook. The agent then pulls the study from Orthanc over REST.

Standard library only (plus the ``orthanc`` module that exists only inside Orthanc). Everything
that does not need Orthanc -- configuration, payload, signature, the decision whether a study is
new work -- is a plain function, importable and testable without Orthanc.

Webhook contract (the agent's receiver must match it)::

    POST <WebhookUrl>                          default http://agent:8000/webhook/orthanc
    Content-Type: application/json
    X-PACS-Agent-Timestamp: <int epoch seconds>
    X-PACS-Agent-Signature: sha256=<hex HMAC-SHA256(secret, b"<timestamp>." + body)>

    {"event": "StableStudy", "orthanc_study_id": "...", "study_instance_uid": "...",
     "timestamp": <same int>}

The body is compact JSON with sorted keys; the receiver must verify the signature over the raw
bytes it received, not over a re-serialisation. Each retry is signed afresh with a new timestamp.

Skipping the agent's own results: results go back into the *same* study (same Study Instance
UID), so the study becomes stable again after they arrive. A study is new work only when its set
of instances *not produced by the agent* differs from the set already notified:

- a series is the agent's when the RemoteAET metadata of its first instance is one of
  ``IgnoreAeTitles`` (results delivered by C-STORE from AE "PACSAGENT"), or when its Manufacturer
  is one of ``IgnoreManufacturers`` (results delivered by REST or STOW-RS, which carry no calling
  AE). The agent writes every result in a series of its own, so one instance per series decides.
- the notified set is remembered as a fingerprint in the study's user metadata
  ``PacsAgentNotified`` (declared in orthanc.json "UserMetadata"), so it survives restarts; if
  the metadata cannot be written it is kept in memory.

So a study that holds only agent output is never sent, results added to an analysed study are
not sent again, and new images from a modality in an analysed study are sent.

Nothing dropped after the last attempt: a notification that failed its ``MaxAttempts`` is kept
pending, persisted in Orthanc's global property ``PendingGlobalProperty`` (its database; or the
JSON file ``PendingFile``), and tried again once per round with backoff (``PendingBackoffSeconds``
doubling up to ``PendingMaxBackoffSeconds``) until it is delivered or older than
``PendingMaxAgeSeconds`` (default 7 days; then an error is logged). After an Orthanc restart the
kept notifications are tried at once. ``GET /pacs-agent/pending`` lists them (Orthanc ids,
times, rounds, last error). The agent also reads Orthanc's ``/changes`` as a backstop.

Admin re-send: ``POST /pacs-agent/studies/<orthanc study id>/notify`` queues a notification
regardless of the fingerprint.

Logs carry Orthanc ids and UIDs only, never patient data.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import queue
import threading
import time
import urllib.error
import urllib.request

try:  # Only inside Orthanc. Outside, "orthanc" may even resolve to this folder (a namespace pkg).
    import orthanc  # type: ignore[import-not-found]

    if not hasattr(orthanc, "RegisterOnChangeCallback"):
        orthanc = None
except ImportError:  # pragma: no cover - depends on the interpreter
    orthanc = None

PLUGIN_VERSION = "1"
EVENT_STABLE_STUDY = "StableStudy"
SIGNATURE_PREFIX = "sha256="
HEADER_TIMESTAMP = "X-PACS-Agent-Timestamp"
HEADER_SIGNATURE = "X-PACS-Agent-Signature"
NOTIFIED_METADATA = "PacsAgentNotified"

DEFAULTS = {
    "Enabled": True,
    "WebhookUrl": "http://agent:8000/webhook/orthanc",
    "WebhookSecretEnv": "PACS_AGENT_WEBHOOK_SECRET",
    "IgnoreAeTitles": ["PACSAGENT"],
    "IgnoreManufacturers": ["pacs-agent"],
    "TimeoutSeconds": 10.0,
    "MaxAttempts": 5,
    "BackoffSeconds": 1.0,
    "MaxBackoffSeconds": 30.0,
    # After MaxAttempts the notification is kept (persisted) and tried again, one attempt per
    # round, with backoff from PendingBackoffSeconds up to PendingMaxBackoffSeconds, until it
    # is delivered or older than PendingMaxAgeSeconds. Kept in Orthanc's global property
    # PendingGlobalProperty (its database), or in PendingFile when set.
    "PendingBackoffSeconds": 30.0,
    "PendingMaxBackoffSeconds": 1800.0,
    "PendingMaxAgeSeconds": 7 * 24 * 3600.0,
    "PendingGlobalProperty": 5471,
    "PendingFile": None,
}


# --------------------------------------------------------------------------------------------
# Pure functions (no Orthanc needed)
# --------------------------------------------------------------------------------------------


def load_config(orthanc_config, environ=None):
    """Merge defaults, the "PacsAgent" section of the Orthanc configuration and the environment.

    ``orthanc_config`` is the whole Orthanc configuration (dict or JSON text). Environment:
    ``PACS_AGENT_WEBHOOK_URL`` overrides the URL; the secret is read from the variable named by
    ``WebhookSecretEnv`` (default ``PACS_AGENT_WEBHOOK_SECRET``) and wins over a ``WebhookSecret``
    written in the file (which is discouraged). Returns a plain dict with a "WebhookSecret" key
    (None when unset).
    """
    if environ is None:
        environ = os.environ
    if isinstance(orthanc_config, (str, bytes)):
        orthanc_config = json.loads(orthanc_config) if orthanc_config else {}
    section = (orthanc_config or {}).get("PacsAgent") or {}
    if not isinstance(section, dict):
        raise ValueError('"PacsAgent" in the Orthanc configuration must be an object')

    cfg = dict(DEFAULTS)
    cfg.update(section)
    cfg.setdefault("WebhookSecret", None)

    env_url = environ.get("PACS_AGENT_WEBHOOK_URL")
    if env_url:
        cfg["WebhookUrl"] = env_url
    secret_env = cfg.get("WebhookSecretEnv") or "PACS_AGENT_WEBHOOK_SECRET"
    env_secret = environ.get(secret_env)
    if env_secret:
        cfg["WebhookSecret"] = env_secret
    if not cfg.get("WebhookSecret"):
        cfg["WebhookSecret"] = None

    cfg["IgnoreAeTitles"] = [str(a).strip().upper() for a in cfg.get("IgnoreAeTitles") or []]
    cfg["IgnoreManufacturers"] = [
        str(m).strip().lower() for m in cfg.get("IgnoreManufacturers") or []
    ]
    cfg["Enabled"] = bool(cfg.get("Enabled", True)) and bool(cfg.get("WebhookUrl"))
    for key in (
        "TimeoutSeconds",
        "BackoffSeconds",
        "MaxBackoffSeconds",
        "PendingBackoffSeconds",
        "PendingMaxBackoffSeconds",
        "PendingMaxAgeSeconds",
    ):
        cfg[key] = float(cfg[key])
    cfg["MaxAttempts"] = max(1, int(cfg["MaxAttempts"]))
    cfg["PendingGlobalProperty"] = int(cfg["PendingGlobalProperty"])
    if cfg["PendingGlobalProperty"] < 1024:
        raise ValueError("PacsAgent.PendingGlobalProperty must be >= 1024 (plugin range)")
    return cfg


def redacted(cfg):
    """The configuration as it may be logged (no secret)."""
    out = dict(cfg)
    out["WebhookSecret"] = "<set>" if cfg.get("WebhookSecret") else "<unset>"
    return out


def build_payload(orthanc_study_id, study_instance_uid, timestamp):
    return {
        "event": EVENT_STABLE_STUDY,
        "orthanc_study_id": str(orthanc_study_id),
        "study_instance_uid": str(study_instance_uid),
        "timestamp": int(timestamp),
    }


def encode_body(payload):
    """Canonical bytes of a payload: compact JSON, sorted keys, UTF-8."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8")


def _key(secret):
    return secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)


def sign(secret, timestamp, body):
    """``sha256=<hex HMAC-SHA256(secret, b"<timestamp>." + body)>``."""
    message = f"{int(timestamp)}.".encode("ascii") + body
    return SIGNATURE_PREFIX + hmac.new(_key(secret), message, hashlib.sha256).hexdigest()


def build_request(secret, orthanc_study_id, study_instance_uid, timestamp):
    """Return (body bytes, headers) of one signed webhook call."""
    timestamp = int(timestamp)
    body = encode_body(build_payload(orthanc_study_id, study_instance_uid, timestamp))
    headers = {
        "Content-Type": "application/json",
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_SIGNATURE: sign(secret, timestamp, body),
        "User-Agent": "pacs-agent-orthanc-plugin/" + PLUGIN_VERSION,
    }
    return body, headers


def verify_signature(secret, timestamp_header, body, signature_header, now=None, max_skew_s=300):
    """Receiver-side check (reference implementation for the agent and the tests)."""
    if not secret or not timestamp_header or not signature_header:
        return False
    try:
        timestamp = int(str(timestamp_header).strip())
    except ValueError:
        return False
    if now is None:
        now = time.time()
    if abs(now - timestamp) > max_skew_s:
        return False
    expected = sign(secret, timestamp, body)
    return hmac.compare_digest(expected, str(signature_header).strip())


def is_agent_series(remote_aet, manufacturer, cfg):
    """Whether a series was produced by the agent (see the module docstring)."""
    if remote_aet and remote_aet.strip().upper() in cfg["IgnoreAeTitles"]:
        return True
    if manufacturer and manufacturer.strip().lower() in cfg["IgnoreManufacturers"]:
        return True
    return False


def fingerprint(instance_ids):
    """Order-independent fingerprint of a set of Orthanc instance ids ("" for an empty set)."""
    ids = sorted(set(instance_ids))
    if not ids:
        return ""
    return hashlib.sha256("\n".join(ids).encode("ascii")).hexdigest()[:32]


def decide(foreign_instance_ids, previous_fingerprint, force=False):
    """Return (notify?, reason, new fingerprint) for a stable study.

    ``foreign_instance_ids``: instances not produced by the agent.
    """
    fp = fingerprint(foreign_instance_ids)
    if not fp:
        return False, "only the agent's own results", fp
    if force:
        return True, "forced", fp
    if previous_fingerprint and previous_fingerprint == fp:
        return False, "no new instances besides the agent's results", fp
    return True, "new instances", fp


def is_retryable_status(status):
    return status == 429 or status >= 500


def backoff_delay(attempt, base, cap):
    """Delay after failed attempt number ``attempt`` (1-based): base, 2*base, 4*base ... <= cap."""
    return min(cap, base * (2 ** (attempt - 1)))


def deliver(send, build, max_attempts, base_backoff, max_backoff, sleep):
    """Call ``send(*build())`` until it succeeds, retrying connection errors, 429 and 5xx.

    ``build()`` returns (body, headers) and is called per attempt so each try is signed with a
    fresh timestamp. ``send`` returns an HTTP status or raises OSError (URLError, timeouts).
    ``sleep(seconds)`` returns False to abandon (shutdown). Returns (ok, attempts, last error).
    """
    last = None
    for attempt in range(1, max_attempts + 1):
        body, headers = build()
        try:
            status = send(body, headers)
        except OSError as exc:  # connection refused, reset, DNS, timeout
            last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        else:
            if 200 <= status < 300:
                return True, attempt, None
            last = f"HTTP {status}"
            if not is_retryable_status(status):
                return False, attempt, last
        if attempt < max_attempts:
            if sleep(backoff_delay(attempt, base_backoff, max_backoff)) is False:
                return False, attempt, last + " (abandoned at shutdown)"
    return False, max_attempts, last


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def http_post(url, body, headers, timeout):
    """POST and return the HTTP status; raises OSError when no response came back."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            response.read(65536)
            return response.status
    except urllib.error.HTTPError as exc:
        try:
            exc.read(65536)
        finally:
            exc.close()
        return exc.code


class MemoryStore:
    """Pending notifications in memory (tests; the plugin persists them)."""

    def __init__(self, data=None):
        self.data = dict(data or {})

    def load(self):
        return dict(self.data)

    def save(self, pending):
        self.data = dict(pending)


class FileStore:
    """Pending notifications in a JSON file, replaced atomically (write, fsync, rename)."""

    def __init__(self, path):
        self.path = path

    def load(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}

    def save(self, pending):
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(pending, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class GlobalPropertyStore:
    """Pending notifications in one of Orthanc's global properties (kept in its database, so
    an Orthanc restart does not drop them). ``get(prop, default)`` / ``put(prop, value)``."""

    def __init__(self, get, put, prop):
        self.get, self.put, self.prop = get, put, prop

    def load(self):
        text = self.get(self.prop, "") or ""
        try:
            data = json.loads(text) if text else {}
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def save(self, pending):
        self.put(self.prop, json.dumps(pending, sort_keys=True))


def keep_pending(pending, study_id, force, error, now, cfg):
    """Record one more failed round for ``study_id``; returns (kept?, delay or age).

    A study first failed longer ago than PendingMaxAgeSeconds is dropped (kept? False)."""
    entry = dict(pending.get(study_id) or {"since": now, "rounds": 0, "force": False})
    entry["rounds"] = int(entry.get("rounds", 0)) + 1
    entry["force"] = bool(entry.get("force")) or bool(force)
    entry["error"] = error
    age = now - float(entry.get("since", now))
    if age > cfg["PendingMaxAgeSeconds"]:
        pending.pop(study_id, None)
        return False, age
    delay = backoff_delay(
        entry["rounds"], cfg["PendingBackoffSeconds"], cfg["PendingMaxBackoffSeconds"]
    )
    entry["next"] = now + delay
    pending[study_id] = entry
    return True, delay


def due_pending(pending, now):
    """Study ids whose next try is due, oldest first."""
    due = [(float(e.get("next", 0)), sid) for sid, e in pending.items() if e.get("next", 0) <= now]
    return [sid for _, sid in sorted(due)]


# --------------------------------------------------------------------------------------------
# Glue to Orthanc
# --------------------------------------------------------------------------------------------


class Notifier:
    """Receives stable-study events on Orthanc's thread; inspects and POSTs on its own thread."""

    def __init__(
        self, cfg, api, log_warning, log_error, post=http_post, store=None, clock=time.time
    ):
        self.cfg = cfg
        self.api = api  # object with get_json(uri) and put_metadata(study_id, name, value)
        self.log_warning = log_warning
        self.log_error = log_error
        self.post = post
        self.store = store if store is not None else MemoryStore()
        self.clock = clock
        self._queue = queue.Queue()
        self._pending = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._memory_fingerprints = {}
        # Notifications that failed every attempt: persisted, retried until delivered or old.
        # Orthanc's database is not open yet while the plugin initialises: the worker thread
        # loads them (again) before it notifies anything.
        self.kept = {}
        self.loaded = False
        self.load_kept(quiet=True)
        self._thread = threading.Thread(target=self._run, name="pacs-agent-webhook", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self, timeout=2.0):
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, study_id, force=False):
        with self._lock:
            if study_id in self._pending and not force:
                return
            self._pending.add(study_id)
        self._queue.put((study_id, force))

    def load_kept(self, quiet=False):
        """Read the kept notifications (due at once: e.g. after a restart). False if the store
        cannot be read yet."""
        try:
            data = self.store.load()
        except Exception as exc:
            if not quiet:
                self.log_warning(f"pacs-agent: pending notifications not readable yet: {exc}")
            return False
        now = self.clock()
        for entry in data.values():
            entry["next"] = now
        data.update(self.kept)
        self.kept, self.loaded = data, True
        if data:
            self.log_warning(f"pacs-agent: {len(data)} pending notification(s) to send")
        return True

    def _run(self):
        warned = False
        while not self.loaded and not self._stop.is_set():
            if self.load_kept(quiet=warned):
                break
            warned = True
            self._stop.wait(0.5)
        poll = max(0.1, min(5.0, self.cfg["PendingBackoffSeconds"] / 2))
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=poll)
            except queue.Empty:
                item = ()
            if item is None:
                break
            if item:
                study_id, force = item
                with self._lock:
                    self._pending.discard(study_id)
                self._safely(study_id, force, None)
            self.retry_pending()

    def _safely(self, study_id, force, attempts):
        try:
            return self.process(study_id, force, attempts)
        except Exception as exc:  # never let the worker die
            self.log_error(
                f"pacs-agent: study {study_id} not notified: {type(exc).__name__}: {exc}"
            )
            return False

    def retry_pending(self):
        """One attempt for each kept notification that is due. Returns how many were tried."""
        due = due_pending(self.kept, self.clock())
        for study_id in due:
            if self._stop.is_set():
                break
            entry = self.kept.get(study_id) or {}
            self._safely(study_id, bool(entry.get("force")), 1)
        return len(due)

    def _save(self):
        if not self.loaded:  # never overwrite a list not read yet
            return
        try:
            self.store.save(self.kept)
        except Exception as exc:
            self.log_error(f"pacs-agent: pending notifications not saved: {exc}")

    def _keep(self, study_id, uid, force, error):
        kept, value = keep_pending(self.kept, study_id, force, error, self.clock(), self.cfg)
        self._save()
        if kept:
            self.log_warning(
                f"pacs-agent: webhook for study {study_id} (StudyInstanceUID {uid}) kept "
                f"pending ({error}); next try in {value:.0f} s"
            )
        else:
            self.log_error(
                f"pacs-agent: webhook for study {study_id} (StudyInstanceUID {uid}) dropped "
                f"after {value:.0f} s pending ({error}); re-send with POST "
                f"/pacs-agent/studies/{study_id}/notify"
            )

    def _forget(self, study_id):
        if self.kept.pop(study_id, None) is not None:
            self._save()

    def _sleep(self, seconds):
        return not self._stop.wait(seconds)

    def foreign_instances(self, study_id):
        """Orthanc ids of the study's instances that the agent did not produce."""
        series_list = self.api.get_json(f"/studies/{study_id}/series")
        foreign = []
        for series in series_list:
            instances = series.get("Instances") or []
            if not instances:
                continue
            manufacturer = (series.get("MainDicomTags") or {}).get("Manufacturer", "")
            metadata = self.api.get_json(f"/instances/{instances[0]}/metadata?expand")
            remote_aet = metadata.get("RemoteAET", "") if isinstance(metadata, dict) else ""
            if not is_agent_series(remote_aet, manufacturer, self.cfg):
                foreign.extend(instances)
        return foreign

    def _previous_fingerprint(self, study_id):
        try:
            value = self.api.get_text(f"/studies/{study_id}/metadata/{NOTIFIED_METADATA}")
        except Exception:  # 404 until the study was first notified
            value = None
        return value or self._memory_fingerprints.get(study_id, "")

    def _remember(self, study_id, fp):
        self._memory_fingerprints[study_id] = fp
        try:
            self.api.put_metadata(study_id, NOTIFIED_METADATA, fp)
        except Exception as exc:
            self.log_warning(
                f"pacs-agent: cannot store {NOTIFIED_METADATA} metadata on study {study_id} "
                f'({exc}); kept in memory only. Declare it in "UserMetadata".'
            )

    def process(self, study_id, force=False, attempts=None):
        """Notify the agent of a stable study if it is new work. ``attempts``: tries now (default
        MaxAttempts). A delivery that fails is kept pending (persisted) and tried again."""
        try:
            study = self.api.get_json(f"/studies/{study_id}")
        except Exception:
            if study_id in self.kept:  # deleted from Orthanc meanwhile: nothing to notify
                self._forget(study_id)
            raise
        uid = (study.get("MainDicomTags") or {}).get("StudyInstanceUID", "")
        notify, reason, fp = decide(
            self.foreign_instances(study_id), self._previous_fingerprint(study_id), force
        )
        if not notify:
            self.log_warning(
                f"pacs-agent: stable study {study_id} (StudyInstanceUID {uid}) skipped: {reason}"
            )
            self._forget(study_id)
            return False
        secret = self.cfg.get("WebhookSecret")
        if not secret:
            self.log_error(
                f"pacs-agent: study {study_id} (StudyInstanceUID {uid}) not notified: no webhook "
                f"secret; set the environment variable {self.cfg['WebhookSecretEnv']}"
            )
            self._keep(study_id, uid, force, "no webhook secret")
            return False
        url = self.cfg["WebhookUrl"]
        ok, used, error = deliver(
            send=lambda body, headers: self.post(url, body, headers, self.cfg["TimeoutSeconds"]),
            build=lambda: build_request(secret, study_id, uid, time.time()),
            max_attempts=attempts or self.cfg["MaxAttempts"],
            base_backoff=self.cfg["BackoffSeconds"],
            max_backoff=self.cfg["MaxBackoffSeconds"],
            sleep=self._sleep,
        )
        if ok:
            self._remember(study_id, fp)
            was_kept = study_id in self.kept
            self._forget(study_id)
            self.log_warning(
                f"pacs-agent: notified study {study_id} (StudyInstanceUID {uid}, {reason}) "
                f"after {used} attempt(s)" + (" from the pending list" if was_kept else "")
            )
        else:
            self.log_error(
                f"pacs-agent: webhook for study {study_id} (StudyInstanceUID {uid}) failed after "
                f"{used} attempt(s): {error}"
            )
            if "abandoned at shutdown" in (error or ""):
                error = error.replace(" (abandoned at shutdown)", "")
            self._keep(study_id, uid, force, error)
        return ok


class _OrthancApi:
    def get_json(self, uri):
        return json.loads(orthanc.RestApiGet(uri))

    def get_text(self, uri):
        value = orthanc.RestApiGet(uri)
        return value.decode("utf-8") if isinstance(value, bytes) else value

    def put_metadata(self, study_id, name, value):
        orthanc.RestApiPut(f"/studies/{study_id}/metadata/{name}", value)


_notifier = None


def _on_change(change_type, level, resource_id):
    if change_type == orthanc.ChangeType.STABLE_STUDY:
        if _notifier is not None:
            _notifier.submit(resource_id)
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        if _notifier is not None:
            _notifier.stop()


def _on_notify_rest(output, uri, **request):
    if request.get("method") != "POST":
        output.SendMethodNotAllowed("POST")
        return
    study_id = request["groups"][0]
    if _notifier is None:
        output.AnswerBuffer(json.dumps({"queued": False, "reason": "disabled"}), "application/json")
        return
    try:
        orthanc.RestApiGet(f"/studies/{study_id}")
    except Exception:
        output.SendHttpStatusCode(404)
        return
    _notifier.submit(study_id, force=True)
    output.AnswerBuffer(json.dumps({"queued": True, "study": study_id}), "application/json")


def _on_pending_rest(output, uri, **request):
    if request.get("method") != "GET":
        output.SendMethodNotAllowed("GET")
        return
    kept = dict(_notifier.kept) if _notifier is not None else {}
    output.AnswerBuffer(json.dumps(kept, sort_keys=True), "application/json")


def _store(cfg):
    if cfg.get("PendingFile"):
        return FileStore(cfg["PendingFile"])
    return GlobalPropertyStore(
        orthanc.GetGlobalProperty, orthanc.SetGlobalProperty, cfg["PendingGlobalProperty"]
    )


def _install():
    global _notifier
    cfg = load_config(orthanc.GetConfiguration())
    orthanc.LogWarning(f"pacs-agent plugin {PLUGIN_VERSION} loaded: {json.dumps(redacted(cfg))}")
    if not cfg["Enabled"]:
        orthanc.LogWarning("pacs-agent: webhook disabled by configuration")
        return
    if not cfg["WebhookSecret"]:
        orthanc.LogError(
            f"pacs-agent: no webhook secret (environment variable {cfg['WebhookSecretEnv']}); "
            "stable studies will not be notified"
        )
    _notifier = Notifier(
        cfg, _OrthancApi(), orthanc.LogWarning, orthanc.LogError, store=_store(cfg)
    )
    _notifier.start()
    orthanc.RegisterOnChangeCallback(_on_change)
    orthanc.RegisterRestCallback("/pacs-agent/studies/([0-9a-f-]+)/notify", _on_notify_rest)
    orthanc.RegisterRestCallback("/pacs-agent/pending", _on_pending_rest)


if orthanc is not None:
    _install()
