#!/usr/bin/env python3
"""linux-panic: linux-bios with a kernel command line that cannot work (no init in the initramfs, a
root device that does not exist), so the kernel panics with "VFS: Unable to mount root fs". For
testing that a boot checker names a panic; panic=-1 makes it reset at once (an exit under -no-reboot)."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linux_bios  # noqa: E402

NAME = "linux-panic"


def inputs() -> list[str]:
    return linux_bios.inputs() + [os.path.join(os.path.dirname(os.path.abspath(__file__)), "linux_bios.py")]


def build(out_dir: str) -> str:
    return linux_bios.build(out_dir, name=NAME, extra_cmdline="rdinit=/nonexistent root=/dev/nonexistent")


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "."))
