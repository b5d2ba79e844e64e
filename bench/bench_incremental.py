"""Incremental images (issue 15) side by side with restic (Debian 12's 0.14: content-defined chunks,
zstd; bench/setup.sh installs it), on input I (bench/inputs.py: a 1 GiB GPT disk, ext4 with ~250 MiB
used, stale free space). Alternating runs, median ratios, cold page cache before every run.

  disk0: input I. disk1: disk0 + 8 MiB of new files (written through a loop mount). disk2: disk1 + 8 MiB more.
  - size: `capture disk1 --base full0` stored bytes vs what restic adds to a repository holding disk0
    when `backup --stdin` reads disk1 (the repository's growth, and restic's own "stored" line);
  - time: that incremental capture vs a full filesystem-aware capture of disk1 and vs restic's
    second backup; an unchanged disk (disk0 --base full0): size and time vs the full capture;
  - chain reads: restore, sequential and random reads of the mount's disk.raw of the 3-link chain
    full0 <- inc1 <- inc2 vs its consolidated image; boot-check of a 3-link chain of the tiny fixture
    vs its consolidated image;
  - what the chunk size costs: the incremental's stored size at 2 MiB, 256 KiB and 64 KiB chunks.

Usage: python bench/bench_incremental.py [--runs N]
"""
from __future__ import annotations

import argparse
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import IMGKIT, IMGKIT_ARGV, drop_caches, publish, run_measured, sha256_of  # noqa: E402
from inputs import WORK, build  # noqa: E402

MiB = 1 << 20
PART_OFFSET = 1 << 20
RESTIC_ENV = {**os.environ, "RESTIC_PASSWORD": "bench"}


def sh(*cmd, **kw):
    return subprocess.run(list(map(str, cmd)), check=True, capture_output=True, text=True, **kw)


