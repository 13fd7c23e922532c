#!/usr/bin/env bash
# Runs the whole crfs test suite (needs scripts/install-deps.sh to have run once).
# The tests start their own services: docker-registry processes, a private containerd.
set -euo pipefail
cd "$(dirname "$0")/.."
make -s -C plugin
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
