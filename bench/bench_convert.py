"""Convert, side by side with qemu-img on the same disk (issue 5 targets):
  imgk -> qcow2            <= 1.3x  `qemu-img convert -f raw -O qcow2` of the raw disk
  imgk -> qcow2 zstd       <= 1.0x  `qemu-img convert -c -o compression_type=zstd` of the raw disk
  qcow2 -> imgk            <= 1.3x  `qemu-img convert -f qcow2 -O raw`
  peak extra disk space during any imgkit conversion <= 64 MiB beyond the output.

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
from harness import input_args, IMGKIT, alternate, publish, remover, run_measured, table  # noqa: E402
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
    # Fixtures for the runs: the imgk and the qcow2 of the same disk (not timed).
    src_imgk, src_qcow2 = o("src.imgk"), o("src.qcow2")
    # Sector by sector: the same bytes as the raw disk the peers read (capture is filesystem-aware by default).
    subprocess.run(f"{IMGKIT} capture --sector-by-sector --progress none {src} {src_imgk}", shell=True, check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, src_qcow2], check=True)

    text = f"## input {name} ({os.path.getsize(src) / 2**30:.2f} GiB, {'quick' if quick else 'full'})\n\n"
    sections = [
        ("imgk -> qcow2 (uncompressed)", {
            "imgkit convert imgk->qcow2": (f"{IMGKIT} convert --progress none --force {src_imgk} {o('a.qcow2')}",
                                           o("a.qcow2"), remover(o("a.qcow2"))),
            "qemu-img convert raw->qcow2": (f"qemu-img convert -f raw -O qcow2 -o compat=1.1 {src} {o('b.qcow2')}",
                                            o("b.qcow2"), remover(o("b.qcow2"))),
            # imgkit fsyncs what it writes before renaming it into place; qemu-img does not.
            "(info) qemu-img convert raw->qcow2 + sync": (f"qemu-img convert -f raw -O qcow2 -o compat=1.1 {src} "
                                                          f"{o('i.qcow2')} && sync {o('i.qcow2')}", o("i.qcow2"),
                                                          remover(o("i.qcow2"))),
            # The floor under imgk -> anything: decompressing and hashing every stored chunk.
            "(info) imgkit verify of the imgk": (f"{IMGKIT} verify --progress none {src_imgk}", None, None),
        }, "qemu-img convert raw->qcow2", 1.3),
        ("imgk -> qcow2 (zstd)", {
            "imgkit convert --compress": (f"{IMGKIT} convert --progress none --force --compress {src_imgk} "
                                          f"{o('c.qcow2')}", o("c.qcow2"), remover(o("c.qcow2"))),
            "qemu-img convert -c zstd": (f"qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd {src} "
                                         f"{o('d.qcow2')}", o("d.qcow2"), remover(o("d.qcow2"))),
            "(info) qemu-img convert -c zstd -W -m 16": (f"qemu-img convert -W -m 16 -f raw -O qcow2 -c -o "
                                                        f"compression_type=zstd {src} {o('h.qcow2')}",
                                                        o("h.qcow2"), remover(o("h.qcow2"))),
        }, "qemu-img convert -c zstd", 1.0),
        ("qcow2 -> imgk", {
            "imgkit convert qcow2->imgk": (f"{IMGKIT} convert --progress none --force {src_qcow2} {o('e.imgk')}",
                                           o("e.imgk"), remover(o("e.imgk"))),
            "imgkit convert qcow2->imgk --level 1": (f"{IMGKIT} convert --progress none --force --level 1 "
                                                     f"{src_qcow2} {o('g.imgk')}", o("g.imgk"), remover(o("g.imgk"))),
            "qemu-img convert qcow2->raw": (f"qemu-img convert -f qcow2 -O raw {src_qcow2} {o('f.raw')}",
                                            o("f.raw"), remover(o("f.raw"))),
            "(info) qemu-img convert qcow2->raw + sync": (f"qemu-img convert -f qcow2 -O raw {src_qcow2} "
                                                          f"{o('j.raw')} && sync {o('j.raw')}", o("j.raw"),
                                                          remover(o("j.raw"))),
        }, "qemu-img convert qcow2->raw", 1.3),
    ]
    summary = []
    for title, rows, baseline, target in sections:
        result = alternate(rows, runs)
        for row_name, (cmd, out, _clean) in rows.items():
            result[row_name].check = check(out, src) if out else "exit 0"
        for _, out, clean in rows.values():
            if clean:
                clean()
        for ours in (r for r in result.values() if r.name.startswith("imgkit")):
            ratio = ours.median("wall") / result[baseline].median("wall")
            extra = peak_extra_disk(rows[ours.name][0], out_dir, rows[ours.name][1])
            rows[ours.name][2]()
            summary.append(f"| {ours.name} | {ratio:.2f} | <= {target} | {'met' if ratio <= target else 'MISSED'} | "
                           f"{extra / 2**20:.1f} MiB |")
        text += table(title, list(result.values()), baseline) + "\n"
    text += ("### summary (median wall-time ratio imgkit / qemu-img)\n\n| conversion | ratio | target | | "
             "peak extra disk |\n|---|---:|---:|---|---:|\n" + "\n".join(summary) + "\n\n")
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
    fmt = "raw" if out.endswith(".raw") else "qcow2"
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