def add_files(disk: str, mnt: str, seed: int, total: int = 8 * MiB) -> None:
    """`total` bytes of new files (half random, half text) through a loop mount of the disk's ext4."""
    os.makedirs(mnt, exist_ok=True)
    sh("mount", "-t", "ext4", "-o", f"loop,offset={PART_OFFSET}", disk, mnt)
    try:
        rng = random.Random(seed)
        d = os.path.join(mnt, f"new-{seed}")
        os.makedirs(d)
        for i in range(8):
            with open(os.path.join(d, f"f{i}.bin" if i % 2 else f"f{i}.txt"), "wb") as f:
                if i % 2:
                    f.write(rng.randbytes(total // 8))
                else:
                    line = f"log line {i} of seed {seed}: the quick brown fox {rng.random()}\n".encode()
                    f.write((line * (total // 8 // len(line) + 1))[:total // 8])
    finally:
        sh("sync")
        sh("umount", mnt)


def imgkit(*args) -> str:
    return " ".join([IMGKIT, *map(str, args), "--progress", "none"])


def measured(cmd, out=None, cold=True):
    if cold:
        drop_caches(1)
    return run_measured(cmd, out)


def restic_backup(repo: str, disk: str, cold=True) -> tuple[float, float, int, str]:
    """Second backup: (wall, user+sys, repo growth in bytes, restic's 'Added to the repository' line)."""
    before = du(repo)
    if cold:
        drop_caches(1)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with open(disk, "rb") as f:
        out = subprocess.run(["restic", "-r", repo, "backup", "--stdin", "--stdin-filename", "disk.raw"],
                             stdin=f, capture_output=True, text=True, env=RESTIC_ENV, check=True).stdout
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    added = next((ln.strip() for ln in out.splitlines() if "Added to the repo" in ln), "?")
    return wall, cpu, du(repo) - before, added


def du(path: str) -> int:
    return int(sh("du", "-sb", path).stdout.split()[0])


def med(xs):
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    runs = args.runs
    if not shutil.which("restic"):
        raise SystemExit("restic is not installed: run bench/setup.sh")
    work = os.path.join(WORK, "incremental")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    mnt = os.path.join(work, "mnt")
    disk0 = os.path.join(work, "disk0.raw")
    shutil.copyfile(build("I", False), disk0)
    disk1, disk2 = os.path.join(work, "disk1.raw"), os.path.join(work, "disk2.raw")
    shutil.copyfile(disk0, disk1)
    add_files(disk1, mnt, 1)
    shutil.copyfile(disk1, disk2)
    add_files(disk2, mnt, 2)
    p = lambda n: os.path.join(work, n)  # noqa: E731
    subprocess.run(imgkit("capture", disk0, p("full0.imgk")), shell=True, check=True)
    repo0 = p("restic-repo0")
    repo_version = None

    # -- capture: full, incremental, unchanged, restic (alternating) ---------------------------------
    rows = {k: [] for k in ("full", "inc", "same", "restic")}
    restic_added = []
    for _ in range(runs):
        # A new restic repository each run: restic draws its chunker polynomial at `init`, and what
        # the second backup adds moves with it (7 to 15 MiB for the same change in trial runs).
        shutil.rmtree(repo0, ignore_errors=True)
        sh("restic", "-r", repo0, "init", env=RESTIC_ENV)
        with open(disk0, "rb") as f:
            subprocess.run(["restic", "-r", repo0, "backup", "--stdin", "--stdin-filename", "disk.raw"], stdin=f,
                           check=True, capture_output=True, env=RESTIC_ENV)
        repo_version = re.search(r"version (\d+)", sh("restic", "-r", repo0, "cat", "config", env=RESTIC_ENV)
                                 .stdout.replace('"version": ', "version "))
        for f in (p("full1.imgk"), p("inc1.imgk"), p("same.imgk")):
            if os.path.exists(f):
                os.unlink(f)
        rows["full"].append(measured(imgkit("capture", disk1, p("full1.imgk")), p("full1.imgk")))
        rows["inc"].append(measured(imgkit("capture", disk1, p("inc1.imgk"), "--base", p("full0.imgk")),
                                    p("inc1.imgk")))
        rows["same"].append(measured(imgkit("capture", disk0, p("same.imgk"), "--base", p("full0.imgk")),
                                     p("same.imgk")))
        repo = p("restic-repo")
        shutil.rmtree(repo, ignore_errors=True)
        shutil.copytree(repo0, repo)
        wall, cpu, grown, added = restic_backup(repo, disk1)
        rows["restic"].append((wall, cpu, grown))
        restic_added.append(added)
    # correctness: the incremental restores what a full capture restores
    sh(*IMGKIT_ARGV, "restore", p("inc1.imgk"), p("check-inc.raw"), "--yes", "--progress", "none")
    sh(*IMGKIT_ARGV, "restore", p("full1.imgk"), p("check-full.raw"), "--yes", "--progress", "none")
    same_restore = sha256_of(p("check-inc.raw")) == sha256_of(p("check-full.raw"))
    os.unlink(p("check-full.raw"))

    t_full = med([s.wall for s in rows["full"]])
    t_inc = med([s.wall for s in rows["inc"]])
    t_same = med([s.wall for s in rows["same"]])
    t_restic = med([r[0] for r in rows["restic"]])
    inc_size = med([s.out_bytes for s in rows["inc"]])
    same_size = med([s.out_bytes for s in rows["same"]])
    restic_size = med([r[2] for r in rows["restic"]])
    lines = [f"## Incremental capture (input I: 1 GiB GPT disk, ext4 ~250 MiB used, stale free space; "
             f"+8 MiB of new files), {runs} alternating runs, cold page cache, medians", "",
             "| what | wall s | user+sys s | peak RSS MiB | stored MiB | check |", "|---|---:|---:|---:|---:|---|"]
    for name, label in (("full", "imgkit capture disk1 (full, fs-aware)"),
                        ("inc", "imgkit capture disk1 --base full0"),
                        ("same", "imgkit capture disk0 --base full0 (unchanged)")):
        r = rows[name]
        lines.append(f"| {label} | {med([s.wall for s in r]):.2f} | {med([s.cpu for s in r]):.2f} | "
                     f"{med([s.maxrss_kib for s in r]) / 1024:.0f} | {med([s.out_bytes for s in r]) / MiB:.2f} | "
                     + ("restores = full's restore" if name == "inc" and same_restore else
                        "MISMATCH" if name == "inc" else "") + " |")
    lines.append(f"| restic backup --stdin disk1 (2nd backup, repo v{repo_version.group(1) if repo_version else '?'}) "
                 f"| {t_restic:.2f} | {med([r[1] for r in rows['restic']]):.2f} | - | {restic_size / MiB:.2f} "
                 f"(repo growth, median; per run: {', '.join(f'{r[2] / MiB:.1f}' for r in rows['restic'])}) | |")
    lines.append(f"| (restic's own words, last run) | | | | {restic_added[-1]} | |")
    lines += ["", "| target | measured | verdict |", "|---|---:|---|",
              f"| incremental stored ≤ 1.0× restic's addition | {inc_size / restic_size:.2f}× | "
              f"{'met' if inc_size <= restic_size else 'NOT met'} |",
              f"| incremental time ≤ 0.6× full fs-aware capture | {t_inc / t_full:.2f}× | "
              f"{'met' if t_inc <= 0.6 * t_full else 'NOT met'} |",
              f"| incremental time ≤ 0.5× restic's 2nd backup | {t_inc / t_restic:.2f}× | "
              f"{'met' if t_inc <= 0.5 * t_restic else 'NOT met'} |",
              f"| unchanged disk: child ≤ 1 MiB | {same_size / MiB:.3f} MiB | {'met' if same_size <= MiB else 'NOT met'} |",
              f"| unchanged disk: time ≤ 0.4× full capture | {t_same / t_full:.2f}× | "
              f"{'met' if t_same <= 0.4 * t_full else 'NOT met'} |", ""]

    # -- what the chunk size costs ------------------------------------------------------------------
    lines += ["### What the chunk size costs (incremental of disk1 against disk0, stored bytes)", "",
              "| chunk size | full0 MiB | incremental MiB | vs restic's addition |", "|---|---:|---:|---:|"]
    for cs in ("2M", "256K", "64K"):
        f0, i1 = p(f"full0-{cs}.imgk"), p(f"inc1-{cs}.imgk")
        subprocess.run(imgkit("capture", disk0, f0, "--chunk-size", cs), shell=True, check=True)
        subprocess.run(imgkit("capture", disk1, i1, "--base", f0), shell=True, check=True)
        lines.append(f"| {cs} | {os.path.getsize(f0) / MiB:.1f} | {os.path.getsize(i1) / MiB:.2f} | "
                     f"{os.path.getsize(i1) / restic_size:.2f}× |")
        os.unlink(f0)
        os.unlink(i1)
    lines.append("")

    # -- chain reads vs the consolidated image ---------------------------------------------------------
    subprocess.run(imgkit("capture", disk2, p("inc2.imgk"), "--base", p("inc1.imgk")), shell=True, check=True)
    subprocess.run(imgkit("consolidate", p("inc2.imgk"), p("cons2.imgk")), shell=True, check=True)
    chain_rows = {"restore chain": [], "restore consolidated": [], "seq read chain": [], "seq read consolidated": [],
                  "random read chain": [], "random read consolidated": []}
    m1, m2 = p("m-chain"), p("m-cons")
    os.makedirs(m1)
    os.makedirs(m2)
    sh(*IMGKIT_ARGV, "mount", p("inc2.imgk"), m1)
    sh(*IMGKIT_ARGV, "mount", p("cons2.imgk"), m2)
    try:
        for run in range(runs):
            order = (("chain", p("inc2.imgk"), m1), ("consolidated", p("cons2.imgk"), m2))
            for label, image, mp in order[::1 if run % 2 == 0 else -1]:  # alternate who goes first
                out = p("restored.raw")
                if os.path.exists(out):
                    os.unlink(out)
                chain_rows[f"restore {label}"].append(measured(imgkit("restore", image, out, "--yes")))
                chain_rows[f"seq read {label}"].append(
                    measured(f"dd if={mp}/disk.raw of=/dev/null bs=1M status=none"))
                chain_rows[f"random read {label}"].append(measured(
                    [sys.executable, "-c", RANDOM_READS, f"{mp}/disk.raw"]))
        # fs-aware images blank free blocks, so the reference is a restore of a fresh full capture of disk2
        subprocess.run(imgkit("capture", disk2, p("fresh2.imgk")), shell=True, check=True)
        sh(*IMGKIT_ARGV, "restore", p("fresh2.imgk"), p("fresh2.raw"), "--yes", "--progress", "none")
        same_mount = sha256_of(f"{m1}/disk.raw") == sha256_of(f"{m2}/disk.raw") == sha256_of(p("fresh2.raw"))
    finally:
        sh(*IMGKIT_ARGV, "umount", m1)
        sh(*IMGKIT_ARGV, "umount", m2)
    boot = boot_rows(work, max(runs, 11))  # ~0.7 s each: more runs against QEMU's start-up noise
    lines += ["### A 3-link chain (full0 <- inc1 <- inc2) read like its consolidated image", "",
              "| operation | chain s | consolidated s | ratio | target ≤ 1.1× |", "|---|---:|---:|---:|---|"]
    for op in ("restore", "seq read", "random read"):
        a = med([s.wall for s in chain_rows[f"{op} chain"]])
        b = med([s.wall for s in chain_rows[f"{op} consolidated"]])
        lines.append(f"| {op} | {a:.2f} | {b:.2f} | {a / b:.2f} | {'met' if a <= 1.1 * b else 'NOT met'} |")
    a, b = med(boot["chain"]), med(boot["consolidated"])
    lines.append(f"| boot-check (tiny fixture, 3 links) | {a:.2f} | {b:.2f} | {a / b:.2f} | "
                 f"{'met' if a <= 1.1 * b else 'NOT met'} |")
    lines += ["", f"checks: mount disk.raw of chain = consolidated = restore of a fresh capture of disk2: {same_mount}; "
              f"boot-check passed every run: {boot['ok']}", ""]
    publish("incremental.md", "\n".join(lines))


# 2000 random 4 KiB reads (seeded): what a VM or a file browser does to a mounted image.
RANDOM_READS = """
import os, random, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
rng = random.Random(7)
for _ in range(2000):
    os.pread(fd, 4096, rng.randrange(size // 4096) * 4096)
"""


def boot_rows(work: str, runs: int) -> dict:
    from imgkit.testing import fixtures
    tiny = fixtures.build_fixture("tiny-bios")
    d = os.path.join(work, "boot")
    os.makedirs(d)
    disk = os.path.join(d, "tiny.img")
    shutil.copyfile(tiny, disk)
    subprocess.run(imgkit("capture", disk, f"{d}/t0.imgk", "--sector-by-sector", "--chunk-size", "64K"),
                   shell=True, check=True)
    for n in (1, 2):
        with open(disk, "r+b") as f:
            f.seek((4 + n) * MiB)
            f.write(random.Random(n).randbytes(300_000))
        subprocess.run(imgkit("capture", disk, f"{d}/t{n}.imgk", "--sector-by-sector", "--base", f"{d}/t{n - 1}.imgk"),
                       shell=True, check=True)
    subprocess.run(imgkit("consolidate", f"{d}/t2.imgk", f"{d}/tc.imgk"), shell=True, check=True)
    out = {"chain": [], "consolidated": [], "ok": True}
    env = {**os.environ, "IMGKIT_ACCEL": "tcg"}
    for run in range(runs):
        order = (("chain", f"{d}/t2.imgk"), ("consolidated", f"{d}/tc.imgk"))
        for label, image in order[::1 if run % 2 == 0 else -1]:
            t0 = time.monotonic()
            proc = subprocess.run([*IMGKIT_ARGV, "boot-check", image, "--timeout", "60"], capture_output=True,
                                  env=env)
            out[label].append(time.monotonic() - t0)
            out["ok"] = out["ok"] and proc.returncode == 0
    return out


if __name__ == "__main__":
    sys.exit(main())
