"""The admin console in a real browser: Debian chromium driven by Playwright against the real
agent and worker processes (SQLite, Redis, the DEMO bundle), studies sent with dcmtk's storescu.

- an anonymous visitor is sent to the login form; a wrong password is refused there;
- an admin writes a rule in the editor (validated as they type), tests the draft with a dropped
  DICOM file (per-condition trace), saves it; a study sent with storescu appears in the live list
  routed by that rule, and its timeline shows the routing, the job and its outputs;
- a study whose Series Description is ``<script>alert(1)</script>`` and whose Institution Name is
  ``<img src=x onerror=alert(1)>`` (also its Study Description) shows that text in the list, the
  detail and the tester, and nothing runs (any alert fails the test);
- that study's job fails (its rule sends to a destination nobody listens on); an operator retries
  it from the timeline page; a viewer sees no Retry button and the API refuses them (403);
- destinations (Test button), pipelines (DEMO badge), queue, users (token shown once) and audit
  pages render for an admin.

Screenshots go to ``$PACS_AGENT_CONSOLE_SHOTS`` (default: a pytest temporary folder); the test
names them in its messages. Nothing is mocked: the unreachable destination is a closed local port.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from pacs_agent.db.migrate import upgrade
from pacs_agent.db.models import Pipeline
from pacs_agent.db.session import Database
from tests.conftest import AgentEnv, free_port, sample_path
from tests.support.auth import bearer, make_user
from tests.support.ohif import CHROMIUM, CHROMIUM_ARGS

try:
    from playwright.sync_api import Error as PlaywrightError
except ImportError:  # the fixture fails with the install hint
    PlaywrightError = Exception  # type: ignore[assignment,misc]

pytestmark = pytest.mark.console

STORESCU = "/usr/bin/storescu"  # dcmtk's (the venv's pynetdicom one may shadow it on PATH)
PASSWORD = "console-test-pw-1"
XSS_SERIES = "<script>alert(1)</script>"
XSS_IMG = "<img src=x onerror=alert(1)>"
EDITOR_RULE = "console-chest"
XSS_RULE = "xss-watch"
SOURCE = "RG1_J2KR.dcm"  # CR chest, JPEG 2000 lossless


@dataclass
class Console:
    agent: AgentEnv
    database_url: str
    browser: Any
    shots: Path
    tmp: Path
    admin_token: str
    studies: dict[str, str] = field(default_factory=dict)  # name -> Study Instance UID

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(
            method, f"{self.agent.url}{path}", headers=bearer(self.admin_token), timeout=30, **kw
        )

    def wait_study(self, uid: str, states: set[str], timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            r = self.api("GET", f"/api/studies/{uid}")
            if r.status_code == 200:
                last = r.json()
                if last["status"] in states:
                    return dict(last)
            for p in self.agent.procs:
                if p.popen.poll() is not None:
                    pytest.fail(f"a product process exited:\n{p.log_tail()}")
            time.sleep(0.5)
        logs = "\n---\n".join(p.log_tail(30) for p in self.agent.procs)
        pytest.fail(f"study {uid} not in {states} within {timeout} s: {last}\n{logs}")


@dataclass
class Browser:
    """One logged-in browser context (its own cookies) and page, with what it saw."""

    page: Any
    alerts: list[str]
    errors: list[str]
    shots: Path

    def shot(self, name: str, full_page: bool = True) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path


def _send(port: int, path: Path, aet: str = "MODALITY") -> None:
    """Send one file with dcmtk's storescu, proposing its own transfer syntax (JPEG 2000 LL)."""
    ds = dcmread(path, stop_before_pixels=True)
    flag = "-xv" if str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.90" else "-x="
    result = subprocess.run(
        [STORESCU, "-aet", aet, "-aec", "PACSAGENT", flag, "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _copy(tmp: Path, name: str, **tags: str) -> tuple[Path, str]:
    """The sample radiograph as a new study (own UIDs), with ``tags`` set."""
    ds = dcmread(sample_path(SOURCE))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in tags.items():
        setattr(ds, key, value)
    path = tmp / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.StudyInstanceUID)


@pytest.fixture(scope="module")
def console(
    tmp_path_factory: pytest.TempPathFactory, demo_bundle: Path, redis_server: str
) -> Iterator[Console]:
    if not (Path(STORESCU).is_file() and Path(CHROMIUM).is_file()):
        pytest.fail(f"the console test needs {STORESCU} (dcmtk) and {CHROMIUM} (chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the console test needs Python playwright (scripts/install-viewer-deps.sh)")
    import redis

    tmp = tmp_path_factory.mktemp("console")
    shots = Path(os.environ.get("PACS_AGENT_CONSOLE_SHOTS") or tmp / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    database_url = f"sqlite:///{tmp / 'console.db'}"
    upgrade(database_url)
    broker_url = f"{redis_server}/{1 + (os.getpid() + int(time.time() * 1000) + 7) % 14}"
    client = redis.Redis.from_url(broker_url)
    client.flushdb()

    db = Database(database_url)
    with db.session() as s:
        s.add(Pipeline(name="chest", bundle=str(demo_bundle), description="chest PA/AP"))
        s.add(Pipeline(name="multi-anatomy", bundle=str(demo_bundle), description="any X-ray"))
    db.dispose()
    admin_token = make_user(database_url, "alice", "admin", PASSWORD)
    make_user(database_url, "oscar", "operator", PASSWORD)
    make_user(database_url, "vera", "viewer", PASSWORD)

    out = tmp / "output"
    out.mkdir()
    agent = AgentEnv(tmp, database_url, broker_url, demo_bundle, destinations=f"file://{out}")
    agent.env["PACS_AGENT_QUIET_PERIOD_S"] = "1"
    agent.env["PACS_AGENT_DELIVERY_ATTEMPTS"] = "1"  # a failed delivery fails the job at once
    pw = browser = None
    try:
        agent.start_agent()
        agent.start_worker()
        env = Console(agent, database_url, None, shots, tmp, admin_token)
        # Set up through the JSON API as a script would: a destination nobody listens on, and a
        # rule sending studies with a <script> Series Description there (their jobs fail).
        r = env.api(
            "POST",
            "/api/destinations",
            json={
                "name": "unreachable",
                "url": f"dicom://NOBODY@127.0.0.1:{free_port()}",
                "purpose": "destination",
            },
        )
        assert r.status_code in (200, 201), f"POST /api/destinations: {r.status_code} {r.text}"
        r = env.api(
            "POST",
            "/api/rules",
            json={
                "name": XSS_RULE,
                "when": ['tags.SeriesDescription.contains("<script>")'],
                "action": "process",
                "pipeline": "chest",
                "destinations": ["unreachable"],
            },
        )
        assert r.status_code in (200, 201), f"POST /api/rules: {r.status_code} {r.text}"
        pw = sync_playwright().start()
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        env.browser = browser
        yield env
    finally:
        if browser is not None:
            browser.close()
        if pw is not None:
            pw.stop()
        agent.stop()
        client.flushdb()
        client.close()


def _open(env: Console, user: str | None) -> Browser:
    """A fresh browser context; logged in as ``user`` through the login form (None: anonymous).
    Any alert() or prompt() is recorded (and fails the tests that check); the console's own
    confirm() questions are accepted."""
    context = env.browser.new_context(viewport={"width": 1500, "height": 900})
    page = context.new_page()
    alerts: list[str] = []
    errors: list[str] = []

    def on_dialog(dialog: Any) -> None:
        if dialog.type == "confirm":
            dialog.accept()
        else:
            alerts.append(f"{dialog.type}: {dialog.message}")
            dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda e: errors.append(str(e)))
    # Script errors; refused requests (a 422 while typing, a 403 for a viewer) are expected.
    page.on(
        "console",
        lambda m: (
            errors.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource")
            else None
        ),
    )
    b = Browser(page, alerts, errors, env.shots)
    if user is not None:
        page.goto(f"{env.agent.url}/login")
        page.fill("input[name=name]", user)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{env.agent.url}/")
    return b


def _row_text(page: Any, uid: str) -> str:
    """The text of the study list's row for ``uid`` ('' when not listed)."""
    try:
        return str(
            page.evaluate(
                """uid => {
                    const a = document.querySelector(`#studies-table a[href="/studies/${uid}"]`);
                    return a ? a.closest('tr').innerText : '';
                }""",
                uid,
            )
        )
    except PlaywrightError:  # navigating
        return ""


def _wait(
    what: str, check: Callable[[], Any], timeout: float = 30, b: Browser | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except PlaywrightError:  # the page is navigating (a reload after an action)
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            where = (
                f"; screenshot {b.shot('failure-' + re.sub(r'[^a-z]+', '-', what))}" if b else ""
            )
            pytest.fail(f"{what}: not within {timeout} s{where}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def xss_study(console: Console) -> str:
    """A study whose DICOM text is markup; routed by XSS_RULE, its job fails (delivery)."""
    path, uid = _copy(
        console.tmp,
        "xss",
        SeriesDescription=XSS_SERIES,
        StudyDescription=XSS_IMG,
        InstitutionName=XSS_IMG,
    )
    _send(console.agent.dicom_port, path, aet="XSSMOD")
    study = console.wait_study(uid, {"failed", "done"})
    assert study["status"] == "failed", study
    return uid


PAGES = [
    "/",
    "/rules",
    "/rules/edit",
    "/destinations",
    "/pipelines",
    "/queue",
    "/users",
    "/audit",
    "/refusals",
]


def test_login_is_required(console: Console) -> None:
    for path in [*PAGES, "/studies/1.2.3", "/studies/1.2.3/results/1.2.3.4"]:
        r = httpx.get(f"{console.agent.url}{path}", follow_redirects=False, timeout=10)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next="), path
    r = httpx.get(f"{console.agent.url}/login", timeout=10)
    assert "script-src 'self'" in r.headers["content-security-policy"]
    b = _open(console, None)
    b.page.goto(f"{console.agent.url}/rules")
    assert b.page.url.startswith(f"{console.agent.url}/login"), b.page.url
    b.page.fill("input[name=name]", "alice")
    b.page.fill("input[name=password]", "not-the-password")
    b.page.click("button[type=submit]")
    assert "Wrong user name or password" in b.page.inner_text(".notice.error")
    b.shot("login-refused", full_page=False)
    b.page.fill("input[name=password]", PASSWORD)
    b.page.click("button[type=submit]")
    b.page.wait_for_url(f"{console.agent.url}/rules")  # back where the visitor wanted to go
    assert b.page.inner_text(".whoami .user") == "alice"
    assert b.page.inner_text(".whoami .role").lower() == "admin"
    b.page.click(".whoami button")  # log out
    b.page.wait_for_url(re.compile(r".*/login.*"))
    b.page.goto(f"{console.agent.url}/")
    assert "/login" in b.page.url
    b.page.context.close()


def test_rule_editor_tester_and_routing(console: Console) -> None:
    b = _open(console, "alice")
    page = b.page
    page.goto(f"{console.agent.url}/rules/edit")
    page.fill("input[name=name]", EDITOR_RULE)
    # Validation as you type: a condition on an unknown variable is refused, with its field.
    page.fill("textarea[name=when]", "modality == 'CR'")
    _wait(
        "the validator flags an unknown variable",
        lambda: page.inner_text("[data-error-for=when]").strip(),
        b=b,
    )
    assert page.inner_text("#validity").startswith("✗")
    page.fill("textarea[name=when]", 'tags.Modality == "CR"\ntags.BodyPartExamined == "CHEST"')
    page.select_option("select[name=priority]", "urgent")
    _wait(
        "the draft is valid",
        lambda: (
            "valid" in page.inner_text("#validity") and page.inner_text("#validity").startswith("✓")
        ),
        b=b,
    )
    # The tester: drop a DICOM file; the draft, in its place among the saved rules, takes it.
    page.set_input_files("#test-file", str(sample_path(SOURCE)))
    page.click("#test-run")
    _wait("the tester's answer", lambda: page.is_visible("#test-result"), b=b)
    decision = page.inner_text("#test-decision")
    assert EDITOR_RULE in decision, decision
    trace = page.locator(".trace-rule.matched").filter(has_text=EDITOR_RULE)
    assert trace.count() == 1, page.inner_text("#test-trace")
    assert "tags.BodyPartExamined" in trace.inner_text() and "true" in trace.inner_text()
    xss_trace = page.locator(".trace-rule").filter(has_text=XSS_RULE).inner_text()
    assert "not matched" in xss_trace, xss_trace
    b.shot("rule-editor-tester")
    page.click("#rule-form button[type=submit]")
    page.wait_for_url(re.compile(r".*/rules/edit\?name=" + EDITOR_RULE))
    assert "v1" in page.inner_text("h1")
    _wait("the version history", lambda: page.locator(".history-entry").count() >= 1, b=b)
    page.goto(f"{console.agent.url}/rules")
    row = page.locator(f"#rules-table tr[data-rule={EDITOR_RULE}]")
    assert row.count() == 1 and "v1" in row.inner_text()
    b.shot("rules")

    # Send a study; the live list (auto-refresh, no reload) shows it routed by the rule.
    path, uid = _copy(console.tmp, "chest")
    page.goto(f"{console.agent.url}/")
    _send(console.agent.dicom_port, path)
    _wait("the study in the live list", lambda: _row_text(page, uid), b=b)
    _wait(
        "the study done in the live list, routed by the rule",
        lambda: "done" in (text := _row_text(page, uid)) and f"{EDITOR_RULE} v1" in text,
        timeout=120,
        b=b,
    )
    assert "urgent" in _row_text(page, uid)
    b.shot("studies")
    page.click(f'#studies-table a[href="/studies/{uid}"]')
    page.wait_for_url(re.compile(r".*/studies/"))
    timeline = page.inner_text("#timeline")
    assert f"routed by rule {EDITOR_RULE} v1" in timeline, timeline
    for expected in ("receiv", "complete", "output"):
        assert expected in timeline, (expected, timeline)
    assert page.locator("#timeline a").count() >= 1  # links to the result objects
    href = page.locator("#timeline a").first.get_attribute("href")
    r = page.request.get(f"{console.agent.url}{href}")
    assert r.status == 200 and r.body()[128:132] == b"DICM"
    b.shot("study-timeline")
    assert not b.alerts and not b.errors, (b.alerts, b.errors)
    b.page.context.close()


def test_dicom_text_is_shown_and_never_runs(console: Console, xss_study: str) -> None:
    b = _open(console, "alice")
    page = b.page
    page.goto(f"{console.agent.url}/")
    assert XSS_SERIES in _row_text(page, xss_study)
    assert page.locator("#studies-table img").count() == 0
    # Let the live list refresh once (the fresh rows come from the server, parsed inertly).
    _wait(
        "a refresh of the list",
        lambda: "updated" in page.inner_text("#refresh-note"),
        timeout=15,
        b=b,
    )
    assert XSS_SERIES in page.locator("#studies-table").inner_text()
    page.goto(f"{console.agent.url}/studies/{xss_study}")
    shown = page.inner_text("main")
    assert XSS_SERIES in shown
    assert page.locator("dl.kv dd", has_text=XSS_IMG).count() == 2, shown  # study, institution
    assert page.locator("main script, main img").count() == 0
    # The tester shows the trace of the same study; the rule text holds "<script>" too.
    page.goto(f"{console.agent.url}/rules/edit?name={XSS_RULE}")
    page.select_option("#test-study", xss_study)
    page.click("#test-run")
    _wait("the tester's answer", lambda: page.is_visible("#test-result"), b=b)
    assert XSS_RULE in page.inner_text("#test-decision")
    assert 'contains("<script>")' in page.inner_text("#test-trace")
    assert page.locator("#test-trace script, #test-trace img").count() == 0
    page.wait_for_timeout(500)  # a handler that would fire has had its chance
    assert not b.alerts, f"DICOM text ran as script: {b.alerts}"
    b.page.context.close()


def test_operator_retries_a_failed_job_viewer_is_refused(console: Console, xss_study: str) -> None:
    op = _open(console, "oscar")
    page = op.page
    page.goto(f"{console.agent.url}/studies/{xss_study}")
    timeline = page.inner_text("#timeline")
    assert f"routed by rule {XSS_RULE} v1" in timeline, timeline
    failed = page.locator("tr.lvl-error")
    assert failed.count() >= 1, timeline  # the failure, with its reason
    op.shot("study-failed")
    retry = page.locator("button", has_text="Retry")
    assert retry.count() == 1 and retry.is_enabled()
    retry.click()
    _wait(
        "the retry in the timeline",
        lambda: "retry requested by oscar" in page.inner_text("#timeline"),
        b=op,
    )
    op.shot("study-retried")
    # Re-run with another pipeline: a new job for it, listed after the reload.
    page.select_option("select[name=pipeline]", "multi-anatomy")
    page.click("button:text('Re-run')")
    _wait(
        "the re-run job",
        lambda: "multi-anatomy" in page.inner_text("#study-live table.grid >> nth=1"),
        b=op,
    )
    op.page.context.close()

    viewer = _open(console, "vera")
    page = viewer.page
    page.goto(f"{console.agent.url}/studies/{xss_study}")
    assert page.locator("button", has_text="Retry").count() == 0
    assert page.locator("button", has_text="Force complete").count() == 0
    assert "need the operator role" in page.inner_text("main")
    job_id = console.api("GET", f"/api/studies/{xss_study}").json()["jobs"][0]["id"]
    status = page.evaluate(
        """async (id) => {
            const csrf = document.querySelector('meta[name="csrf-token"]').content;
            const r = await fetch(`/api/jobs/${id}/retry`,
                                  {method: 'POST', headers: {'X-CSRF-Token': csrf}});
            return r.status;
        }""",
        job_id,
    )
    assert status == 403
    viewer.shot("viewer-study")
    page.goto(f"{console.agent.url}/rules/edit?name={XSS_RULE}")
    assert page.locator("textarea[name=when]").is_disabled()
    assert page.locator("#rule-form button[type=submit]").count() == 0
    assert page.locator("#tester").count() == 0
    page.goto(f"{console.agent.url}/users")
    assert "Not allowed" in page.inner_text("h1")
    assert page.locator("nav a", has_text="Users").count() == 0
    viewer.page.context.close()


def test_admin_pages(console: Console, xss_study: str) -> None:
    b = _open(console, "alice")
    page = b.page
    page.set_viewport_size({"width": 1400, "height": 560})
    page.goto(f"{console.agent.url}/")
    assert _row_text(page, xss_study)
    b.shot("console", full_page=False)  # the README's picture (docs/console.png)
    page.set_viewport_size({"width": 1500, "height": 900})
    page.goto(f"{console.agent.url}/destinations")
    row = page.locator("tr[data-destination=unreachable]")
    row.locator("button", has_text="Test").click()
    _wait(
        "the destination test result",
        lambda: row.locator(".test-out").inner_text().startswith(("✓", "✗")),
        b=b,
    )
    assert row.locator(".test-out").inner_text().startswith("✗")
    b.shot("destinations")
    page.goto(f"{console.agent.url}/pipelines")
    _wait(
        "the pipelines",
        lambda: page.locator("#pipelines-table tbody tr").filter(has_text="chest").count() >= 1,
        b=b,
    )
    assert page.locator("#pipelines-table .badge.demo").count() >= 1
    b.shot("pipelines")
    page.goto(f"{console.agent.url}/queue")
    _wait("the queue state", lambda: page.inner_text("#queue-suspended") != "…", b=b)
    b.shot("queue")
    page.goto(f"{console.agent.url}/users")
    page.locator("tr[data-user=vera] button", has_text="Issue token").click()
    _wait("the new token", lambda: page.is_visible("#token-box"), b=b)
    token = page.inner_text("#token-value")
    assert len(token) >= 20
    r = httpx.get(f"{console.agent.url}/api/auth/me", headers=bearer(token), timeout=10)
    assert r.status_code == 200 and r.json()["name"] == "vera"
    b.shot("users")
    page.goto(f"{console.agent.url}/audit")
    text = page.inner_text("#audit-table")
    assert "login.success" in text and "rule" in text
    b.shot("audit")
    assert not b.alerts and not b.errors, (b.alerts, b.errors)
    b.page.context.close()


def test_refusals_page(console: Console) -> None:
    """A modality sends a CR whose Bits Stored (20) exceeds Bits Allocated (16): storescu gets
    0xA900, and a viewer finds the refusal through the nav link on the Refusals page (calling
    AE, status, the reason naming the attribute, the SOP Instance UID), and filters it."""
    path, _uid = _copy(console.tmp, "refused", BitsStored=20)  # type: ignore[arg-type]
    sop_uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    result = subprocess.run(
        [STORESCU, "-v", "-aet", "REFUSEDMOD", "-aec", "PACSAGENT", "-xv", "127.0.0.1"]
        + [str(console.agent.dicom_port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert "DataSetDoesNotMatchSOPClass" in result.stdout + result.stderr, result.stdout
    b = _open(console, "vera")
    page = b.page
    page.click("header nav a:has-text('Refusals')")
    page.wait_for_url(f"{console.agent.url}/refusals")
    row = page.locator("#refusals-table tbody tr", has_text="REFUSEDMOD")
    _wait("the refusal row", lambda: row.count() == 1, b=b)
    text = row.inner_text()
    assert "dimse" in text and "0xA900" in text and "BitsStored" in text, text
    assert row.locator(f'[title="{sop_uid}"]').count() == 1
    assert page.locator("header nav a.active").inner_text() == "Refusals"
    b.shot("refusals")
    page.select_option("select[name=door]", "stow")
    page.click("form.filters button[type=submit]")
    page.wait_for_url(re.compile(r".*/refusals\?door=stow.*"))
    assert "Nothing refused that matches" in page.inner_text("#refusals-table")
    page.goto(f"{console.agent.url}/refusals?calling_ae=REFUSEDMOD")
    assert page.locator("#refusals-table tbody tr[data-refusal-id]").count() == 1
    assert not b.alerts and not b.errors, (b.alerts, b.errors)
    b.page.context.close()


def test_rule_order_switches_history_and_concurrent_edit(console: Console) -> None:
    for name in ("zz-first", "zz-second"):  # rules that take no study: order changes nothing
        r = console.api(
            "POST",
            "/api/rules",
            json={"name": name, "when": [f'tags.Modality == "{name}"'], "action": "process"},
        )
        assert r.status_code == 201, r.text
    b = _open(console, "alice")
    page = b.page
    page.goto(f"{console.agent.url}/rules")

    def order() -> list[str]:
        try:
            names = page.eval_on_selector_all(
                "#rules-table tr[data-rule]", "rows => rows.map(r => r.dataset.rule)"
            )
        except PlaywrightError:  # the page is reloading after the change
            return []
        return [str(n) for n in names]

    assert order()[-2:] == ["zz-first", "zz-second"]
    page.click("tr[data-rule=zz-second] button[data-move=up]")
    _wait("the new order", lambda: order()[-2:] == ["zz-second", "zz-first"], b=b)
    page.click("tr[data-rule=zz-first] button:text('Disable')")
    _wait("the rule disabled", lambda: "disabled" in page.inner_text("tr[data-rule=zz-first]"), b=b)
    page.click("tr[data-rule=zz-first] button:text('Enable')")
    _wait("the rule enabled", lambda: "enabled" in page.inner_text("tr[data-rule=zz-first]"), b=b)

    # The fallback rule is shown, and editable.
    _wait("the fallback's version", lambda: page.inner_text("#fallback-version"), b=b)
    page.click("#fallback-edit")
    page.select_option("#fallback-form select[name=priority]", "offpeak")
    page.click("#fallback-form button[type=submit]")
    _wait("the fallback saved", lambda: "offpeak" in page.inner_text("#fallback-priority"), b=b)
    page.click("#fallback-edit")
    page.select_option("#fallback-form select[name=priority]", "")
    page.click("#fallback-form button[type=submit]")
    _wait("the fallback restored", lambda: not page.inner_text("#fallback-priority").strip(), b=b)

    # Edit: a new version, and the history shows the change as a diff.
    page.goto(f"{console.agent.url}/rules/edit?name=zz-first")
    version = int(page.inner_text("h1 .muted").lstrip("v"))
    page.fill("textarea[name=when]", 'tags.Modality == "zz-changed"')
    _wait("the draft valid", lambda: page.inner_text("#validity").startswith("✓"), b=b)
    page.click("#rule-form button[type=submit]")
    _wait("the saved version", lambda: f"v{version + 1}" in page.inner_text("h1"), b=b)
    _wait(
        "the diff in the history",
        lambda: page.locator("#history pre.diff .add", has_text="zz-changed").count() >= 1,
        b=b,
    )
    b.shot("rule-history")

    # Someone else saves meanwhile: this page's save is refused (409), not lost silently.
    page.fill("textarea[name=when]", 'tags.Modality == "mine"')
    current = console.api("GET", "/api/rules/zz-first").json()
    r = console.api(
        "PUT",
        "/api/rules/zz-first",
        json={
            "name": "zz-first",
            "when": ['tags.Modality == "theirs"'],
            "action": "process",
            "version": current["version"],
        },
    )
    assert r.status_code == 200, r.text
    page.click("#rule-form button[type=submit]")
    _wait("the conflict message", lambda: "reload" in page.inner_text("#save-msg"), b=b)
    assert "Changed by someone else" in page.inner_text("#save-msg")
    b.shot("rule-conflict")
    for name in ("zz-first", "zz-second"):
        version = console.api("GET", f"/api/rules/{name}").json()["version"]
        assert console.api("DELETE", f"/api/rules/{name}?version={version}").status_code in (
            200,
            204,
        )
    assert not b.alerts and not b.errors, (b.alerts, b.errors)
    b.page.context.close()
