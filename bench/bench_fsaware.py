"""Filesystem-aware capture, side by side with the filesystem-aware peer and qemu-img (issue 3).

  B  ext4 with stale free space (bench/inputs.py): imgkit capture (fs-aware, default) vs
     `partclone.ext4 -c -s B -o - | zstd -T2 -3` (the Clonezilla pipeline). Targets: time <= 0.5x,
     size <= 1.05x.
  F  a whole GPT disk (ESP + ext4 with stale space + swap): imgkit capture vs
     `qemu-img convert -c -O qcow2 -o compression_type=zstd`. Target: time <= 0.3x.
  D  a 16 GiB disk with the content of A (~5% used at full size) vs A itself (the same used bytes in a
     1-3 GiB disk), both captured from loop devices (a block device: no SEEK_HOLE shortcut), and a
     --sector-by-sector capture of D for contrast: fs-aware time must follow used bytes, not disk size.

Every row is checked: imgkit images restore to a filesystem e2fsck calls clean; partclone images are
restored with partclone and checked the same way.
Usage (root, repo root): ./.venv/bin/python bench/bench_fsaware.py [--quick] [--runs N]
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import input_args, IMGKIT, alternate, drop_caches, publish, remover, table  # noqa: E402
from inputs import WORK, build, build_content  # noqa: E402



def drop_page_cache():
    """The peers and imgkit read the same input: give each the same (cold-ish) page cache."""
    drop_caches(1)


@contextlib.contextmanager
def loop(path):
    dev = subprocess.run(["losetup", "-r", "-f", "--show", path], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev])


def e2fsck_clean(path: str, offset: int = 0) -> bool:
    if offset:
        with loop_at(path, offset) as dev:
            return subprocess.run(["e2fsck", "-fn", dev], capture_output=True).returncode == 0
    return subprocess.run(["e2fsck", "-fn", path], capture_output=True).returncode == 0


@contextlib.contextmanager
def loop_at(path, offset):
    dev = subprocess.run(["losetup", "-r", "-f", "--show", "-o", str(offset), path], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev])


def build_d(quick: bool) -> str:
    """16 GiB sparse disk (no partition table) holding input A's content: ~5% used at full size."""
    out = os.path.join(WORK, f"input-D-{'quick' if quick else 'full'}.raw")
    if os.path.exists(out):
        return out
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.truncate(16 << 30)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", build_content(quick), tmp], check=True)
    os.rename(tmp, out)
    return out


def bench_b(quick, runs, out_dir):
    src = build("B", quick)
    imgk, pcz = os.path.join(out_dir, "B.imgk"), os.path.join(out_dir, "B.pc.zst")
    rows = alternate({
        "imgkit capture (fs-aware, L3)": (f"{IMGKIT} capture --progress none --force {src} {imgk}", imgk, remover(imgk)),
        "partclone.ext4 -c, piped to zstd -T2 -3": (f"partclone.ext4 -q -c -s {src} -o - 2>/dev/null | zstd -q -T2 -3 > {pcz}",
                                            pcz, remover(pcz)),
    }, runs, before=drop_page_cache)
    r1 = os.path.join(out_dir, "B.restored")
    subprocess.run(f"{IMGKIT} restore --yes --progress none {imgk} {r1}", shell=True, check=True)
    rows["imgkit capture (fs-aware, L3)"].check = "e2fsck clean" if e2fsck_clean(r1) else "E2FSCK FAILED"
    os.unlink(r1)
    r2 = os.path.join(out_dir, "B.pc.restored")
    with open(r2, "wb") as f:
        f.truncate(os.path.getsize(src))
    subprocess.run(f"zstd -q -dc {pcz} | partclone.ext4 -q -r -s - -O {r2} -C 2>/dev/null", shell=True, check=True)
    rows["partclone.ext4 -c, piped to zstd -T2 -3"].check = "e2fsck clean" if e2fsck_clean(r2) else "E2FSCK FAILED"
    os.unlink(r2)
    a, p = rows["imgkit capture (fs-aware, L3)"], rows["partclone.ext4 -c, piped to zstd -T2 -3"]
    text = f"## input B: ext4 with stale free space ({os.path.getsize(src) / 2**30:.2f} GiB)\n\n"
    text += table("capture of one ext4 partition", [a, p], "partclone.ext4 -c, piped to zstd -T2 -3")
    text += (f"\ntime ratio imgkit/partclone+zstd: {a.median('wall') / p.median('wall'):.2f} (target <= 0.5); "
             f"size ratio: {a.median('out_bytes') / p.median('out_bytes'):.3f} (target <= 1.05)\n\n")
    return text


