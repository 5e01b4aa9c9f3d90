"""The OHIF viewer against a real Orthanc, in headless Debian chromium driven by Playwright.

``scripts/install-viewer-deps.sh`` installs what this needs: Debian ``chromium``, Python
``playwright`` (driving the system chromium: ``playwright install`` is never run) and OHIF's
prebuilt ``dist/`` (npm ``@ohif/app``) under ``.cache/ohif/``.

OHIF is served on the same origin as Orthanc's DICOMweb, as a site puts both behind one reverse
proxy: a small threaded HTTP server serves the dist, answers OHIF's client-side routes
(``/viewer``, ...) with ``index.html``, writes an ``app-config.js`` whose DICOMweb data source
is ``<origin>/dicom-web``, and proxies ``/dicom-web`` and ``/wado`` to Orthanc, keeping the
Host header so that the BulkDataURIs Orthanc writes point back at this origin.

    with serve_ohif(orthanc.url) as ohif, Viewer() as viewer:
        page, log = viewer.new_page()
        open_study(page, ohif.url, study_uid)
        load_series(page, "AI heatmap")
        save_screenshot(page, path)

What is read back from the page goes through OHIF's own globals (``window.cornerstone``,
``window.cornerstoneTools``, which OHIF exposes for its end-to-end tests) and the DOM
(``data-cy`` attributes, the SVG annotation layer).
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import posixpath
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # playwright is a test-only dependency, imported lazily
    from playwright.sync_api import (
        Browser,
        BrowserContext,
        Locator,
        Page,
        Playwright,
        ViewportSize,
    )

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
OHIF_VERSION = "3.13.2"  # keep in step with scripts/install-viewer-deps.sh
OHIF_DIST = Path(
    os.environ.get(
        "PACS_AGENT_TEST_OHIF_DIST",
        str(REPO_ROOT / ".cache" / "ohif" / f"app-{OHIF_VERSION}" / "dist"),
    )
)
CHROMIUM = os.environ.get("PACS_AGENT_TEST_CHROMIUM", "/usr/bin/chromium")
INSTALL_HINT = "run: bash scripts/install-viewer-deps.sh .venv"

# Headless chromium with WebGL on the CPU (SwiftShader through ANGLE) and nothing that calls
# out: the test machines reach nothing beyond localhost.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--no-first-run",
    "--disable-dev-shm-usage",
]

PROXIED_PREFIXES = ("/dicom-web/", "/dicom-web?", "/wado")
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".map": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".xml": "application/xml",
}


def viewer_unavailable() -> str | None:
    """None when chromium, playwright and the OHIF dist are all here, else what is missing."""
    missing = []
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"{CHROMIUM} (Debian package chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("Python package playwright")
    if not (OHIF_DIST / "index.html").is_file():
        missing.append(f"OHIF {OHIF_VERSION} dist at {OHIF_DIST}")
    if not missing:
        return None
    return "missing: " + ", ".join(missing) + f" ({INSTALL_HINT})"


def app_config_js(dicomweb_path: str = "/dicom-web", wado_uri_path: str = "/wado") -> str:
    """OHIF's ``window.config``: one DICOMweb data source on the page's own origin (Orthanc
    behind the same reverse proxy), the public demo server and the onboarding dialogs off."""
    return f"""/** pacs-agent: OHIF against Orthanc's DICOMweb on the same origin. */
