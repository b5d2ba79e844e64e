"""The rescue ISO: build it (build.py: system.py + layer.py + initramfs.py) and, inside the booted
ISO, run unattended jobs (job.py). vm.py boots it in QEMU with extra disks for tests and benches."""
