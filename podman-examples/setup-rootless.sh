#!/usr/bin/env bash
# Sets up an existing non-root USER for rootless podman with crfs: containers start from
# eStargz / zstd:chunked images while their layers are fetched lazily.
# Run as root. Safe to run again: it only adds what is missing.
#
#   setup-rootless.sh [--store-only] [--start] USER
#
#   --store-only   podman reads store layers through the layer store alone (mount_program
#                  is the plain fuse-overlayfs), not through crfs.so
#   --start        also start USER's crfs worker now (it joins podman's namespaces itself)
#
# What it does:
#   - subordinate uid/gid ranges for USER (/etc/subuid, /etc/subgid), if missing
#   - /dev/fuse and /dev/net/tun mode 0666 (now, and by a udev rule at boot)
#   - XDG_RUNTIME_DIR /run/user/UID, owned by USER, and exported from ~/.profile
#   - runc installed (crun refuses hosts with cgroups in hybrid mode)
#   - /usr/local/bin/crfs and the mount program /usr/local/libexec/crfs/fuse-overlayfs
#   - ~USER/.config/containers/{storage,containers}.conf from this directory's templates
#     (an existing file that is not ours is kept as FILE.crfs-orig)
#   - the store directory ~USER/.local/share/crfs/store
# Environment: CRFS_PYTHON, the Python that has crfs installed (default: the repository's
# .venv/bin/python).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
python=${CRFS_PYTHON:-$repo/.venv/bin/python}
bindir=/usr/local/bin
libexec=/usr/local/libexec/crfs
marker="# written by crfs setup-rootless.sh"

die() { echo "setup-rootless: $*" >&2; exit 1; }
usage() {
  echo "usage: setup-rootless.sh [--store-only] [--start] USER"
  sed -n '2,4p;7,10p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

store_only=0 start=0 user=
while [ $# -gt 0 ]; do
  case "$1" in
    --store-only) store_only=1 ;;
    --start) start=1 ;;
    -h|--help) usage 0 ;;
    -*) die "unknown option $1" ;;
    *) [ -z "$user" ] || die "one USER only"; user=$1 ;;
  esac
  shift
done
[ -n "$user" ] || usage 1
[ "$(id -u)" = 0 ] || die "run me as root"
id "$user" >/dev/null 2>&1 || die "no such user: $user (create it first, e.g. useradd -m $user)"
uid=$(id -u "$user")
gid=$(id -g "$user")
home=$(getent passwd "$user" | cut -d: -f6)
[ "$uid" != 0 ] || die "USER must not be root"
[ -d "$home" ] || die "$user has no home directory ($home)"
"$python" -c 'import crfs_worker.worker' 2>/dev/null || die "crfs is not installed for $python (set CRFS_PYTHON)"

# ---- crfs must be usable by USER. A checkout USER cannot read (under /root, say) is
# installed once more, for all users, in /opt/crfs (not editable: code and crfs.so copied).
if ! (cd / && runuser -u "$user" -- "$python" -c 'import crfs_worker.worker') 2>/dev/null; then
  system=/opt/crfs
  echo "$user cannot use $python: installing crfs for all users in $system"
  [ -x "$system/bin/python" ] || /usr/bin/python3 -m venv "$system"
  # The second install replaces an older copy of the same version number.
  { "$system/bin/pip" install -q "$repo" && "$system/bin/pip" install -q --no-deps --force-reinstall "$repo"; } \
    >/dev/null 2>&1 || die "pip install $repo into $system failed (try: $system/bin/pip install $repo)"
  chmod -R a+rX "$system"
  python=$system/bin/python
fi

# ---- subordinate ids: podman maps the image's users onto them
add_subids() {  # FILE USERMOD-FLAG
  if ! grep -q -e "^$user:" -e "^$uid:" "$1" 2>/dev/null; then
    local first
    first=$(awk -F: 'BEGIN { m = 100000 } { e = $2 + $3; if (e > m) m = e } END { print m }' "$1" 2>/dev/null || echo 100000)
    usermod "$2" "$first-$((first + 65535))" "$user"
    echo "added $1 range $first-$((first + 65535)) for $user"
  fi
}
add_subids /etc/subuid --add-subuids
add_subids /etc/subgid --add-subgids