window.config = {{
  name: 'pacs-agent/orthanc',
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {{}},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: {{ option: 'never' }},
  maxNumRequests: {{ interaction: 100, thumbnail: 10, prefetch: 10 }},
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {{
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {{
        friendlyName: 'Orthanc (pacs-agent)',
        name: 'orthanc',
        wadoUriRoot: window.location.origin + {json.dumps(wado_uri_path)},
        qidoRoot: window.location.origin + {json.dumps(dicomweb_path)},
        wadoRoot: window.location.origin + {json.dumps(dicomweb_path)},
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: {{ enabled: true }},
        omitQuotationForMultipartRequest: true,
        dicomUploadEnabled: false,
      }},
    }},
  ],
}};
"""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _OhifHTTPServer

    def _send(self, status: int, body: bytes, content_type: str, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # static files ----------------------------------------------------------------------------

    def _static(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == "/app-config.js":
            self._send(200, self.server.app_config.encode(), CONTENT_TYPES[".js"])
            return
        rel = posixpath.normpath(urllib.parse.unquote(path)).lstrip("/")
        target = None
        if rel not in ("", "."):
            candidate = (self.server.dist / rel).resolve()
            if candidate.is_file() and candidate.is_relative_to(self.server.dist):
                target = candidate
        if target is None:
            # OHIF's client-side routes (/viewer, /segmentation, ...) are all index.html; a
            # missing asset (a name with an extension) is a real 404, so errors show.
            if posixpath.splitext(rel)[1]:
                self._send(404, b"not found\n", "text/plain")
                return
            target = self.server.dist / "index.html"
        # Bundles have content hashes in their names: let the browser keep them between pages.
        cache = "no-store" if target.name == "index.html" else "public, max-age=3600"
        ctype = CONTENT_TYPES.get(target.suffix.lower(), "application/octet-stream")
        self._send(200, target.read_bytes(), ctype, cache)

    # reverse proxy to Orthanc ----------------------------------------------------------------

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers.pop("Accept-Encoding", None)
        host = self.headers.get("Host", f"127.0.0.1:{self.server.server_port}")
        # Orthanc writes absolute BulkDataURIs from these: they must come back to this origin.
        headers["Host"] = host
        headers["Forwarded"] = f"host={host};proto=http"
        up = self.server.upstream
        status = 502
        conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port, timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
            self.send_response(status)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError as exc:
            self._send(502, f"Orthanc unreachable: {exc}\n".encode(), "text/plain")
        finally:
            conn.close()
            with self.server.lock:
                self.server.proxied.append((self.command, self.path, status))

    def _dispatch(self) -> None:
        if self.path.startswith(PROXIED_PREFIXES) or self.path == "/dicom-web":
            self._proxy()
        elif self.command in ("GET", "HEAD"):
            self._static()
        else:
            self._send(405, b"method not allowed\n", "text/plain")

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_OPTIONS = _dispatch  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("ohif-server: " + format, *args)


class _OhifHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], dist: Path, upstream: str, app_config: str) -> None:
        super().__init__(addr, _Handler)
        self.dist = dist.resolve()
        self.upstream = urllib.parse.urlsplit(upstream)
        self.app_config = app_config
        self.lock = threading.Lock()
        self.proxied: list[tuple[str, str, int]] = []


@dataclass
class OhifServer:
    """A running OHIF server. ``proxied`` lists (method, path, status) sent on to Orthanc."""

    httpd: _OhifHTTPServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}"

    @property
    def proxied(self) -> list[tuple[str, str, int]]:
        with self.httpd.lock:
            return list(self.httpd.proxied)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)

    def __enter__(self) -> OhifServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_ohif(
    orthanc_url: str, *, host: str = "127.0.0.1", port: int = 0, dist: Path | None = None
) -> OhifServer:
    """Serve OHIF's dist, its app-config and a proxy to ``orthanc_url`` (``port`` 0: a free
    one). Also usable outside tests: ``python -m tests.support.ohif ORTHANC_URL``."""
    dist = dist or OHIF_DIST
    if not (dist / "index.html").is_file():
        raise RuntimeError(f"no OHIF dist at {dist} ({INSTALL_HINT})")
    httpd = _OhifHTTPServer((host, port), dist, orthanc_url, app_config_js())
    thread = threading.Thread(target=httpd.serve_forever, name="ohif-server", daemon=True)
    thread.start()
    return OhifServer(httpd, thread)


# browser -------------------------------------------------------------------------------------

# OHIF's first-visit tour would cover the viewport.
_NO_TOURS = "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"


@dataclass
class BrowserLog:
    """What a page said: console errors and warnings, page errors, failed requests."""

    console: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)

    def errors(self) -> list[str]:
        return [c for c in self.console if c.startswith(("error:", "pageerror:"))]

    def tail(self, n: int = 20) -> str:
        lines = [f"console {c}" for c in self.console[-n:]]
        lines += [f"request {r}" for r in self.failed_requests[-n:]]
        return "\n".join(lines) or "(no console errors or warnings, no failed requests)"


class Viewer:
    """Headless system chromium (SwiftShader WebGL) under Playwright; one browser context, so
    OHIF's bundles are fetched once; ``new_page`` for each check."""

    def __init__(self, width: int = 1600, height: int = 1000) -> None:
        self.size: ViewportSize = {"width": width, "height": height}
        self._pw: Playwright | None = None
        self.browser: Browser | None = None
        self.context: BrowserContext | None = None

    def start(self) -> Viewer:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        try:
            self.browser = self._pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            self.context = self.browser.new_context(viewport=self.size, device_scale_factor=1)
            self.context.add_init_script(_NO_TOURS)
        except Exception:
            self.stop()
            raise
        return self

    def new_page(self) -> tuple[Page, BrowserLog]:
        assert self.context is not None, "Viewer.start() first"
        page = self.context.new_page()
        blog = BrowserLog()

        def on_console(m: Any) -> None:
            if m.type in ("error", "warning"):
                blog.console.append(f"{m.type}: {m.text}"[:600])

        page.on("console", on_console)
        page.on("pageerror", lambda e: blog.console.append(f"pageerror: {e}"[:600]))
        page.on(
            "requestfailed",
            lambda r: blog.failed_requests.append(f"{r.method} {r.url} {r.failure}"),
        )
        page.on(
            "response",
            lambda r: (
                blog.failed_requests.append(f"{r.request.method} {r.url} -> {r.status}")
                if r.status >= 400
                else None
            ),
        )
        return page, blog

    def stop(self) -> None:
        try:
            if self.browser is not None:
                self.browser.close()
        finally:
            self.browser = self.context = None
            if self._pw is not None:
                self._pw.stop()
                self._pw = None

    def __enter__(self) -> Viewer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def webgl_renderer(page: Page) -> str:
    """The WebGL renderer of this browser ('' without WebGL 2)."""
    return str(
        page.evaluate(
            """() => {
              const gl = document.createElement('canvas').getContext('webgl2');
              if (!gl) return '';
              const ext = gl.getExtension('WEBGL_debug_renderer_info');
              return ext ? gl.getParameter(ext.UNMASKED_RENDERER_WEBGL)
                         : gl.getParameter(gl.RENDERER);
            }"""
        )
    )


