#!/usr/bin/env bash
# Set up, then run the gateway on the example rules with fake upstreams and a scripted agent.
# No API keys needed. Extra arguments go to `agent-gateway demo` (e.g. --exit, --port 9080).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/agent-gateway demo "$@"
