"""Convert, side by side with qemu-img on the same disk (issue 14 targets), median wall-time ratios:
  imgk -> qcow2   <= 1.0x `qemu-img convert` of the same disk from a zstd qcow2 (the peer doing the same
                  work: a compressed source), <= 1.5x `qemu-img convert` from the raw disk in page cache
  imgk -> vhd     the same two rows and targets
  imgk -> raw     the same two rows and targets
  qcow2 -> imgk   <= 0.7x `qemu-img convert -c -o compression_type=zstd` of the same qcow2
  peak extra disk space during any imgkit conversion <= 64 MiB beyond the output.
Every output is checked: `qemu-img compare` against the raw disk, `qemu-img check` for qcow2.

Durability: by default imgkit fsyncs its output before renaming it into place (a conversion that
reports success is on the disk); `qemu-img convert` does not sync (its output is still being written
back when it exits). So each imgk -> FMT section has two imgkit rows, each against its like:
  imgkit convert --no-sync (the page cache, no fsync: qemu-img's behaviour) against the peers as
      users run them: the issue's targets apply to these ratios;
  imgkit convert (durable) against the "+ sync" peers (the peer followed by `sync` of its output):
      the like-for-like durable figure, no target.
A sync (not timed) before each run, so that no run pays for an earlier run's writeback.

Memory: these machines are VMs whose balloon hands free memory back to the host; the first use of
such memory by the page cache costs ~1.5 s of CPU per GiB (a 1 GiB page-cache write of 2 MiB
pieces from Python: 1.2-1.9 s of CPU after 6 s idle, 0.14-0.20 s right after 1.5 GiB of page cache
was written and freed), which landed on whichever page-cache writer (imgkit --no-sync or a
qemu-img peer) happened to find cold memory: ratios moved 2x from run to run. So before each run
(not timed) PRIME bytes are written into a scratch file and deleted, as memory on an ordinary
machine is: resident. Runs that write through O_DIRECT (imgkit's durable rows) do not care.

Peak extra disk: each imgkit run gets its own TMPDIR inside the output directory (so other
processes' temp files on a shared machine do not count), and a sampler adds up the allocated bytes
of every file in the output directory every 20 ms; "extra" is the peak minus the allocation once
the run is done (the destination's temp name counts as output).

Usage: bench/bench_convert.py [--quick] [--runs N] [--inputs F A]
Run as root from the repo root with the venv's python (./.venv/bin/python bench/bench_convert.py).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import input_args, IMGKIT, alternate, prime_memory, publish, remover, run_measured, table  # noqa: E402
from inputs import WORK, build  # noqa: E402



def _allocated_under(paths) -> int:
    total = 0
    for top in paths:
        for root, _dirs, files in os.walk(top):
            for n in files:
                try:
                    total += os.lstat(os.path.join(root, n)).st_blocks * 512
                except OSError:
                    pass
    return total


def peak_extra_disk(cmd: str, out_dir: str, output: str) -> int:
    """Run cmd once with TMPDIR inside out_dir, sampling the allocation under out_dir; peak minus
    what is left when it is done."""
    peak, stop = [0], threading.Event()
    tmp = os.path.join(out_dir, "tmp")
    os.makedirs(tmp, exist_ok=True)

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _allocated_under([out_dir]))
            time.sleep(0.02)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        run_measured(cmd, output, env=dict(os.environ, TMPDIR=tmp))
    finally:
        stop.set()
        t.join()
    return max(0, peak[0] - _allocated_under([out_dir]))


def bench_input(name: str, quick: bool, runs: int) -> str:
    src = build(name, quick)
    out_dir = os.path.join(WORK, "out-convert")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    o = lambda n: os.path.join(out_dir, n)  # noqa: E731
    # Fixtures for the runs (not timed): the imgk, a plain and a zstd-compressed qcow2 of the same disk.
    src_imgk, src_qcow2, src_zqcow2 = o("src.imgk"), o("src.qcow2"), o("src.zstd.qcow2")
    # Sector by sector: the same bytes as the raw disk the peers read (capture is filesystem-aware by default).
    subprocess.run(f"{IMGKIT} capture --sector-by-sector --progress none {src} {src_imgk}", shell=True, check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, src_qcow2], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zstd",
                    src, src_zqcow2], check=True)

    text = f"## input {name} ({os.path.getsize(src) / 2**30:.2f} GiB, {'quick' if quick else 'full'})\n\n"

    def to_format(ext: str, driver: str, opts: str) -> tuple:
        o_opt = f"-o {opts} " if opts else ""
        rows = {
            f"imgkit convert --no-sync imgk->{ext}": (f"{IMGKIT} convert --no-sync --progress none --force {src_imgk} "
                                                      f"{o('n.' + ext)}", o("n." + ext), remover(o("n." + ext))),
            f"imgkit convert imgk->{ext}": (f"{IMGKIT} convert --progress none --force {src_imgk} {o('a.' + ext)}",
                                            o("a." + ext), remover(o("a." + ext))),
            f"qemu-img convert zstd-qcow2->{ext}": (f"qemu-img convert -f qcow2 -O {driver} {o_opt}{src_zqcow2} "
                                                    f"{o('b.' + ext)}", o("b." + ext), remover(o("b." + ext))),
            f"qemu-img convert raw->{ext}": (f"qemu-img convert -f raw -O {driver} {o_opt}{src} {o('c.' + ext)}",
                                             o("c." + ext), remover(o("c." + ext))),
            # imgkit fsyncs what it writes before renaming it into place; qemu-img does not. The same
            # peers followed by a sync of their output: the same durable result as imgkit's.
            f"(info) qemu-img convert zstd-qcow2->{ext} + sync": (f"qemu-img convert -f qcow2 -O {driver} {o_opt}"
                                                                  f"{src_zqcow2} {o('j.' + ext)} && sync {o('j.' + ext)}",
                                                                  o("j." + ext), remover(o("j." + ext))),
            f"(info) qemu-img convert raw->{ext} + sync": (f"qemu-img convert -f raw -O {driver} {o_opt}{src} "
                                                           f"{o('i.' + ext)} && sync {o('i.' + ext)}", o("i." + ext),
                                                           remover(o("i." + ext))),
        }
        fast, durable = f"imgkit convert --no-sync imgk->{ext}", f"imgkit convert imgk->{ext}"
        return (f"imgk -> {ext}", rows, f"qemu-img convert zstd-qcow2->{ext}",
                [(fast, f"qemu-img convert zstd-qcow2->{ext}", 1.0), (fast, f"qemu-img convert raw->{ext}", 1.5),
                 (durable, f"(info) qemu-img convert zstd-qcow2->{ext} + sync", None),
                 (durable, f"(info) qemu-img convert raw->{ext} + sync", None)])

    sections = [
        to_format("qcow2", "qcow2", "compat=1.1"),
        to_format("vhd", "vpc", "subformat=dynamic,force_size=on"),
        to_format("raw", "raw", ""),
        ("qcow2 -> imgk", {
            "imgkit convert qcow2->imgk": (f"{IMGKIT} convert --sector-by-sector --progress none --force {src_qcow2} {o('e.imgk')}",
                                           o("e.imgk"), remover(o("e.imgk"))),
            "qemu-img convert -c zstd qcow2->qcow2": (f"qemu-img convert -f qcow2 -O qcow2 -c -o "
                                                      f"compression_type=zstd {src_qcow2} {o('f.qcow2')}",
                                                      o("f.qcow2"), remover(o("f.qcow2"))),
            # The floor under imgk -> anything: decompressing and hashing every stored chunk.
            "(info) imgkit verify of the imgk": (f"{IMGKIT} verify --progress none {src_imgk}", None, None),
        }, "qemu-img convert -c zstd qcow2->qcow2",
            [("imgkit convert qcow2->imgk", "qemu-img convert -c zstd qcow2->qcow2", 0.7)]),
    ]
    summary = []
    for title, rows, baseline, comparisons in sections:
        # Every run starts with nothing dirty in the page cache: the output qemu-img leaves unwritten
        # would otherwise be written back during whichever run comes next (imgkit's, whose own
        # output must reach the disk), so a sync (not timed) before each run; then memory is primed.
        result = alternate(rows, runs, before=lambda: (os.sync(), prime_memory(out_dir)))
        for row_name, (cmd, out, _clean) in rows.items():
            result[row_name].check = check(out, src) if out else "exit 0"
        for _, out, clean in rows.values():
            if clean:
                clean()
        extra = {}
        for ours in (name for name in rows if name.startswith("imgkit")):
            extra[ours] = peak_extra_disk(rows[ours][0], out_dir, rows[ours][1])
            rows[ours][2]()
        for ours, peer, target in comparisons:
            ratio = result[ours].median("wall") / result[peer].median("wall")
            verdict = "(no target)" if target is None else "met" if ratio <= target else "MISSED"
            summary.append(f"| {ours} | {peer} | {ratio:.2f} | {'' if target is None else f'<= {target}'} | "
                           f"{verdict} | {extra[ours] / 2**20:.1f} MiB |")
        text += table(title, list(result.values()), baseline) + "\n"
    text += ("### summary (median wall-time ratio imgkit / peer)\n\n| conversion | peer | ratio | target | | "
             "peak extra disk |\n|---|---|---:|---:|---|---:|\n" + "\n".join(summary) + "\n\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    return text


def check(out: str, src: str) -> str:
    """The output holds the same disk: qemu-img compare for foreign outputs, imgkit's own for imgk."""
    if out.endswith(".imgk"):
        raw = out + ".check.raw"
        subprocess.run(f"{IMGKIT} convert --progress none {out} {raw}", shell=True, check=True)
        same = subprocess.run(["cmp", "-s", raw, src]).returncode == 0
        os.unlink(raw)
        return "identical" if same else "DIFFERENT"
    fmt = {".raw": "raw", ".vhd": "vpc"}.get(os.path.splitext(out)[1], "qcow2")
    same = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", fmt, src, out]).returncode == 0
    if fmt == "qcow2":
        same = same and subprocess.run(["qemu-img", "check", "-q", "-f", "qcow2", out]).returncode == 0
    return ("identical" + (", check ok" if fmt == "qcow2" else "")) if same else "DIFFERENT"


def main() -> None:
    args = input_args(__doc__, ["F"], quick_runs=3)
    report = "".join(bench_input(n, args.quick, args.runs) for n in args.inputs)
    publish("convert.md", report)


if __name__ == "__main__":
    main()