# OHIF pages ----------------------------------------------------------------------------------


def open_study(
    page: Page, base_url: str, study_uid: str, *, n_series: int | None = None, timeout_s: float = 45
) -> None:
    """Open ``/viewer?StudyInstanceUIDs=<uid>`` (OHIF's basic viewer), wait until the study
    browser lists ``n_series`` series (when given) and the first viewport has drawn an image."""
    query = urllib.parse.urlencode({"StudyInstanceUIDs": study_uid})
    page.goto(f"{base_url}/viewer?{query}", wait_until="load")
    deadline = time.monotonic() + timeout_s
    if n_series is not None:
        items = study_browser_items(page)
        while items.count() < n_series:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the study browser lists {items.count()} of {n_series} series after "
                    f"{timeout_s} s: {items.all_inner_texts()}"
                )
            time.sleep(0.25)
    wait_viewport_drawn(page, timeout_s=max(1.0, deadline - time.monotonic()))


def study_browser_items(page: Page) -> Locator:
    """The series in OHIF's study browser (thumbnails, and the list items of SR/SEG/PMAP)."""
    return page.locator(
        "[data-cy=study-browser-thumbnail], [data-cy=study-browser-thumbnail-no-image]"
    )


def load_series(page: Page, text: str) -> None:
    """Double-click the study-browser entry whose text contains ``text`` (e.g. its Series
    Description): OHIF loads that series into the active viewport."""
    item = study_browser_items(page).filter(has_text=text)
    if item.count() == 0:
        raise AssertionError(
            f"no study-browser entry with {text!r}: {study_browser_items(page).all_inner_texts()}"
        )
    item.first.dblclick()


def viewport_canvas(page: Page, index: int = 0) -> Locator:
    """The image canvas of viewport ``index`` (no overlays, no SVG annotations)."""
    return page.locator("[data-viewport-uid] canvas.cornerstone-canvas").nth(index)


def viewport_element(page: Page, index: int = 0) -> Locator:
    """Viewport ``index`` with its overlays and annotation layer."""
    return page.locator("[data-viewport-uid]").nth(index)


def wait_viewport_drawn(
    page: Page, index: int = 0, timeout_s: float = 45.0, min_std: float = 5.0
) -> ImageStats:
    """Wait until viewport ``index``'s canvas shows an image (not a uniform fill)."""
    deadline = time.monotonic() + timeout_s
    last: ImageStats | None = None
    while True:
        canvas = viewport_canvas(page, index)
        if canvas.count() and canvas.is_visible():
            last = image_stats(canvas.screenshot(timeout=5000))
            if last.std >= min_std:
                return last
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"viewport {index} drew no image within {timeout_s:.0f} s (canvas: {last}); "
                f"{error_notification(page) or ''}"
            )
        time.sleep(0.5)


