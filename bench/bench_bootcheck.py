#!/usr/bin/env python3
"""Benchmark `imgkit boot-check` under TCG against the bare-QEMU floor, side by side, alternating.

Rows, per fixture (vm-fixtures, built and cached on first use):
  qemu-bare     qemu-system-x86_64 -snapshot on the raw file until the guest powers off (the floor: no
                overlay set-up, no console matching, no imgkit start-up)
  raw           imgkit boot-check on the raw file
  imgk          imgkit boot-check on an imgk capture (streamed over NBD by imgkit)
  imgk-enc      the same, encrypted (AES-256-GCM, Argon2id key derivation included)
Reported: median wall time end to end, median time to the match (imgkit's own seconds_to_result),
user+sys CPU, peak RSS, and the ratios imgk/raw (target <= 1.2) and raw/qemu-bare.

Targets (docs/boot-check.md): tiny <= 3 s end to end; Linux fixtures <= 60 s; imgk/raw <= 1.2.
Usage: python bench/bench_bootcheck.py [--quick] [--runs N] [--fixtures tiny-bios,linux-bios,...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from imgkit.testing.fixtures import build_fixture, fixture_info  # noqa: E402

PASSWORD = "bench password"
ENV = dict(os.environ, IMGKIT_ACCEL="tcg", IMGKIT_PASSWORD=PASSWORD)
IMGKIT = [sys.executable, "-m", "imgkit"]


def measured(argv: list[str], timeout: float = 600) -> dict:
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    code = os.waitstatus_to_exitcode(status)
    doc = None
    try:
        doc = json.loads(out) if out.strip().startswith(b"{") else None
    except ValueError:
        pass
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_mib": ru.ru_maxrss / 1024, "code": code,
            "match": doc.get("seconds_to_result") if doc else None, "passed": doc.get("passed") if doc else
            (b"IMGKIT-BOOT-OK" in out), "err": err.decode(errors="replace")[-300:]}


def bare_qemu(path: str, info, timeout: float) -> list[str]:
    argv = ["timeout", str(int(timeout)), "qemu-system-x86_64", "-nodefaults", "-accel", "tcg", "-m", "512M",
            "-display", "none", "-vga", "std", "-nic", "none", "-no-reboot", "-serial", "stdio"]
    if info.firmware == "uefi":
        vars_copy = os.path.join(tempfile.gettempdir(), "imgkit-bench-vars.fd")
        shutil.copyfile("/usr/share/OVMF/OVMF_VARS.fd", vars_copy)
        argv += ["-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd",
                 "-drive", f"if=pflash,format=raw,file={vars_copy}"]
    if info.media == "cdrom":
        argv += ["-drive", f"file={path},format=raw,media=cdrom,readonly=on"]
    else:
        argv += ["-drive", f"file={path},format=raw,if=ide,snapshot=on"]
    return argv


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer runs (tiny x5, Linux x2)")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--fixtures", default="tiny-bios,linux-bios,linux-uefi,iso")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="imgkit-bench-boot-")
    report = []
    try:
        for name in args.fixtures.split(","):
            info = fixture_info(name)
            raw = build_fixture(name)
            imgk = os.path.join(work, f"{name}.imgk")
            enc = os.path.join(work, f"{name}-enc.imgk")
            subprocess.run(IMGKIT + ["capture", raw, imgk], check=True, env=ENV, capture_output=True)
            subprocess.run(IMGKIT + ["capture", "--encrypt", raw, enc], check=True, env=ENV, capture_output=True)
            tiny = name == "tiny-bios"
            runs = args.runs or ((5 if tiny else 2) if args.quick else (9 if tiny else 3))
            timeout = 30 if tiny else 240
            rows = {"qemu-bare": bare_qemu(raw, info, timeout),
                    "raw": IMGKIT + ["boot-check", raw, "--json", "--timeout", str(timeout)],
                    "imgk": IMGKIT + ["boot-check", imgk, "--json", "--timeout", str(timeout)],
                    "imgk-enc": IMGKIT + ["boot-check", enc, "--json", "--timeout", str(timeout)]}
            samples = {k: [] for k in rows}
            for _ in range(runs):
                for k, argv in rows.items():  # alternating: noise from the shared machine hits every row
                    samples[k].append(measured(argv, timeout + 30))
            med = {k: {m: statistics.median([s[m] for s in v if s[m] is not None] or [float("nan")])
                       for m in ("wall", "cpu", "rss_mib", "match")} for k, v in samples.items()}
            ok = {k: sum(1 for s in v if s["passed"]) for k, v in samples.items()}
            print(f"\n### {name} ({info.firmware}, {info.media}), {runs} alternating runs, TCG\n")
            print("| row | wall s (median) | time to match s | user+sys s | peak RSS MiB | passed | ratio vs raw |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for k in rows:
                m = med[k]
                print(f"| {k} | {m['wall']:.2f} | {m['match']:.2f} | {m['cpu']:.2f} | {m['rss_mib']:.0f} | "
                      f"{ok[k]}/{runs} | {m['wall'] / med['raw']['wall']:.2f} |")
            # Per-run ratios (paired, same moment of machine noise), then their median.
            pair = [a["wall"] / b["wall"] for a, b in zip(samples["imgk"], samples["raw"])]
            pair_enc = [a["wall"] / b["wall"] for a, b in zip(samples["imgk-enc"], samples["raw"])]
            print(f"\nmedian paired ratio imgk/raw = {statistics.median(pair):.2f}, "
                  f"imgk-enc/raw = {statistics.median(pair_enc):.2f}, "
                  f"raw/qemu-bare = {med['raw']['wall'] / med['qemu-bare']['wall']:.2f}")
            report.append({"fixture": name, "median": med, "imgk_over_raw": statistics.median(pair),
                           "imgk_enc_over_raw": statistics.median(pair_enc)})
            for k, v in samples.items():
                bad = [s for s in v if not s["passed"]]
                if bad:
                    print(f"  {k}: {len(bad)} run(s) did not pass: {bad[0]['err']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "bootcheck.json"), "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
