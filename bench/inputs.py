"""Seeded builders of the benchmark inputs (../shared/guides/benchmarks.md). Nothing is committed:
every input is rebuilt from this script and the machine's own files, cached under bench/work/.

  A  ext4 with realistic content (text/source, ELF binaries, incompressible, records); free space zeroed
  B  the same content, but the free space holds stale data (random bytes written before mkfs)
  F  a whole GPT disk: ESP (FAT32, via mtools) + ext4 (content A) + swap, with an MBR boot sector
  I  a 1 GiB GPT disk, one ext4 partition with ~250 MiB used and stale free space, inode tables and
     journal zeroed as after a first mount (the incremental benchmark, bench/bench_incremental.py,
     changes it through a loop mount)

`--quick` sizes are a third of the full ones. Usage: python bench/inputs.py [--quick] [A B F]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.environ.get("IMGKIT_BENCH_WORK", os.path.join(HERE, "work"))
SEED = 20261126


def sizes(quick: bool) -> dict:
    if quick:
        return {"fs": 1 << 30, "text": 180 << 20, "elf": 120 << 20, "random": 80 << 20, "records": 60 << 20}
    return {"fs": 3 << 30, "text": 520 << 20, "elf": 360 << 20, "random": 250 << 20, "records": 170 << 20}


def _copy_tree_until(src_dirs, dest, budget, want):
    """Copy files whose name matches want() from src_dirs into dest, up to budget bytes, in sorted order."""
    used = 0
    for root_dir in src_dirs:
        for root, dirs, files in os.walk(root_dir):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                if not want(name) or not os.path.isfile(path) or os.path.islink(path):
                    continue
                try:
                    size = os.path.getsize(path)
                    rel = os.path.relpath(path, "/")
                    target = os.path.join(dest, rel)
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copyfile(path, target)
                except OSError:
                    continue
                used += size
                if used >= budget:
                    return used
    return used


def incremental_sizes() -> dict:
    """Input I: 250 MiB of the same kinds of content on a 1 GiB disk."""
    return {"fs": (1 << 30) - (2 << 20), "text": 95 << 20, "elf": 70 << 20, "random": 50 << 20, "records": 35 << 20}


def build_content(quick: bool, s: dict | None = None, tag: str | None = None) -> str:
    s = s or sizes(quick)
    dest = os.path.join(WORK, f"content-{tag or ('quick' if quick else 'full')}")
    stamp = dest + ".done"
    if os.path.exists(stamp):
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    text_ext = (".py", ".txt", ".h", ".c", ".html", ".md", ".rst", ".pl", ".sh", ".conf", ".json", ".xml")
    _copy_tree_until(["/usr/lib/python3", "/usr/share/doc", "/usr/include", "/usr/share/perl", "/usr/share"],
                     os.path.join(dest, "text"), s["text"], lambda n: n.endswith(text_ext))
    _copy_tree_until(["/usr/bin", "/usr/sbin", "/usr/lib/x86_64-linux-gnu", "/usr/libexec"],
                     os.path.join(dest, "elf"), s["elf"], lambda n: True)
    rng = random.Random(SEED)
    os.makedirs(os.path.join(dest, "incompressible"))
    left, i = s["random"], 0
    while left > 0:  # random files of 1-16 MiB: already-compressed media, archives, keys
        n = min(left, rng.randrange(1, 17) << 20)
        with open(os.path.join(dest, "incompressible", f"blob{i:03d}.bin"), "wb") as f:
            f.write(rng.randbytes(n))
        left -= n
        i += 1
    os.makedirs(os.path.join(dest, "records"))
    with open(os.path.join(dest, "records", "events.csv"), "w") as f:
        written = 0
        n = 0
        while written < s["records"]:
            line = (f"{n},{1700000000 + n * 7},user{rng.randrange(5000)},"
                    f"{rng.choice(['GET', 'POST', 'PUT'])},/api/v1/items/{rng.randrange(100000)},"
                    f"{rng.randrange(200, 505)},{rng.random():.6f}\n")
            f.write(line)
            written += len(line)
            n += 1
    open(stamp, "w").close()
    return dest


def _mkfs_ext4(path: str, size: int, content: str, stale: bool, lived: bool = False) -> None:
    """`lived`: inode tables and journal zeroed as on a disk that has been mounted (the kernel's
    ext4lazyinit zeroes them in the background after the first mount; a fresh mkfs over stale data
    leaves them holding it, which a benchmark that mounts the disk would then see change)."""
    with open(path, "wb") as f:
        if stale:  # a disk that has lived: its free space holds old data (never-repeating random bytes,
            # so no tool can win by deduplicating it)
            rng = random.Random(SEED + 1)
            for _ in range(size // (8 << 20)):
                f.write(rng.randbytes(8 << 20))
        f.truncate(size)
    extended = "nodiscard,root_owner=0:0" + (",lazy_itable_init=0,lazy_journal_init=0" if lived else "")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", extended, "-U",
                    "c0ffee00-0000-4000-8000-000000000001", "-d", content, path], check=True)


def build(name: str, quick: bool) -> str:
    os.makedirs(WORK, exist_ok=True)
    tag = "quick" if quick else "full"
    out = os.path.join(WORK, f"input-{name}-{tag}.raw")
    if os.path.exists(out):
        return out
    if name == "I":
        out = os.path.join(WORK, "input-I.raw")
        if os.path.exists(out):
            return out
        s = incremental_sizes()
        content = build_content(False, s, "incremental")
        tmp = out + ".tmp"
        with open(tmp, "wb") as f:
            f.truncate(1 << 30)
        subprocess.run(["sgdisk", "-n", "1:2048:0", "-t", "1:8300", "-c", "1:root", tmp], check=True,
                       capture_output=True)
        part = tmp + ".ext4"
        _mkfs_ext4(part, s["fs"], content, stale=True, lived=True)
        subprocess.run(["dd", f"if={part}", f"of={tmp}", "bs=4M", "seek=1048576", "oflag=seek_bytes",
                        "conv=notrunc", "status=none"],
                       check=True)
        os.unlink(part)
        os.rename(tmp, out)
        return out
    content = build_content(quick)
    size = sizes(quick)["fs"]
    tmp = out + ".tmp"
    if name in ("A", "B"):
        _mkfs_ext4(tmp, size, content, stale=(name == "B"))
    elif name == "F":
        esp, swap = 64 << 20, 128 << 20
        total = (1 << 20) + esp + size + swap + (1 << 20)
        with open(tmp, "wb") as f:
            f.truncate(total)
        subprocess.run(["sgdisk", "-n", f"1:2048:+{esp >> 20}M", "-t", "1:ef00", "-c", "1:EFI",
                        "-n", f"2:0:+{size >> 20}M", "-t", "2:8300", "-c", "2:root",
                        "-n", "3:0:0", "-t", "3:8200", "-c", "3:swap", tmp], check=True, capture_output=True)
        part = tmp + ".ext4"
        _mkfs_ext4(part, size, content, stale=True)
        subprocess.run(["dd", f"if={part}", f"of={tmp}", "bs=4M", f"seek={(1 << 20) + esp}", "oflag=seek_bytes",
                        "conv=notrunc,sparse", "status=none"], check=True)
        os.unlink(part)
        vfat = tmp + ".vfat"
        subprocess.run(["mkfs.vfat", "-F", "32", "-C", vfat, str(esp >> 10)], check=True, capture_output=True)
        os.makedirs(os.path.join(WORK, "esp", "EFI", "BOOT"), exist_ok=True)
        with open(os.path.join(WORK, "esp", "EFI", "BOOT", "BOOTX64.EFI"), "wb") as f:
            f.write(random.Random(SEED + 2).randbytes(2 << 20))
        subprocess.run(["mcopy", "-s", "-i", vfat, os.path.join(WORK, "esp", "EFI"), "::/"], check=True)
        subprocess.run(["dd", f"if={vfat}", f"of={tmp}", "bs=1M", "seek=1", "conv=notrunc", "status=none"],
                       check=True)
        os.unlink(vfat)
        swapfile = tmp + ".swap"
        with open(swapfile, "wb") as f:
            f.truncate(swap)
        subprocess.run(["mkswap", "-q", swapfile], check=True, capture_output=True)
        subprocess.run(["dd", f"if={swapfile}", f"of={tmp}", "bs=1M", f"seek={((1 << 20) + esp + size) >> 20}",
                        "conv=notrunc,sparse", "status=none"], check=True)
        os.unlink(swapfile)
        with open(tmp, "r+b") as f:  # boot code in the MBR's first 440 bytes, as a bootloader would leave
            f.write(random.Random(SEED + 3).randbytes(440))
    else:
        raise SystemExit(f"unknown input {name}")
    os.rename(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("names", nargs="*", default=["A", "B", "F"])
    args = ap.parse_args()
    for n in args.names:
        path = build(n, args.quick)
        print(f"{n}: {path} ({os.path.getsize(path) >> 20} MiB)")


if __name__ == "__main__":
    sys.exit(main())
