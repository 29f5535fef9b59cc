#!/usr/bin/env sh
# Installs what bench/run.py compares relaycore with, and the load generator's fast layer:
#   * node peers (uWS.js, ws, socket.io) into bench/peers/node_modules, from package-lock.json
#   * python peers (websockets, python-socketio, uvicorn[standard]) into bench/.venv-peers
#   * uvloop, picows and py-spy into the project's venv (.venv), for the generator and profiles
# Usage: sh bench/peers/setup.sh   (from the repository root; idempotent)
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
VENV_PY="$ROOT/.venv/bin/python"

if command -v npm >/dev/null 2>&1; then
  # Install scripts are not needed: bufferutil, utf-8-validate and uWS.js ship prebuilt binaries.
  npm ci --prefix "$ROOT/bench/peers" --no-audit --no-fund --ignore-scripts
else
  echo "setup: npm not found; the node peers (uws, ws, socket.io) will be skipped" >&2
fi

if [ ! -x "$ROOT/bench/.venv-peers/bin/python" ]; then
  "$PY" -m venv "$ROOT/bench/.venv-peers"
fi
"$ROOT/bench/.venv-peers/bin/python" -m pip install --quiet --upgrade pip
"$ROOT/bench/.venv-peers/bin/python" -m pip install --quiet -r "$ROOT/bench/peers/requirements.txt"

if [ -x "$VENV_PY" ]; then
  "$VENV_PY" -m pip install --quiet -r "$ROOT/bench/loadgen/requirements.txt"
else
  echo "setup: $VENV_PY missing; run 'make build' first for the generator's uvloop and picows" >&2
fi
echo "setup: done"
