#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv in .venv with the gateway and its dev tools.
# Safe to run again: it only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "agent-gateway needs Python >= 3.11 (found: $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# System packages the tests need (they fail, never skip, without them): redis-server, which the Redis store
# tests start themselves, and Debian's chromium, which Playwright drives for the console tests (never
# `playwright install`: it downloads browsers of its own).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing: ${missing[*]}: install them with your package manager (e.g. brew install redis chromium)" >&2
    exit 1
  fi
  apt_get=(env DEBIAN_FRONTEND=noninteractive apt-get)
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "missing: ${missing[*]}; installing needs root: apt-get install ${missing[*]}" >&2
      exit 1
    fi
    apt_get=(sudo "${apt_get[@]}")
  fi
  "${apt_get[@]}" update -qq
  "${apt_get[@]}" install -y -qq "${missing[@]}" >/dev/null
fi
