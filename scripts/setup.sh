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

# redis-server: the Redis store tests start their own (they fail, never skip, without it).
if ! command -v redis-server >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "redis-server is missing: install it with your package manager (e.g. brew install redis)" >&2
    exit 1
  fi
  apt_get=(env DEBIAN_FRONTEND=noninteractive apt-get)
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "redis-server is missing and installing it needs root: apt-get install redis-server" >&2
      exit 1
    fi
    apt_get=(sudo "${apt_get[@]}")
  fi
  "${apt_get[@]}" update -qq
  "${apt_get[@]}" install -y -qq redis-server >/dev/null
fi
