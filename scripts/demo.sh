#!/usr/bin/env bash
# The demo: build a small GPT disk with an ext4 filesystem holding files, capture it, inspect it,
# verify it, restore it and check the restored disk is identical.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh"
export PATH="$here/.venv/bin:$PATH"
work=$(mktemp -d /tmp/imgkit-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "build a 256 MiB GPT disk: an ext4 partition with files, and a swap partition"
mkdir content && cp -r /usr/share/doc/zstd content/ && head -c 8M /dev/urandom > content/random.bin
echo "hello from imgkit" > content/hello.txt
truncate -s 256M disk.raw
sfdisk -q disk.raw <<'PT'
label: gpt
start=2048, size=393216, name=root
start=395264, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, name=swap
PT
truncate -s 192M root.ext4 && mkfs.ext4 -q -L demo-root -d content root.ext4
dd if=root.ext4 of=disk.raw bs=1M seek=1 conv=notrunc,sparse status=none && rm root.ext4
truncate -s 62M swap.img && mkswap -q -L demo-swap swap.img
dd if=swap.img of=disk.raw bs=1M seek=193 conv=notrunc,sparse status=none && rm swap.img
sha256sum disk.raw | tee disk.sha256

step "imgkit capture disk.raw demo.imgk"
imgkit capture disk.raw demo.imgk
step "imgkit info demo.imgk"
imgkit info demo.imgk
step "imgkit verify demo.imgk"
imgkit verify demo.imgk
step "imgkit restore demo.imgk restored.raw --verify"
imgkit restore demo.imgk restored.raw --verify --yes
step "compare"
[ "$(sha256sum < restored.raw | cut -d' ' -f1)" = "$(cut -d' ' -f1 disk.sha256)" ] && echo "restored disk is identical to the source"

step "imgkit convert: to a zstd qcow2 (checked and compared by qemu-img) and to an Azure VHD"
imgkit convert demo.imgk demo.qcow2 --compress
qemu-img check -q -f qcow2 demo.qcow2 && echo "qemu-img check: clean"
qemu-img compare -q -f qcow2 -F raw demo.qcow2 disk.raw && echo "qemu-img compare: demo.qcow2 holds the same disk"
imgkit convert demo.qcow2 demo.vhd --preset azure
imgkit info demo.vhd | head -4
step "imgkit mount demo.imgk: browse the image without restoring it"
mkdir mnt
imgkit mount demo.imgk mnt
ls mnt mnt/partitions
cmp mnt/disk.raw disk.raw && echo "mnt/disk.raw is the disk, byte for byte"
echo "files/p1/hello.txt says: $(cat mnt/files/p1/hello.txt)  (read through the libguestfs appliance)"
imgkit umount mnt
step "imgkit boot-check: does a captured disk still boot? (vm-fixtures linux-bios: GRUB, Debian kernel)"
bootable=$(python -m imgkit.testing.fixtures linux-bios | cut -f2)
imgkit capture "$bootable" bootable.imgk
imgkit boot-check bootable.imgk --timeout 180