def wait_for(
    page: Page,
    script: str,
    timeout_s: float,
    what: str,
    arg: Any = None,
    abort: Callable[[], str | None] | None = None,
) -> Any:
    """Evaluate ``script`` in the page until it returns something truthy. ``abort`` is asked
    between tries: a reason it returns ends the wait at once (e.g. the viewer crashed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = page.evaluate(script, arg)
        if value:
            return value
        reason = abort() if abort is not None else None
        if reason:
            raise TimeoutError(f"{what}: gave up: {reason}")
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{what}: not within {timeout_s:.0f} s; {error_notification(page) or ''}"
            )
        time.sleep(0.3)


def viewer_crashed(page: Page) -> str | None:
    """Why OHIF's viewer is gone (its error boundary replaced the viewport grid, or it shows
    its "Something went wrong" notification), or None. A viewport that is still loading
    (a progress bar instead of the canvas) is not a crash."""
    notice = error_notification(page)
    if notice:
        return notice
    if page.locator("[data-cy=viewport-grid]").count() == 0:
        return "OHIF's viewer crashed (no viewport grid left on the page)"
    return None


def error_notification(page: Page) -> str | None:
    """The text of OHIF's error toast or error boundary ("Something went wrong"), if shown."""
    texts = page.locator("body").inner_text(timeout=5000)
    for marker in ("Something went wrong", "Sorry, something went wrong"):
        if marker in texts:
            i = texts.index(marker)
            return "OHIF error shown: " + " ".join(texts[i : i + 300].split())
    return None


def answer_prompt(
    page: Page,
    question: str,
    answer: str = "Yes",
    timeout_s: float = 15,
    abort: Callable[[], str | None] | None = None,
) -> bool:
    """Click ``answer`` on OHIF's viewport prompt containing ``question`` (e.g. "Do you want to
    open this Segmentation?"); False when no such prompt appears (or ``abort`` gives a reason)."""
    prompt = page.get_by_text(question)
    deadline = time.monotonic() + timeout_s
    while not (prompt.count() and prompt.first.is_visible()):
        if time.monotonic() >= deadline or (abort is not None and abort()):
            return False
        time.sleep(0.25)
    page.get_by_role("button", name=answer, exact=True).first.click()
    return True


_VIEWPORTS_JS = """() => {
  const cs = window.cornerstone;
  if (!cs) return null;
  const out = [];
  for (const engine of cs.getRenderingEngines()) {
    for (const vp of engine.getViewports()) {
      let imageId = null;
      try { imageId = vp.getCurrentImageId ? vp.getCurrentImageId() : null; } catch (e) {}
      let dims = null;
      try { const img = vp.getImageData && vp.getImageData(); dims = img ? img.dimensions : null; }
      catch (e) {}
      out.push({id: vp.id, type: vp.type, imageId, dims,
                actors: (vp.getActors ? vp.getActors() : []).map(a => a.uid)});
    }
  }
  return out;
}"""


def viewports(page: Page) -> list[dict[str, Any]]:
    """Cornerstone's viewports: id, type (stack/orthographic), current imageId, actor uids."""
    return list(page.evaluate(_VIEWPORTS_JS) or [])


_SEGMENTATIONS_JS = """() => {
  const t = window.cornerstoneTools, cs = window.cornerstone;
  if (!t || !cs) return null;
  return t.segmentation.state.getSegmentations().map(s => {
    const lm = (s.representationData && s.representationData.Labelmap) || {};
    const segments = {};
    for (const [k, v] of Object.entries(s.segments || {})) segments[k] = v.label;
    const out = {id: s.segmentationId, label: s.label, segments, images: []};
    for (const [i, imageId] of (lm.imageIds || []).entries()) {
      const img = cs.cache.getImage(imageId);
      if (!img) continue;
      const data = img.getPixelData(), cols = img.columns, stats = {};
      for (let j = 0; j < data.length; j++) {
        const v = data[j];
        if (!v) continue;
        const st = stats[v] || (stats[v] = {count: 0, row: 0, col: 0});
        st.count++; st.row += Math.floor(j / cols); st.col += j % cols;
      }
      for (const st of Object.values(stats)) { st.row /= st.count; st.col /= st.count; }
      out.images.push({referencedImageId: (lm.referencedImageIds || [])[i] || null,
                       rows: img.rows, columns: cols, stats});
    }
    return out;
  });
}"""


def segmentations(page: Page) -> list[dict[str, Any]]:
    """OHIF's loaded segmentations: label, {segment number: label}, and per labelmap image its
    size and, per segment value, the pixel count and centroid (row, col) in image pixels."""
    return list(page.evaluate(_SEGMENTATIONS_JS) or [])