# ---- devices: fuse-overlayfs and the worker need /dev/fuse, slirp4netns /dev/net/tun
for dev in /dev/fuse /dev/net/tun; do
  [ -e "$dev" ] && chmod 0666 "$dev"
done
if [ -d /etc/udev/rules.d ]; then
  rule=/etc/udev/rules.d/60-crfs-rootless.rules
  printf '%s\nKERNEL=="fuse", MODE="0666"\nKERNEL=="tun", MODE="0666"\n' "$marker" > "$rule.tmp"
  mv "$rule.tmp" "$rule"
fi

# ---- XDG_RUNTIME_DIR (systemd-logind makes it at login; without logind, we do)
runtime=/run/user/$uid
install -d -m 0700 -o "$uid" -g "$gid" "$runtime"
profile=$home/.profile
if ! grep -q ">>> crfs >>>" "$profile" 2>/dev/null; then
  cat >> "$profile" <<'EOF'
# >>> crfs >>> (setup-rootless.sh: rootless podman needs XDG_RUNTIME_DIR)
if [ -z "${XDG_RUNTIME_DIR:-}" ] && [ -d "/run/user/$(id -u)" ]; then
  export XDG_RUNTIME_DIR="/run/user/$(id -u)"
fi
# <<< crfs <<<
EOF
  chown "$uid:$gid" "$profile"
fi

# ---- runc
if ! command -v runc >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq runc >/dev/null || die "cannot install runc"
fi

# ---- commands: crfs, and the mount program podman runs
# From /: with -c, Python imports from the current directory first (a checkout there would win).
plugin=$(cd / && "$python" -c 'from crfs_worker.mountprogram import plugin_path; print(plugin_path() or "")')
[ -n "$plugin" ] || echo "setup-rootless: warning: crfs.so not found; podman will use the layer store alone" >&2
install -d -m 0755 "$libexec"
write_exec() {  # PATH CONTENT
  printf '%s\n' "$2" > "$1.tmp"
  chmod 0755 "$1.tmp"
  mv "$1.tmp" "$1"
}
write_exec "$bindir/crfs" "#!/bin/sh
$marker
exec $python -m crfs_worker.cli \"\$@\""
write_exec "$libexec/fuse-overlayfs" "#!/bin/sh
$marker
CRFS_PLUGIN=\${CRFS_PLUGIN:-$plugin} exec $python -m crfs_worker.mountprogram \"\$@\""

# ---- podman configuration for USER
store=$home/.local/share/crfs/store
mount_program=$libexec/fuse-overlayfs
[ "$store_only" = 1 ] && mount_program=/usr/bin/fuse-overlayfs
as_user() { (cd / && runuser -u "$user" -- "$@"); }
as_user mkdir -p "$home/.config/containers" "$store"
write_conf() {  # TEMPLATE DEST
  local tmp
  tmp=$(mktemp)
  { echo "$marker"; sed -e "s|@STORE@|$store|g" -e "s|@MOUNT_PROGRAM@|$mount_program|g" "$1"; } > "$tmp"
  if [ -e "$2" ] && ! grep -qF "$marker" "$2" && [ ! -e "$2.crfs-orig" ]; then
    cp -p "$2" "$2.crfs-orig"
    echo "kept your $2 as $2.crfs-orig"
  fi
  install -m 0644 -o "$uid" -g "$gid" "$tmp" "$2"
  rm -f "$tmp"
}
write_conf "$here/storage.conf" "$home/.config/containers/storage.conf"
write_conf "$here/containers.conf" "$home/.config/containers/containers.conf"

echo "$user is set up: store $store, mount_program $mount_program"
if [ "$start" = 1 ]; then
  as_user env -i HOME="$home" USER="$user" LOGNAME="$user" PATH="$bindir:/usr/bin:/bin" \
    XDG_RUNTIME_DIR="$runtime" "$bindir/crfs" worker --detach
  echo "$user's crfs worker serves the store (in podman's namespaces)"
else
  echo "start the worker as $user with: crfs worker --detach"
fi
