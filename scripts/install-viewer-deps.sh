#!/usr/bin/env bash
# What the viewer test (tests/test_viewer.py) needs, installed only where missing:
#   - Debian `chromium` (apt-get): the browser, driven headless with SwiftShader WebGL;
#   - Python `playwright` (pinned) into the virtual environment given as $1 (default .venv);
#     it drives the system chromium: `playwright install` (a browser download) is never run;
#   - the OHIF viewer, npm package `@ohif/app` (pinned), whose prebuilt `dist/` is unpacked into
#     .cache/ohif/app-<version>/ (git-ignored). Only the package's own tarball is fetched
#     (`npm pack`, integrity checked against the registry's sha512): its npm dependencies are
#     the sources the dist was built from and are not needed to serve it.
#
# Usage: scripts/install-viewer-deps.sh [VENV]
# Idempotent: a second run checks and exits. Needs root (or sudo) only when chromium is missing.
set -euo pipefail

PLAYWRIGHT_VERSION="1.65.2"
OHIF_VERSION="3.13.2"
OHIF_INTEGRITY="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-.venv}"
case "$VENV" in /*) ;; *) VENV="$REPO/$VENV" ;; esac
OHIF_DIR="$REPO/.cache/ohif/app-$OHIF_VERSION"

SUDO=""
as_root() {
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      echo "error: need root to install: $*" >&2; exit 1
    fi
  fi
}

# 1. Debian packages: chromium (the browser); npm only when it is absent (e.g. no nodesource).
apt_need=()
[ -x /usr/bin/chromium ] || apt_need+=(chromium)
command -v npm >/dev/null 2>&1 || [ -d "$OHIF_DIR/dist" ] || apt_need+=(npm)
if [ ${#apt_need[@]} -gt 0 ]; then
  as_root "${apt_need[*]}"
  echo "installing Debian packages: ${apt_need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # fonts-liberation: readable text in the viewer's screenshots
  $SUDO apt-get install -y -qq --no-install-recommends "${apt_need[@]}" fonts-liberation >/dev/null
fi

# 2. Python playwright, pinned, into the venv (its wheel carries its own node driver).
if [ ! -x "$VENV/bin/python" ]; then
  echo "error: no virtual environment at $VENV (make venv creates .venv)" >&2
  exit 1
fi
have="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("playwright"))' 2>/dev/null || true)"
if [ "$have" != "$PLAYWRIGHT_VERSION" ]; then
  echo "installing playwright==$PLAYWRIGHT_VERSION into $VENV"
  "$VENV/bin/python" -m pip install -q "playwright==$PLAYWRIGHT_VERSION"
fi

# 3. OHIF's prebuilt dist from the npm registry, unpacked into the git-ignored cache.
if [ ! -f "$OHIF_DIR/dist/index.html" ]; then
  echo "fetching @ohif/app@$OHIF_VERSION into ${OHIF_DIR#"$REPO"/}"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
  tgz="$tmp/ohif-app-$OHIF_VERSION.tgz"
  actual="$("$VENV/bin/python" -c 'import base64, hashlib, sys
print("sha512-" + base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$tgz")"
  if [ "$actual" != "$OHIF_INTEGRITY" ]; then
    echo "error: @ohif/app@$OHIF_VERSION tarball integrity $actual != $OHIF_INTEGRITY" >&2
    exit 1
  fi
  mkdir -p "$tmp/unpacked"
  tar -xzf "$tgz" -C "$tmp/unpacked" package/dist package/package.json
  [ -f "$tmp/unpacked/package/dist/index.html" ] || {
    echo "error: @ohif/app@$OHIF_VERSION has no dist/index.html" >&2; exit 1; }
  rm -rf "$OHIF_DIR"
  mkdir -p "$(dirname "$OHIF_DIR")"
  mv "$tmp/unpacked/package" "$OHIF_DIR"
fi
