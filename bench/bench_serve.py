"""Benchmark of issue 17 (serve / run), side by side with the peers, alternating, median ratios:

1. `imgkit run` of the linux-bios fixture captured as imgk, to its boot marker, against QEMU booting
   the same raw disk directly (same accelerator, memory and devices; snapshot=on so it is not
   written). Target: <= 1.1x.
2. Reading the whole export with nbdcopy (4 connections, into null:): `imgkit serve` of disk F as
   imgk against qemu-storage-daemon's NBD export of the same disk as a zstd qcow2. Target: >= 1.0x
   (imgkit's speed over qsd's: qsd time / imgkit time). Page cache dropped before each read.

Usage: python bench/bench_serve.py [--runs N] [--quick]   (results: bench/results/serve.md)
"""
from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import inputs  # noqa: E402
from harness import IMGKIT_ARGV, drop_caches, publish  # noqa: E402

MARKER = b"IMGKIT-BOOT-OK"


def time_to_marker(argv: list[str], env=None, timeout: float = 300) -> float:
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    buf = b""
    try:
        while True:
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"no boot marker within {timeout} s: {argv}")
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if not ready:
                continue
            data = os.read(proc.stdout.fileno(), 65536)
            if not data:
                raise RuntimeError(f"exited without the boot marker: {argv}")
            buf = (buf + data)[-4096:]
            if MARKER in buf:
                return time.monotonic() - start
    finally:
        proc.kill()
        proc.wait()


def bench_boot(runs: int, work: str) -> str:
    from imgkit.testing.fixtures import build_fixture
    raw = build_fixture("linux-bios")
    imgk = os.path.join(work, "linux-bios.imgk")
    subprocess.run(IMGKIT_ARGV + ["capture", raw, imgk, "--progress", "none"], check=True, capture_output=True)
    env = dict(os.environ, IMGKIT_ACCEL="tcg")
    run_argv = IMGKIT_ARGV + ["run", imgk, "--memory", "256M", "--accel", "tcg"]
    qemu_argv = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-accel", "tcg,tb-size=256", "-m", "256M",
                 "-smp", "1", "-display", "none", "-vga", "std", "-nic", "none", "-serial", "stdio",
                 "-drive", f"file={raw},format=raw,if=ide,snapshot=on", "-machine", "pc"]
    times = {"imgkit run (imgk)": [], "qemu (raw disk)": []}
    for _ in range(runs):
        times["qemu (raw disk)"].append(time_to_marker(qemu_argv, env))
        times["imgkit run (imgk)"].append(time_to_marker(run_argv, env))
    base = statistics.median(times["qemu (raw disk)"])
    lines = ["### Boot of linux-bios to its marker (TCG, 256 MiB)", "",
             "| how | median s | ratio vs raw | runs (s) |", "|---|---:|---:|---|"]
    for name, ts in times.items():
        lines.append(f"| {name} | {statistics.median(ts):.2f} | {statistics.median(ts) / base:.2f} | "
                     + ", ".join(f"{t:.1f}" for t in ts) + " |")
    return "\n".join(lines) + "\n"


def _start_json_server(argv) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = []
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server exited: {argv}")
        lines.append(line)
        if line.startswith("}"):
            return proc, json.loads("".join(lines))


def bench_read(runs: int, work: str, quick: bool) -> str:
    disk = inputs.build("F", quick=True if quick else True)  # the 1.2 GiB quick disk F: the session's budget
    imgk = os.path.join(work, "F.imgk")
    qcow2 = os.path.join(work, "F.qcow2")
    if not os.path.exists(imgk):
        subprocess.run(IMGKIT_ARGV + ["capture", disk, imgk, "--progress", "none"], check=True, capture_output=True)
    if not os.path.exists(qcow2):
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zstd",
                        disk, qcow2], check=True)
    names = ("imgkit serve (imgk)", "qemu-storage-daemon (zstd qcow2)")
    times = {k: [] for k in names}
    cpu = {k: [] for k in names}
    qsd_sock = os.path.join(work, "qsd.sock")
    for _ in range(runs):
        for name in names:  # each server started fresh per read: no decoded data kept from a previous run
            drop_caches()
            if name.startswith("imgkit"):
                proc, info = _start_json_server(IMGKIT_ARGV + ["serve", imgk, "--json"])
                uri = info["uri"]
            else:
                if os.path.exists(qsd_sock):
                    os.unlink(qsd_sock)
                proc = subprocess.Popen(["qemu-storage-daemon",
                                         "--blockdev", json.dumps({"driver": "qcow2", "node-name": "d", "read-only": True,
                                                                   "file": {"driver": "file", "filename": qcow2}}),
                                         "--nbd-server", f"addr.type=unix,addr.path={qsd_sock}",
                                         "--export", "type=nbd,id=e,node-name=d,name="],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                while not os.path.exists(qsd_sock):
                    time.sleep(0.02)
                uri = f"nbd+unix:///?socket={qsd_sock}"
            try:
                before = _cpu_of(proc.pid)
                start = time.monotonic()
                subprocess.run(["nbdcopy", "--connections=4", uri, "null:"], check=True)
                times[name].append(time.monotonic() - start)
                cpu[name].append(_cpu_of(proc.pid) - before)
            finally:
                proc.terminate()
                proc.wait()
    base = statistics.median(times["qemu-storage-daemon (zstd qcow2)"])
    size = os.path.getsize(disk)
    lines = [f"### Whole export read by nbdcopy (4 connections, null:), disk F {size / 2**30:.2f} GiB", "",
             "| server | median s | speed vs qsd (qsd s / this s) | server CPU s | runs (s) |",
             "|---|---:|---:|---:|---|"]
    for name, ts in times.items():
        lines.append(f"| {name} | {statistics.median(ts):.2f} | {base / statistics.median(ts):.2f} | "
                     f"{statistics.median(cpu[name]):.2f} | " + ", ".join(f"{t:.2f}" for t in ts) + " |")
    return "\n".join(lines) + "\n"


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["boot", "read"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=inputs.WORK) as work:
        parts = [f"## bench_serve ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, runs={args.runs}, "
                 f"alternating; `python bench/bench_serve.py --runs {args.runs}`)", ""]
        if args.only in (None, "read"):
            parts.append(bench_read(args.runs, inputs.WORK, args.quick))
        if args.only in (None, "boot"):
            parts.append(bench_boot(args.runs, work))
        publish("serve.md", "\n".join(parts))


if __name__ == "__main__":
    main()
