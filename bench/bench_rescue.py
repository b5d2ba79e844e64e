#!/usr/bin/env python3
"""Benchmark the rescue ISO: build time (cold / package cache / system layer cached), boot to the
banner under TCG (BIOS and UEFI, boot-check), and a capture inside the booted ISO against the same
capture on the host (alternating runs, medians).

Rows:
  build-cold      empty cache: packages from the Debian mirror, wheels from PyPI      (target <= 10 min)
  build-pkgcache  the package cache only: the system layer rebuilt offline          (target <= 3 min)
  build-cached    system layer cached: the imgkit layer and the ISO only
  reproducible    sha256 of the cold and the package-cache ISO equal (two full builds)
  boot-bios/uefi  imgkit boot-check to the banner, seconds to the match            (target <= 60 s)
  capture-iso     `imgkit capture` of the linux-bios fixture (48 MiB) inside the ISO (its log's time)
  capture-host    the same capture on the host; ratio iso/host                      (target <= 2x)

Usage: python bench/bench_rescue.py [--runs N] [--skip-cold] [--out bench/results/rescue.md]
Needs root. The cold build downloads ~140 MB; --skip-cold leaves it out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from imgkit.rescue.build import build_rescue_iso, cached_rescue_iso, default_cache  # noqa: E402
from imgkit.rescue.vm import run_iso  # noqa: E402
from imgkit.testing.fixtures import build_fixture  # noqa: E402
from tests.rescue_helpers import ext4_job_disk, ext4_read, job_text  # noqa: E402

ENV = dict(os.environ, IMGKIT_ACCEL="tcg")
IMGKIT = [sys.executable, "-m", "imgkit"]


def timed_build(cache: str, out: str) -> dict:
    start = time.monotonic()
    doc = build_rescue_iso(out, cache, force=True, emit=lambda s: print("   ", s, file=sys.stderr, flush=True))
    doc["wall"] = time.monotonic() - start
    return doc


def builds(work: str, skip_cold: bool) -> list[tuple[str, str]]:
    rows, shas = [], {}
    main_cache = default_cache()
    if not skip_cold:
        cold = os.path.join(work, "cache-cold")
        d = timed_build(cold, os.path.join(work, "cold.iso"))
        rows.append(("build-cold", f"{d['wall']:.0f} s (target <= 600 s), ISO {d['size'] / 2**20:.1f} MiB"))
        shas["cold"] = d["sha256"]
        shutil.rmtree(cold)
    warm = os.path.join(work, "cache-warm")
    os.makedirs(warm)
    for sub in ("debs", "wheels"):  # the package cache only, no system layer
        shutil.copytree(os.path.join(main_cache, sub), os.path.join(warm, sub))
    d = timed_build(warm, os.path.join(work, "warm.iso"))
    rows.append(("build-pkgcache", f"{d['wall']:.0f} s (target <= 180 s), ISO {d['size'] / 2**20:.1f} MiB"))
    shas["pkgcache"] = d["sha256"]
    d = timed_build(warm, os.path.join(work, "again.iso"))
    rows.append(("build-cached", f"{d['wall']:.1f} s (system layer cached)"))
    shas["cached"] = d["sha256"]
    shutil.rmtree(warm)
    same = len(set(shas.values())) == 1
    rows.append(("reproducible", f"{'yes' if same else 'NO'}: " + ", ".join(f"{k} {v[:12]}" for k, v in shas.items())))
    return rows


def boots(iso: str) -> list[tuple[str, str]]:
    rows = []
    for fw in ("bios", "uefi"):
        start = time.monotonic()
        p = subprocess.run(IMGKIT + ["boot-check", iso, "--firmware", fw, "--timeout", "180", "--json"],
                           capture_output=True, text=True, env=ENV)
        wall = time.monotonic() - start
        doc = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
        rows.append((f"boot-{fw}", f"{doc.get('seconds_to_result', float('nan')):.1f} s to the banner "
                     f"({'passed' if doc.get('passed') else 'FAILED'}; {wall:.1f} s end to end; target <= 60 s)"))
    return rows


def captures(iso: str, work: str, runs: int) -> list[tuple[str, str]]:
    src = build_fixture("linux-bios")
    iso_t, host_t, boot_t = [], [], []
    for i in range(runs):
        # host
        img = os.path.join(work, f"host{i}.imgk")
        start = time.monotonic()
        subprocess.run(IMGKIT + ["capture", src, img, "--progress", "none"], check=True, env=ENV,
                       capture_output=True)
        host_t.append(time.monotonic() - start)
        os.unlink(img)
        # in the ISO
        disk = ext4_job_disk(os.path.join(work, f"imgkit{i}.ext4"),
                             {"imgkit-job.conf": job_text(action="capture", source="/dev/vda", image="pc.imgk").encode()})
        srccopy = os.path.join(work, "src.raw")
        shutil.copyfile(src, srccopy)
        vm = run_iso(iso, [srccopy, disk], timeout=900, accel="tcg")
        log = open(ext4_read(disk, "pc.imgk.capture.log", os.path.join(work, "log.txt"))).read()
        m = re.search(r"\$ imgkit capture .*?exit 0 after ([\d.]+) s", log, re.S)
        if not (vm.powered_off and m):
            raise SystemExit(f"in-ISO capture failed:\n{vm.console[-2000:]}\n{log}")
        iso_t.append(float(m.group(1)))
        boot_t.append(vm.seconds)
        for p in (disk, srccopy):
            os.unlink(p)
        shutil.rmtree(disk + ".d", ignore_errors=True)
    mi, mh = statistics.median(iso_t), statistics.median(host_t)
    return [("capture-host", f"{mh:.2f} s median of {runs} (imgkit capture linux-bios, 48 MiB, CLI start-up included)"),
            ("capture-iso", f"{mi:.2f} s median of {runs} in the ISO under TCG, 2 vCPUs; whole VM run "
                            f"{statistics.median(boot_t):.0f} s (boot + job + power-off)"),
            ("ratio iso/host", f"{mi / mh:.2f}x (target <= 2x)")]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--skip-builds", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "rescue.md"))
    args = ap.parse_args()
    iso = cached_rescue_iso(emit=lambda s: print("   ", s, file=sys.stderr, flush=True))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-rescue-", dir="/var/tmp") as work:
        if not args.skip_builds:
            rows += builds(work, args.skip_cold)
        rows += boots(iso)
        rows += captures(iso, work, args.runs)
    text = (f"# bench_rescue ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, TCG)\n\n"
            + "| row | result |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows))
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
