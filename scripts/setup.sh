#!/usr/bin/env bash
# Fresh Debian 12 machine, as root: install everything crfs needs, then run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
exec .venv/bin/python scripts/podman_job.py "$@"
