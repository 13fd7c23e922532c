#!/usr/bin/env bash
# Installs everything a fresh Debian 12 machine lacks for crfs, as root, idempotently:
# Debian packages, a virtualenv in .venv with crfs installed editable, and plugin/crfs.so.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  fuse3 libfuse3-dev fuse-overlayfs podman runc slirp4netns uidmap
  docker-registry apache2-utils openssl curl
  gcc make pkg-config libmsgpack-dev valgrind
  python3 python3-venv python3-dev
  containerd stargz-snapshotter zstd debootstrap busybox-static
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's python, not whatever python3 is first on PATH: the project targets Debian 12.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
# pip's chatter goes to a log, shown only when it fails.
log=.venv/crfs-install.log
if ! { .venv/bin/pip install -q --upgrade pip setuptools wheel && .venv/bin/pip install -q -e '.[test]'; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "install-deps: pip install failed (log above, also in $log)" >&2
  exit 1
fi
echo "crfs installed: $(pwd)/.venv/bin/crfs, plugin $(pwd)/plugin/crfs.so"
