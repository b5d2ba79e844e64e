#!/usr/bin/env python3
"""imgkit mount vs qemu-storage-daemon's FUSE export of the same disk as a zstd-compressed qcow2
(the same job: a compressed image shown as a raw file), side by side, alternating, median ratios
(../shared/guides/benchmarks.md). Input F of bench/inputs.py (a whole GPT disk: ESP + ext4 + swap).

  seq   cold `dd bs=1M` of the whole disk: page cache dropped and both daemons restarted before each run
  rand  4 KiB reads at seeded random offsets, latency p50/p99, cold (fresh daemon, caches dropped)
        then warm (the same offsets again)
  zero  floors of the request path alone (no disk read, no decoding): 4 KiB reads of zero ranges,
        cold; a cold `dd bs=1M` of an all-zero disk through each mount
  disk  floors of the disk and the decoder: cold 64 KiB preads and a cold `dd bs=1M` of the image
        files themselves; decoding every imgk chunk from the page cache with no FUSE
  rss   peak RSS (VmHWM) of each daemon, after the sequential read and after the random reads
  tar   `tar -c` of the ext4 partition's files, cold (right after the appliance started: nothing
        read yet), piped into wc: imgkit files/p2 vs `guestmount --ro` of the qcow2 (target <= 0.7x)
        and the imgkit daemon's peak RSS (VmHWM) right after it
  find  `find` over the same tree afterwards (both start a libguestfs appliance: its start is
        reported apart)

Usage: python bench/bench_mount.py [--quick] [--runs N] [--parts seq,rand,zero,disk,files]
  (--parts: which rows to measure; the files view's tar/find rows take minutes: leave `files` out
  to measure the disk view alone)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)
from harness import IMGKIT_ARGV as IMGKIT, drop_caches, prime_memory, publish  # noqa: E402
from inputs import WORK, build  # noqa: E402

ENV = {**os.environ, "IMGKIT_ACCEL": os.environ.get("IMGKIT_ACCEL", "tcg"),
       "LIBGUESTFS_BACKEND": "direct"}
CACHE = "64M"
PARTS = ("seq", "rand", "zero", "disk", "files")


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=ENV, **kw)


def mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class ImgkitMount:
    def __init__(self, image: str, work: str, name: str = "imgkit mount"):
        self.name = name
        self.image, self.mp = image, os.path.join(work, "imgkit-mnt-" + name.split()[-1].strip("()"))
        os.makedirs(self.mp, exist_ok=True)
        self.file = os.path.join(self.mp, "disk.raw")

    def start(self):
        sh(IMGKIT + ["mount", self.image, self.mp, "--cache-size", CACHE])
        from imgkit.operations.mount import _runtime_file
        with open(_runtime_file(self.mp)) as f:
            self.pid = json.load(f)["pid"]

    def rss(self) -> int:
        return vm_hwm_kib(self.pid)

    def stop(self):
        sh(IMGKIT + ["umount", self.mp])


class QsdMount:
    name = "qemu-storage-daemon fuse"

    def __init__(self, qcow: str, work: str):
        self.qcow, self.file = qcow, os.path.join(work, "qsd-export.raw")

    def start(self):
        open(self.file, "a").close()
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", json.dumps({"driver": "file", "node-name": "f0", "filename": self.qcow, "read-only": True}),
             "--blockdev", json.dumps({"driver": "qcow2", "node-name": "fmt0", "file": "f0", "read-only": True}),
             "--export", json.dumps({"type": "fuse", "id": "e0", "node-name": "fmt0", "mountpoint": self.file,
                                     "writable": False})],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not mounted(self.file):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("qemu-storage-daemon did not export: " + self.proc.stderr.read().decode())
            time.sleep(0.05)
        self.pid = self.proc.pid

    def rss(self) -> int:
        return vm_hwm_kib(self.pid)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.proc.stderr.close()


def seq_read(path: str) -> float:
    start = time.monotonic()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"], check=True)
    return time.monotonic() - start


def rand_reads(path: str, offsets: list[int], size: int = 4096) -> list[float]:
    fd = os.open(path, os.O_RDONLY)
    try:
        lat = []
        for off in offsets:
            t = time.perf_counter()
            os.pread(fd, size, off)
            lat.append(time.perf_counter() - t)
        return lat
    finally:
        os.close(fd)


def _zero_offsets(imgk64: str, rng: random.Random, n: int) -> list[int]:
    """4 KiB offsets inside 64 KiB ranges the image stores as zero (or free): the same ranges read as
    zeros from every export, so their latency is each daemon's request path alone."""
    from imgkit.formats import imgk_layout as L
    from imgkit.formats.imgk_reader import ImageReader
    r = ImageReader(imgk64)
    try:
        zeros = [i for i, k in enumerate(r.index.kinds()) if k != L.KIND_DATA]
        return [rng.choice(zeros) * r.chunk_size + rng.randrange(r.chunk_size // 4096) * 4096 for _ in range(n)]
    finally:
        r.close()


def zero_images(size: int) -> tuple[str, str]:
    """An imgk and a zstd qcow2 of a disk of `size` zero bytes (nothing stored): reading them through
    each mount is the request path alone, the floor of a sequential read."""
    imgk, qcow = os.path.join(WORK, f"zeros-{size}.imgk"), os.path.join(WORK, f"zeros-{size}.qcow2")
    raw = os.path.join(WORK, f"zeros-{size}.raw")
    if not (os.path.exists(imgk) and os.path.exists(qcow)):
        with open(raw, "wb") as f:
            f.truncate(size)
        sh(IMGKIT + ["capture", raw, imgk, "--progress", "none", "--force", "--sector-by-sector"])
        sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zstd", raw, qcow])
        os.unlink(raw)
    return imgk, qcow


def decode_floor(imgk: str) -> tuple[float, int]:
    """Seconds to decode (decompress and verify) every chunk of the image from the page cache, on a
    thread a core, in order: what the mount's decoders could do if the disk and FUSE cost nothing."""
    from imgkit.formats.imgk_reader import ImageReader
    from imgkit.platform.parallel import default_workers, ordered_map
    subprocess.run(["cat", imgk], check=True, stdout=subprocess.DEVNULL)  # into the page cache
    r = ImageReader(imgk)
    try:
        workers = default_workers()
        start = time.monotonic()
        for _ in ordered_map(r.read_chunk, range(r.chunk_count), workers):
            pass
        return time.monotonic() - start, workers
    finally:
        r.close()


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def find_count(path: str) -> tuple[float, int]:
    start = time.monotonic()
    out = subprocess.run(["find", path], check=True, capture_output=True).stdout
    return time.monotonic() - start, out.count(b"\n")


def tar_bytes(path: str) -> tuple[float, int]:
    """`tar -c` of a tree into a pipe (GNU tar skips reading file contents when writing to /dev/null)."""
    start = time.monotonic()
    out = subprocess.run(f"tar -C {path} -cf - . | wc -c", shell=True, check=True, capture_output=True).stdout
    return time.monotonic() - start, int(out.strip())


def bench_find(imgk: str, qcow: str, work: str) -> dict:
    res = {}
    mp = os.path.join(work, "imgkit-mnt-find")
    os.makedirs(mp, exist_ok=True)
    sh(IMGKIT + ["mount", imgk, mp, "--cache-size", CACHE])
    try:
        t = time.monotonic()
        os.listdir(os.path.join(mp, "files", "p2"))  # starts the appliance
        res["imgkit_start"] = time.monotonic() - t
        res["imgkit_tar"], res["imgkit_tar_bytes"] = tar_bytes(os.path.join(mp, "files", "p2"))
        from imgkit.operations.mount import _runtime_file
        with open(_runtime_file(mp)) as f:
            res["imgkit_tar_rss"] = vm_hwm_kib(json.load(f)["pid"])  # the daemon alone (not the appliance's helper)
        res["imgkit_find"], res["imgkit_entries"] = find_count(os.path.join(mp, "files", "p2"))
        res["imgkit_find_again"], _ = find_count(os.path.join(mp, "files", "p2"))
    finally:
        sh(IMGKIT + ["umount", mp])
    gm = os.path.join(work, "guestmount-mnt")
    os.makedirs(gm, exist_ok=True)
    env = {**ENV}
    if env.get("IMGKIT_ACCEL") == "tcg":
        env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
    t = time.monotonic()
    subprocess.run(["guestmount", "--ro", "--format=qcow2", "-a", qcow, "-m", "/dev/sda2", gm], check=True, env=env)
    res["guestmount_start"] = time.monotonic() - t
    try:
        res["guestmount_tar"], res["guestmount_tar_bytes"] = tar_bytes(gm)
        res["guestmount_find"], res["guestmount_entries"] = find_count(gm)
        res["guestmount_find_again"], _ = find_count(gm)
    finally:
        subprocess.run(["guestunmount", gm], check=False)
        if mounted(gm):
            subprocess.run(["fusermount3", "-uz", gm], check=False)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--reads", type=int)
    ap.add_argument("--no-find", action="store_true", help="the same as leaving `files` out of --parts")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated, of {', '.join(PARTS)} (default: all)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        ap.error(f"--parts: unknown {', '.join(sorted(parts - set(PARTS)))}")
    if args.no_find:
        parts.discard("files")
    runs = args.runs or (3 if args.quick else 5)
    nreads = args.reads or (300 if args.quick else 1000)
    raw = build("F", args.quick)
    tag = "quick" if args.quick else "full"
    imgk = os.path.join(WORK, f"mount-F-{tag}.imgk")
    qcow = os.path.join(WORK, f"mount-F-{tag}.qcow2")
    imgk64 = os.path.join(WORK, f"mount-F-{tag}-64K.imgk")
    if not os.path.exists(imgk) or os.path.getmtime(imgk) < os.path.getmtime(raw):  # rebuilt input
        # --sector-by-sector: byte-exact like the qcow2 peer, so every read can be checked against the raw disk
        sh(IMGKIT + ["capture", raw, imgk, "--progress", "none", "--force", "--sector-by-sector"])
    if not os.path.exists(imgk64) or os.path.getmtime(imgk64) < os.path.getmtime(raw):  # rebuilt input
        sh(IMGKIT + ["capture", raw, imgk64, "--progress", "none", "--force", "--chunk-size", "64K",
                            "--sector-by-sector"])
    if not os.path.exists(qcow) or os.path.getmtime(qcow) < os.path.getmtime(raw):  # rebuilt input
        sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zstd", raw, qcow + ".tmp"])
        os.rename(qcow + ".tmp", qcow)
    size = os.path.getsize(raw)
    header = (f"input F ({tag}): {size >> 20} MiB raw; imgk {os.path.getsize(imgk) >> 20} MiB; "
              f"imgk 64K chunks {os.path.getsize(imgk64) >> 20} MiB; qcow2 zstd {os.path.getsize(qcow) >> 20} MiB; "
              f"{runs} runs, {nreads} random reads per run")
    print(header, flush=True)
    work = tempfile.mkdtemp(prefix="bench-mount-", dir=WORK)
    tools = [ImgkitMount(imgk, work, "imgkit (2M chunks, default)"), ImgkitMount(imgk64, work, "imgkit (64K chunks)"),
             QsdMount(qcow, work)]
    seq = {t.name: [] for t in tools}
    rand = {t.name: {"cold": [], "warm": []} for t in tools}
    zero_lat = {t.name: [] for t in tools}
    disk_lat = {"imgk": [], "qcow2": []}
    disk_seq = {"imgk": [], "qcow2": []}
    paths = {"imgk": imgk, "qcow2": qcow}
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    zero_offsets = _zero_offsets(imgk64, random.Random(7), nreads)
    zero_tools, zero_seq = [], {}
    if "zero" in parts:
        zimgk, zqcow = zero_images(size)
        zero_tools = [ImgkitMount(zimgk, work, "imgkit (zeros)"), QsdMount(zqcow, work)]
        zero_tools[1].file = os.path.join(work, "qsd-zeros.raw")
        zero_seq = {t.name: [] for t in zero_tools}
    rss = {t.name: [] for t in tools}
    checked = {}
    rng = random.Random(20261126)
    for r in range(runs):
        offsets = [rng.randrange(size // 4096) * 4096 for _ in range(nreads)]
        for t in tools:
            if "seq" in parts:
                t.start()
                try:
                    drop_caches()
                    prime_memory(work)  # the page cache this read fills is resident memory (harness.prime_memory)
                    seq[t.name].append(seq_read(t.file))
                    rss[t.name].append(t.rss())  # read-ahead at full depth: where memory peaks
                finally:
                    t.stop()
            if "rand" not in parts:
                continue
            t.start()
            try:
                drop_caches()
                rand[t.name]["cold"].extend(rand_reads(t.file, offsets))
                rand[t.name]["warm"].extend(rand_reads(t.file, offsets))
                if r == 0:
                    fd = os.open(t.file, os.O_RDONLY)
                    with open(raw, "rb") as src:
                        ok = all(os.pread(fd, 4096, o) == (src.seek(o), src.read(4096))[1] for o in offsets[:50])
                    os.close(fd)
                    checked[t.name] = ok
                rss[t.name].append(t.rss())
            finally:
                t.stop()
        for t in tools:
            if "zero" not in parts:
                break
            t.start()
            try:
                drop_caches()
                zero_lat[t.name].extend(rand_reads(t.file, zero_offsets))
            finally:
                t.stop()
        for t in zero_tools:  # the request path alone, sequentially: nothing to read or decode
            if "zero" not in parts:
                break
            t.start()
            try:
                drop_caches()
                zero_seq[t.name].append(seq_read(t.file))
            finally:
                t.stop()
        for key, path in (("imgk", imgk), ("qcow2", qcow)):
            if "disk" not in parts:
                break
            drop_caches()
            disk_seq[key].append(seq_read(path))
            drop_caches()
            disk_lat[key].extend(rand_reads(path, [rng.randrange(os.path.getsize(path) // 4096 - 16) * 4096
                                                   for _ in range(nreads)], 65536))
    if "disk" in parts:
        decode_time, decode_workers = decode_floor(imgk)
    names = [t.name for t in tools]
    q = names[-1]
    out = [header, f"load before: {load_before}; after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
                   f"{os.getloadavg()[2]:.2f} (uptime); parts: {','.join(p for p in PARTS if p in parts)}"]
    say = out.append
    say("\n" + f"{'':28}" + "".join(f"{n:>26}" for n in names))
    if "seq" in parts:
        say(f"{'seq dd bs=1M cold MB/s':28}" + "".join(f"{size / statistics.median(seq[n]) / 1e6:>26.0f}" for n in names))
        say(f"{'  ratio to qsd':28}" + "".join(f"{statistics.median(seq[q]) / statistics.median(seq[n]):>25.2f}x"
                                                 for n in names))
        say(f"{'  fastest run MB/s':28}" + "".join(f"{size / min(seq[n]) / 1e6:>26.0f}" for n in names))
        say(f"{'  fastest-run ratio to qsd':28}" + "".join(f"{min(seq[q]) / min(seq[n]):>25.2f}x" for n in names))
    if "rand" in parts:
        for phase in ("cold", "warm"):
            for p in (50, 99):
                say(f"{f'4K random {phase} p{p} (us)':28}" + "".join(f"{pct(rand[n][phase], p) * 1e6:>26.0f}" for n in names))
                say(f"{'  ratio to qsd':28}" + "".join(f"{pct(rand[n][phase], p) / pct(rand[q][phase], p):>25.2f}x"
                                                         for n in names))
    if "zero" in parts:
        say(f"{'floor: 4K zero, cold p50 (us)':28}" + "".join(f"{pct(zero_lat[n], 50) * 1e6:>26.0f}" for n in names))
        zs = [statistics.median(zero_seq[t.name]) for t in zero_tools]
        say(f"{'floor: seq dd of zeros MB/s':28}{size / zs[0] / 1e6:>26.0f}{'':>26}{size / zs[1] / 1e6:>26.0f}")
    if rss[q]:
        say(f"{'daemon peak RSS (MiB)':28}" + "".join(f"{max(rss[n]) / 1024:>26.1f}" for n in names))
    if checked:
        say(f"{'reads match the raw disk':28}" + "".join(f"{str(checked.get(n)):>26}" for n in names))
    say(f"(seq ratio: throughput / qsd's; latency ratio: latency / qsd's, lower is better; imgkit cache {CACHE})")
    if "seq" in parts:
        for n in names:
            say(f"seq runs (s), {n}: {' '.join(f'{x:.2f}' for x in seq[n])}")
    if "disk" in parts:
        say(f"floor: a cold 64 KiB pread of the image file itself, no FUSE: p50 {pct(disk_lat['imgk'], 50) * 1e6:.0f} us "
              f"(imgk), {pct(disk_lat['qcow2'], 50) * 1e6:.0f} us (qcow2)")
        for key in ("imgk", "qcow2"):
            t_ = statistics.median(disk_seq[key])
            say(f"floor: cold `dd bs=1M` of the {key} file itself: {os.path.getsize(paths[key]) / t_ / 1e6:.0f} MB/s of "
                f"file, {size / t_ / 1e6:.0f} MB/s of disk.raw ({t_:.2f} s)")
        say(f"floor: decoding every imgk chunk from the page cache, no FUSE, {decode_workers} threads: "
            f"{size / decode_time / 1e6:.0f} MB/s of disk.raw ({decode_time:.2f} s)")
    if "files" in parts:
        f = bench_find(imgk, qcow, work)
        say(f"\nfiles view of the ext4 partition ({f['imgkit_entries']} vs {f['guestmount_entries']} entries):")
        say(f"  appliance start: imgkit {f['imgkit_start']:.1f} s, guestmount {f['guestmount_start']:.1f} s")
        say(f"  tar -c (cold):   imgkit {f['imgkit_tar']:.2f} s, guestmount {f['guestmount_tar']:.2f} s "
            f"(ratio imgkit/guestmount {f['imgkit_tar'] / f['guestmount_tar']:.2f}x, target <= 0.7x; "
            f"{f['imgkit_tar_bytes'] >> 20} vs {f['guestmount_tar_bytes'] >> 20} MiB of tar)")
        say(f"  daemon peak RSS (VmHWM) after the tar: {f['imgkit_tar_rss'] / 1024:.1f} MiB "
            f"(target <= 64 MiB + the {CACHE} cache)")
        say(f"  find (after tar): imgkit {f['imgkit_find']:.2f} s, guestmount {f['guestmount_find']:.2f} s "
              f"(ratio {f['guestmount_find'] / f['imgkit_find']:.2f}x)")
        say(f"  find (again):    imgkit {f['imgkit_find_again']:.3f} s, guestmount {f['guestmount_find_again']:.3f} s")
    if parts == set(PARTS):  # bench/results holds the whole table only
        publish("mount.txt", "\n".join(out) + "\n")
    else:
        print("\n".join(out[1:]), flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