def bench_f(quick, runs, out_dir):
    src = build("F", quick)
    imgk, qcow = os.path.join(out_dir, "F.imgk"), os.path.join(out_dir, "F.qcow2")
    rows = alternate({
        "imgkit capture (fs-aware, L3)": (f"{IMGKIT} capture --progress none --force {src} {imgk}", imgk, remover(imgk)),
        "qemu-img convert -c zstd": (f"qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd {src} {qcow}",
                                     qcow, remover(qcow)),
    }, runs, before=drop_page_cache)
    r1 = os.path.join(out_dir, "F.restored")
    subprocess.run(f"{IMGKIT} restore --yes --progress none {imgk} {r1}", shell=True, check=True)
    ok = e2fsck_clean(r1, (1 << 20) + (64 << 20)) and subprocess.run(
        ["sgdisk", "-v", r1], capture_output=True, text=True).stdout.count("No problems found") == 1
    rows["imgkit capture (fs-aware, L3)"].check = "sgdisk -v + e2fsck clean" if ok else "CHECK FAILED"
    os.unlink(r1)
    rows["qemu-img convert -c zstd"].check = "qemu-img check ok" if subprocess.run(
        ["qemu-img", "check", "-q", "-f", "qcow2", qcow]).returncode == 0 else "BAD"
    a, q = rows["imgkit capture (fs-aware, L3)"], rows["qemu-img convert -c zstd"]
    text = f"## input F: whole GPT disk ({os.path.getsize(src) / 2**30:.2f} GiB)\n\n"
    text += table("capture of the whole disk", [a, q], "qemu-img convert -c zstd")
    text += f"\ntime ratio imgkit/qemu-img: {a.median('wall') / q.median('wall'):.2f} (target <= 0.3)\n\n"
    return text


def bench_d(quick, runs, out_dir):
    small, big = build("A", quick), build_d(quick)
    out_a, out_d, out_s = (os.path.join(out_dir, n) for n in ("A.imgk", "D.imgk", "D-sector.imgk"))
    with loop(small) as dev_a, loop(big) as dev_d:
        rows = alternate({
            f"fs-aware, A ({os.path.getsize(small) >> 30} GiB disk)":
                (f"{IMGKIT} capture --progress none --force {dev_a} {out_a}", out_a, remover(out_a)),
            "fs-aware, D (16 GiB disk)": (f"{IMGKIT} capture --progress none --force {dev_d} {out_d}", out_d, remover(out_d)),
            "--sector-by-sector, D (16 GiB disk)":
                (f"{IMGKIT} capture --progress none --force --sector-by-sector {dev_d} {out_s}", out_s, remover(out_s)),
        }, max(1, runs - 1) if quick else runs, before=drop_page_cache)
    names = list(rows)
    for n in names:
        rows[n].check = "-"
    a, d, s = (rows[n] for n in names)
    text = "## input D: the same used bytes in a 16 GiB disk, captured from loop devices\n\n"
    text += table("capture time vs disk size", [a, d, s], names[0])
    text += (f"\nfs-aware D/A time ratio: {d.median('wall') / a.median('wall'):.2f} (disk 16x larger, same used "
             f"bytes); sector-by-sector D / fs-aware D: {s.median('wall') / d.median('wall'):.1f}x\n\n")
    return text


def main() -> None:
    args = input_args(__doc__, ["B", "F", "D"])
    out_dir = os.path.join(WORK, "out-fsaware")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    parts = {"B": bench_b, "F": bench_f, "D": bench_d}
    report = "".join(parts[n](args.quick, args.runs, out_dir) for n in args.inputs)
    shutil.rmtree(out_dir, ignore_errors=True)
    publish("fsaware.md", report)


if __name__ == "__main__":
    main()
