#!/usr/bin/env bash
# Prove the README's contract on a fresh Debian 12: build a new bookworm root with mmdebstrap, clone
# a commit of this repository into it, and run the README's commands there as root, the way a root
# shell on a new machine would (clean environment, nothing from this machine's packages, venvs or
# /var/cache/imgkit). A green run on a developer machine can hide a missing install step, because
# every package is already installed there. Takes ~25 min with the first builds (2 cores, loaded).
#
#   scripts/fresh-check.sh [--variant minbase|important|standard] [--ref REV] [--keep] DIR [COMMAND]
#
# COMMAND defaults to './scripts/demo.sh && CI=true bash .ci/run'. DIR is removed afterwards unless
# --keep (it grows to ~16 GB: packages, fixtures, the rescue ISO's layers). Needs root and mmdebstrap.
# /dev, /proc and /sys are bound in a private mount namespace, so no mount outlives the run; the root
# is entered with pivot_root, not chroot, because the kernel refuses user namespaces (bubblewrap,
# used by restore --shrink) to a chrooted process.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
variant=minbase ref=HEAD keep=0
while [ $# -gt 0 ]; do
  case $1 in
    --variant) variant=$2; shift 2 ;;
    --ref) ref=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -*) echo "fresh-check: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { sed -n '8p' "$0" >&2; exit 2; }
root=$1 cmd=${2:-'./scripts/demo.sh && CI=true bash .ci/run'}
[ ! -e "$root" ] || { echo "fresh-check: $root exists; give a new directory" >&2; exit 2; }
[ "$keep" = 1 ] || trap 'rm -rf --one-file-system "$root"' EXIT

# The same mirrors as Debian 12's default sources.
mmdebstrap --quiet --variant="$variant" --mode=root bookworm "$root" \
  "deb http://deb.debian.org/debian bookworm main" \
  "deb http://deb.debian.org/debian bookworm-updates main" \
  "deb http://deb.debian.org/debian-security bookworm-security main"
git clone -q --no-local "$here" "$root/root/imgkit"
git -C "$root/root/imgkit" checkout -q --detach "$(git -C "$here" rev-parse "$ref")"
# A machine whose HTTPS goes through an intercepting proxy trusts that proxy's CA: so must the root
# (update-ca-certificates takes these in when setup.sh installs ca-certificates).
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  # Variants that already hold ca-certificates (important, standard) need the bundle rebuilt now.
  if [ -x "$root/usr/sbin/update-ca-certificates" ]; then
    chroot "$root" /usr/sbin/update-ca-certificates >/dev/null 2>&1
  fi
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"

unshare -m --propagation private bash -c '
  set -e; r=$1; c=$2
  mount --bind "$r" "$r"
  mount --rbind /dev "$r/dev"
  mount -t proc proc "$r/proc"
  mount --rbind /sys "$r/sys"
  mount -t tmpfs tmpfs "$r/run"
  mkdir -p "$r/.oldroot"
  cd "$r" && pivot_root . .oldroot
  umount -l /.oldroot && rmdir /.oldroot
  exec /usr/bin/env -i HOME=/root TERM="${TERM:-dumb}" /bin/bash -lc "cd /root/imgkit && $c"
' _ "$root" "$cmd"