_ANNOTATIONS_JS = """() => {
  const t = window.cornerstoneTools, cs = window.cornerstone;
  if (!t || !cs) return null;
  return t.annotation.state.getAllAnnotations()
    .filter(a => a.metadata && a.metadata.referencedImageId)
    .map(a => {
      const id = a.metadata.referencedImageId;
      const points = ((a.data.handles && a.data.handles.points) || [])
        .map(p => Array.from(cs.utilities.worldToImageCoords(id, p)));
      const labels = (a.data.labels || []).map(l => [l.label, l.value]);
      return {tool: a.metadata.toolName, imageId: id, points, labels,
              label: a.data.label || null,
              trackingUid: a.data.TrackingUniqueIdentifier || null};
    });
}"""


def image_annotations(page: Page) -> list[dict[str, Any]]:
    """Cornerstone annotations tied to an image: tool, imageId, points in image coordinates
    (column, row), OHIF's label lines [(label, value)], SR Tracking UID."""
    return list(page.evaluate(_ANNOTATIONS_JS) or [])


def annotation_texts(page: Page, index: int = 0) -> list[str]:
    """The texts drawn in viewport ``index``'s SVG annotation layer."""
    return list(
        viewport_element(page, index).evaluate(
            "el => Array.from(el.querySelectorAll('svg text')).map(t => t.textContent)"
        )
    )


def annotation_text_boxes(page: Page, index: int = 0) -> dict[str, dict[str, Any]]:
    """Annotation uid -> its text box in viewport ``index`` as drawn on screen: text, x, y,
    width, height (CSS pixels)."""
    return dict(
        viewport_element(page, index).evaluate(
            """el => Object.fromEntries(
              Array.from(el.querySelectorAll('svg g[data-annotation-uid]'))
                .filter(g => g.querySelector('text'))
                .map(g => {
                  const t = g.querySelector('text'), r = t.getBoundingClientRect();
                  return [g.getAttribute('data-annotation-uid'),
                          {text: t.textContent, x: r.x, y: r.y, width: r.width,
                           height: r.height}];
                }))"""
        )
    )


def boxes_overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two boxes (x, y, width, height) share any area."""
    return bool(
        a["x"] < b["x"] + b["width"]
        and b["x"] < a["x"] + a["width"]
        and a["y"] < b["y"] + b["height"]
        and b["y"] < a["y"] + a["height"]
    )


def sop_uid_of(image_id: str | None) -> str | None:
    """The SOP Instance UID in a wadors imageId (``.../instances/<uid>/frames/<n>``)."""
    if not image_id or "/instances/" not in image_id:
        return None
    return image_id.split("/instances/", 1)[1].split("/", 1)[0]


# screenshots ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageStats:
    """Pixel statistics of a screenshot (RGB, 0..255)."""

    width: int
    height: int
    mean: float  # mean grey level
    std: float  # spread of grey levels: ~0 for a blank canvas
    coloured: float  # fraction of pixels with a clear hue (max - min channel > 60)


def image_stats(png: bytes) -> ImageStats:
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    grey = rgb.mean(axis=2)
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    return ImageStats(
        width=int(rgb.shape[1]),
        height=int(rgb.shape[0]),
        mean=round(float(grey.mean()), 2),
        std=round(float(grey.std()), 2),
        coloured=round(float((spread > 60).mean()), 4),
    )


def save_screenshot(page: Page, path: Path, locator: Locator | None = None) -> ImageStats:
    """Screenshot the page (or one element) to ``path``; its pixel statistics. An element that
    React replaces meanwhile is looked up again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if locator is None:
        return image_stats(page.screenshot(path=str(path)))
    for attempt in range(5):
        try:
            return image_stats(locator.screenshot(path=str(path), timeout=10000))
        except Exception as exc:  # playwright.Error: element detached while waiting
            if "not attached" not in str(exc) or attempt == 4:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    """Serve OHIF against an Orthanc for a look by hand: ``python -m tests.support.ohif
    http://127.0.0.1:8042 [--port 3000]``; open http://127.0.0.1:3000/ in a browser."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("orthanc_url")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=3000)
    args = ap.parse_args(argv)
    server = serve_ohif(args.orthanc_url, host=args.host, port=args.port)
    url = f"http://{args.host}:{server.httpd.server_port}/"
    print(f"OHIF {OHIF_VERSION} on {url} -> {args.orthanc_url}")
    try:
        server.thread.join()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
