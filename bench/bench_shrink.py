#!/usr/bin/env python3
"""restore --shrink vs a plain restore of the same image onto a same-size disk (issue #16 target:
shrinking <= 3x the plain restore's time; peak extra disk <= the shrunk filesystems' metadata
changes, i.e. the qcow2 overlay and rebuilt FATs, no temporary copy of the disk).

Input: a GPT disk (1 GiB, --quick 512 MiB): ext4 on 60% holding ~15% of the disk in incompressible
files, NTFS on the rest holding ~8%. Captured once (fs-aware); then alternately restored onto a
file of the same size and with --shrink onto a file of half the size, cold page cache each run.
ext4 and NTFS are shrunk on the host by their own tools confined by bubblewrap (no appliance launch;
a plan with a btrfs would launch the libguestfs appliance, 20-30 s under TCG).

    python bench/bench_shrink.py [--quick] [--runs N]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import IMGKIT, IMGKIT_ARGV, alternate, drop_caches, input_args, publish, remover, table  # noqa: E402

MIB = 1 << 20


def sh(*argv, **kw):
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, **kw)


def build_disk(work: str, size: int) -> str:
    disk = os.path.join(work, "disk.raw")
    with open(disk, "wb") as f:
        f.truncate(size)
    p1 = size * 6 // 10 // MIB * MIB
    p2_start = MIB + p1
    p2 = (size - p2_start - MIB) // MIB * MIB
    sh("sfdisk", disk, input=f"label: gpt\nstart=2048, size={p1 // 512}, type=L\n"
                             f"start={p2_start // 512}, size={p2 // 512}, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n".encode())
    tree = os.path.join(work, "tree")
    os.makedirs(tree)
    for i in range(size * 15 // 100 // (8 * MIB)):
        with open(os.path.join(tree, f"f{i:03d}.bin"), "wb") as f:
            f.write(os.urandom(8 * MIB))
    ext = os.path.join(work, "ext.raw")
    with open(ext, "wb") as f:
        f.truncate(p1)
    sh("mkfs.ext4", "-q", "-d", tree, ext)
    ntfs = os.path.join(work, "ntfs.raw")
    with open(ntfs, "wb") as f:
        f.truncate(p2)
    sh("mkntfs", "-q", "-F", "-f", ntfs)
    blob = os.path.join(work, "ntfs.bin")
    with open(blob, "wb") as f:
        f.write(os.urandom(size * 8 // 100))
    sh("ntfscp", "-f", ntfs, blob, "/data.bin")
    for part, start in ((ext, MIB), (ntfs, p2_start)):
        sh("dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={start // MIB}", "conv=notrunc,sparse", "status=none")
        os.unlink(part)
    return disk


def main() -> None:
    args = input_args(__doc__, ["gpt-ext4-ntfs"], quick_runs=2, runs=3)
    size = (512 if args.quick else 1024) * MIB
    with tempfile.TemporaryDirectory(prefix="bench-shrink-", dir=os.environ.get("BENCH_DIR", "/var/tmp")) as work:
        disk = build_disk(work, size)
        img = os.path.join(work, "disk.imgk")
        subprocess.run([*IMGKIT_ARGV, "capture", disk, img, "--progress", "none"], check=True)
        same, half = os.path.join(work, "same.raw"), os.path.join(work, "half.raw")
        rows = alternate({
            "restore (same size)": (f"truncate -s {size} {same} && {IMGKIT} restore {img} {same} --yes --progress none",
                                    None, remover(same)),
            "restore --shrink (half size)": (f"truncate -s {size // 2} {half} && {IMGKIT} restore {img} {half} "
                                             "--yes --shrink --progress none", None, remover(half)),
        }, args.runs, before=drop_caches)
        # one more shrink for its report: the overlay's size is the peak extra disk
        with open(half, "wb") as f:
            f.truncate(size // 2)
        doc = json.loads(subprocess.run([*IMGKIT_ARGV, "restore", img, half, "--yes", "--shrink", "--json",
                                         "--progress", "none"], check=True, capture_output=True, text=True).stdout)
        shrunk = doc["shrink"]
        parts = shrunk["plan"]["partitions"]
        ratio = rows["restore --shrink (half size)"].median("wall") / rows["restore (same size)"].median("wall")
        lines = [table(f"restore onto a same-size disk vs --shrink onto half ({size // MIB} MiB GPT: ext4 + NTFS), "
                       f"{args.runs} alternating runs, cold cache", list(rows.values()), "restore (same size)"),
                 f"shrink / same-size wall ratio: {ratio:.2f}x (target <= 3x)", "",
                 f"peak extra disk (qcow2 overlay + rebuilt FATs): {shrunk['overlay_bytes'] / MIB:.1f} MiB; "
                 "shrunk filesystems: " + ", ".join(
                     f"partition {p['number']} {p['filesystem']} {p['old_size'] // MIB} -> {p['new_size'] // MIB} MiB "
                     f"(uses {p['used'] / MIB:.0f} MiB)" for p in parts if p["shrinks"]),
                 "notes: " + "; ".join(shrunk["notes"]), ""]
        publish("shrink.md", "\n".join(lines))


if __name__ == "__main__":
    main()
