"""Capture and restore of raw disks, side by side with `zstd -T2 -3` and `qemu-img convert -c`
(qcow2, zstd). Targets (issue 2): capture time <= 1.0x zstd and size <= 1.05x its output while
hashing every chunk; time <= 0.6x qemu-img; restore <= 1.0x `zstd -d --sparse`; peak RSS <= 300 MiB.
Memory is primed before every run (harness.prime_memory: this VM's balloon makes cold page-cache
memory cost ~1.5 s CPU/GiB to whichever tool meets it first).

Usage: bench/bench_capture.py [--quick] [--runs N] [--inputs A B F]
Run as root from the repo root with the venv's python (./.venv/bin/python bench/bench_capture.py).
"""
from __future__ import annotations

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import input_args, IMGKIT_ARGV as IMGKIT, alternate, prime_memory, publish, remover, sha256_of, table  # noqa: E402
from inputs import WORK, build  # noqa: E402



def bench_input(name: str, quick: bool, runs: int) -> str:
    src = build(name, quick)
    out_dir = os.path.join(WORK, "out")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    imgk, zst, qcow = (os.path.join(out_dir, f"{name}.{ext}") for ext in ("imgk", "zst", "qcow2"))
    # --sector-by-sector: this benchmark compares raw-disk compression and checks a byte-identical
    # restore; filesystem-aware capture (the default since issue 3) is measured in bench_fsaware.py.
    imgkit_cmd = " ".join(IMGKIT) + f" capture --progress none --force --sector-by-sector {src} {imgk}"
    capture = alternate({
        "imgkit capture --sector-by-sector": (imgkit_cmd, imgk, remover(imgk)),
        "imgkit capture, filesystem-aware": (" ".join(IMGKIT) + f" capture --progress none --force {src} {imgk}.fs",
                                             imgk + ".fs", remover(imgk + ".fs")),
        "zstd -T2 -3": (f"zstd -q -T2 -3 -f {src} -o {zst}", zst, remover(zst)),
        "qemu-img convert -c zstd": (f"qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd {src} {qcow}",
                                     qcow, remover(qcow)),
    }, runs, before=lambda: prime_memory(out_dir))
    import subprocess
    ok = subprocess.run(IMGKIT + ["verify", imgk], capture_output=True).returncode == 0
    capture["imgkit capture --sector-by-sector"].check = "verify ok" if ok else "VERIFY FAILED"
    ok = subprocess.run(IMGKIT + ["verify", imgk + ".fs"], capture_output=True).returncode == 0
    capture["imgkit capture, filesystem-aware"].check = "verify ok" if ok else "VERIFY FAILED"
    capture["zstd -T2 -3"].check = "zstd -t ok" if subprocess.run(["zstd", "-q", "-t", zst]).returncode == 0 else "BAD"
    capture["qemu-img convert -c zstd"].check = "qemu-img check ok" if subprocess.run(
        ["qemu-img", "check", "-q", "-f", "qcow2", qcow]).returncode == 0 else "BAD"
    r_imgk, r_zstd, r_qemu = (os.path.join(out_dir, f"restored-{t}.raw") for t in ("imgk", "zstd", "qemu"))
    restore = alternate({
        "imgkit restore (sparse file)": (" ".join(IMGKIT) + f" restore --yes --progress none {imgk} {r_imgk}",
                                         None, remover(r_imgk)),
        "zstd -d --sparse": (f"zstd -q -d --sparse -f {zst} -o {r_zstd}", None, remover(r_zstd)),
        # imgkit fsyncs before it renames the target into place; this row does the same work.
        "zstd -d --sparse + fsync": (f"zstd -q -d --sparse -f {zst} -o {r_zstd}2 && sync {r_zstd}2", None,
                                     remover(r_zstd + "2")),
        "qemu-img convert qcow2->raw": (f"qemu-img convert -f qcow2 -O raw {qcow} {r_qemu}", None, remover(r_qemu)),
    }, runs, before=lambda: prime_memory(out_dir))
    want = sha256_of(src)
    for row, path in zip(restore.values(), (r_imgk, r_zstd, r_zstd + "2", r_qemu)):
        row.check = "sha256 ok" if sha256_of(path) == want else "SHA256 MISMATCH"
    size = os.path.getsize(src)
    text = f"## input {name} ({size / 2**30:.2f} GiB, {'quick' if quick else 'full'})\n\n"
    text += table("capture", list(capture.values()), "zstd -T2 -3")
    c = capture
    text += (f"\nsize ratio imgkit/zstd: {c['imgkit capture --sector-by-sector'].median('out_bytes') / c['zstd -T2 -3'].median('out_bytes'):.3f}; "
             f"time ratio imgkit/qemu-img: {c['imgkit capture --sector-by-sector'].median('wall') / c['qemu-img convert -c zstd'].median('wall'):.2f}\n\n")
    text += table("restore", list(restore.values()), "zstd -d --sparse")
    shutil.rmtree(out_dir, ignore_errors=True)
    return text


def main() -> None:
    args = input_args(__doc__, ["A", "B", "F"])
    report = "".join(bench_input(n, args.quick, args.runs) for n in args.inputs)
    publish("capture.md", report)


if __name__ == "__main__":
    main()
