#!/usr/bin/env bash
# One-time set-up of a fresh Debian 12 machine (as root): the system packages imgkit drives and a
# virtualenv built from Debian's /usr/bin/python3, because the libguestfs binding (python3-guestfs)
# exists only for that interpreter. Idempotent: a second run only checks.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${IMGKIT_VENV:-$here/.venv}

apt_pkgs=(
  # pip reaches PyPI over HTTPS: Debian's pip trusts /etc/ssl/certs only, which a minimal Debian 12
  # (a container image, a debootstrap minbase) does not have.
  ca-certificates
  python3 python3-venv python3-dev python3-guestfs
  qemu-utils qemu-system-x86 ovmf
  libguestfs-tools libguestfs-xfs linux-image-amd64
  fuse3 libfuse3-dev pkg-config gcc
  fdisk gdisk util-linux e2fsprogs dosfstools mtools ntfs-3g xfsprogs btrfs-progs
  partclone zstd nbdkit xorriso python3-libnbd libnbd-bin fatresize exfatprogs guestmount
  busybox-static extlinux syslinux-common isolinux grub-pc-bin grub-efi-amd64-bin cpio
  # restore --shrink runs e2fsck/resize2fs/ntfsresize on the host confined by bubblewrap (imgkit/platform/sandbox.py)
  bubblewrap
  # Images in Ceph (#19): rbd: targets through librbd, and a real single-node cluster for the tests
  # and benchmarks (imgkit/testing/ceph_cluster.py, scripts/ceph-up.sh).
  ceph-mon ceph-mgr ceph-osd ceph-common radosgw python3-rados python3-rbd qemu-block-extra uuid-runtime
  # The rescue ISO (imgkit rescue-iso, #18): a Debian root, squashfs, a flat apt repository of the
  # package cache, GRUB images.
  mmdebstrap squashfs-tools apt-utils grub-common
  # crash-safety tests kill imgkit at chosen system calls (strace fault injection)
  strace
)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libguestfs needs a readable kernel to build its appliance (Debian installs them 0600).
chmod 0644 /boot/vmlinuz-* 2>/dev/null || true

if [ ! -x "$venv/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
stamp="$venv/.imgkit-installed"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
  # Build backends print warnings on every install (setuptools' editable-install notice): the output
  # is shown only when pip fails, so the demo starts with imgkit, not a screen of pip's notes.
  echo "setup: installing imgkit and its Python dependencies into $venv" >&2
  if ! log=$({ "$venv/bin/pip" install -q --upgrade pip && "$venv/bin/pip" install -q -e "$here[test]"; } 2>&1); then
    printf '%s\n' "$log" >&2
    echo "setup: pip install failed (output above)" >&2
    exit 1
  fi
  touch "$stamp"
fi
