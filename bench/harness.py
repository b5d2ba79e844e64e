"""Shared benchmark machinery: run commands side by side, alternating, and report median ratios with
wall time, user+sys CPU, peak RSS and output size (../shared/guides/benchmarks.md)."""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

IMGKIT_ARGV = [sys.executable, "-m", "imgkit"]  # this interpreter's imgkit (the venv's)
IMGKIT = " ".join(IMGKIT_ARGV)  # the same, for shell command lines


def remover(*paths: str):
    """A clean-up step for alternate(): delete these files or directories if they exist."""
    def clean():
        for p in paths:
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.unlink(p)
    return clean


def input_args(doc: str, inputs: list[str], quick_runs: int = 2, runs: int = 3):
    """The command line the per-input benchmarks share: --quick (1 GiB inputs), --runs, --inputs.
    Returns the parsed arguments with .runs filled in."""
    import argparse
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"1 GiB inputs, {quick_runs} runs")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--inputs", nargs="*", default=inputs)
    args = ap.parse_args()
    args.runs = args.runs or (quick_runs if args.quick else runs)
    return args


def drop_caches(level: int = 3) -> None:
    """Give every tool the same cold page cache (1: page cache only; 3: dentries and inodes too)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write(f"{level}\n")
    except OSError:
        pass


@dataclass
class Sample:
    wall: float
    cpu: float
    maxrss_kib: int
    out_bytes: int


@dataclass
class Row:
    name: str
    samples: list[Sample] = field(default_factory=list)
    check: str = ""

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)


def run_measured(cmd: str | list, out_path: str | None = None, env=None) -> Sample:
    """Run one command (a shell string for pipelines) and measure it with wait4 (its children included)."""
    shell = isinstance(cmd, str)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, shell=shell, env=env, executable="/bin/bash" if shell else None,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark command failed ({proc.returncode}): {cmd}\n{err}")
    out = 0
    if out_path:
        out = sum(os.path.getsize(p) for p in [out_path] + [f"{out_path}.{i:03d}" for i in range(2, 1000)]
                  if os.path.exists(p))
    return Sample(wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss, out)


PRIME = 1280 << 20  # more than any output here writes into the page cache


def prime_memory(out_dir: str) -> None:
    """Write PRIME bytes into the page cache and delete them, untimed, before a run. These machines are
    VMs whose balloon hands free memory back to the host; the page cache's first use of such memory
    costs ~1.5 s of CPU per GiB, which lands on whichever tool meets cold memory first (ratios moved
    2x between runs: bench_convert.py's docstring, Memory). Primed, memory is resident, as on an
    ordinary machine."""
    path = os.path.join(out_dir, "prime.tmp")
    buf = bytes(2 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(PRIME // len(buf)):
            os.write(fd, buf)
    finally:
        os.close(fd)
        os.unlink(path)


def alternate(rows: dict[str, tuple], runs: int, before=None) -> dict[str, Row]:
    """rows: name -> (command, output path, cleanup callable or None). Runs each in turn, `runs` times."""
    result = {name: Row(name) for name in rows}
    for _ in range(runs):
        for name, (cmd, out, cleanup) in rows.items():
            if cleanup:
                cleanup()
            if before:
                before()
            result[name].samples.append(run_measured(cmd, out))
    return result


def table(title: str, rows: list[Row], baseline: str) -> str:
    base = next(r for r in rows if r.name == baseline)
    lines = [f"### {title}", "",
             f"| tool | wall s (median) | ratio vs {baseline} | user+sys s | peak RSS MiB | output MiB | check |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.median('wall'):.2f} | {r.median('wall') / base.median('wall'):.2f} | "
                     f"{r.median('cpu'):.2f} | {r.median('maxrss_kib') / 1024:.0f} | "
                     f"{r.median('out_bytes') / 2**20:.1f} | {r.check} |")
    return "\n".join(lines) + "\n"


def sha256_of(path: str) -> str:
    return subprocess.run(["sha256sum", path], capture_output=True, text=True, check=True).stdout.split()[0]


def publish(name: str, report: str) -> None:
    """Print a benchmark report and keep it as bench/results/NAME (the README cites these files)."""
    print(report)
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, name), "w") as f:
        f.write(report)
