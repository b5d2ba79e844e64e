"""What encryption and splitting cost: imgkit capture and restore with and without --encrypt, and
with and without --split-size, side by side on the same input, alternating, several runs.
Targets (issue 4): encryption <= 10% of capture and of restore time on input A; splitting nothing
measurable. Each encrypted run includes one Argon2id derivation (t=3, m=64 MiB, p=4), measured
separately and reported, since it is a fixed cost per command, not per byte.

Usage: ./.venv/bin/python bench/bench_crypto.py [--quick] [--full] [--runs N]
  default: input A at --quick size of bench/inputs.py (1 GiB ext4, ~440 MiB of mixed content), 5 runs
  --quick: the same input, 3 runs (a few minutes);  --full: input A at full size (3 GiB, ~1.3 GiB used)
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import IMGKIT, Row, alternate, publish, remover, sha256_of, table  # noqa: E402
from inputs import WORK, build  # noqa: E402

SPLIT = "64M"


def rm_image(path: str):
    def clean():
        for n in range(1, 1000):
            p = path if n == 1 else f"{path}.{n:03d}"
            if not os.path.exists(p):
                break
            os.unlink(p)
    return clean




def per_run_ratio(a: Row, b: Row, attr: str = "wall") -> float:
    """Median of the per-run ratios a/b (the runs alternate, so each pair saw the same machine load)."""
    return statistics.median(getattr(x, attr) / getattr(y, attr) for x, y in zip(a.samples, b.samples))


def kdf_seconds() -> float:
    from imgkit.formats.crypto import DEFAULT_ITERATIONS, DEFAULT_LANES, DEFAULT_MEMORY_KIB, derive_kek
    from imgkit.formats import imgk_layout as L
    slot = L.KeySlot(L.KDF_ARGON2ID, DEFAULT_ITERATIONS, DEFAULT_MEMORY_KIB, DEFAULT_LANES, bytes(16), bytes(12), b"")
    times = []
    for _ in range(5):
        t = time.monotonic()
        derive_kek(b"benchmark password", slot)
        times.append(time.monotonic() - t)
    return statistics.median(times)


def crypto_cpu_per_chunk(stored: int, chunk: int) -> dict:
    """The per-byte work encryption adds, measured in CPU time (immune to the machine's load):
    AES-256-GCM over a stored chunk, and keyed instead of plain BLAKE3 over the logical chunk."""
    import resource

    from imgkit.formats import imgk_layout as L

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    aead, key = AESGCM(os.urandom(32)), os.urandom(32)
    stored_bytes, logical = os.urandom(stored), os.urandom(chunk)
    sealed = aead.encrypt(bytes(12), stored_bytes, b"ad")

    def cpu_ms(fn, n=200) -> float:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(n):
            fn()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / n * 1000
    return {"seal": cpu_ms(lambda: aead.encrypt(bytes(12), stored_bytes, b"ad")),
            "open": cpu_ms(lambda: aead.decrypt(bytes(12), sealed, b"ad")),
            # The chunk digest the format really uses (L.chunk_digest), plain vs keyed under mac_key.
            "digest": cpu_ms(lambda: L.chunk_digest(L.HASH_BLAKE3, logical)),
            "keyed_digest": cpu_ms(lambda: L.chunk_digest(L.HASH_BLAKE3, logical, key))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 runs")
    ap.add_argument("--full", action="store_true", help="input A at full size (3 GiB)")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--disk", action="store_true", help="write outputs under bench/work, not tmpfs")
    args = ap.parse_args()
    runs = args.runs or (3 if args.quick else 5)
    src = build("A", quick=not args.full)
    # Outputs go to tmpfs when it has room: encryption is CPU work, and on these shared machines the
    # disk's write and fsync times vary by more than the effect being measured (--disk to keep them).
    shm = "/dev/shm"
    use_shm = not args.disk and os.path.isdir(shm) and shutil.disk_usage(shm).free > 3 * os.path.getsize(src)
    out = os.path.join(shm if use_shm else WORK, "imgkit-bench-out-crypto")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    pw = os.path.join(out, "password")
    with open(pw, "w") as f:
        f.write("benchmark password\n")
    plain, enc, split = (os.path.join(out, f"{n}.imgk") for n in ("plain", "enc", "split"))
    cap = f"{IMGKIT} capture --progress none --force {src}"
    capture = alternate({
        "capture": (f"{cap} {plain}", plain, rm_image(plain)),
        "capture --encrypt": (f"{cap} {enc} --encrypt --password-file {pw}", enc, rm_image(enc)),
        f"capture --split-size {SPLIT}": (f"{cap} {split} --split-size {SPLIT}", split, rm_image(split)),
    }, runs)
    want = sha256_of(src)
    rp, re_, rs = (os.path.join(out, f"restored-{n}.raw") for n in ("plain", "enc", "split"))
    rst = f"{IMGKIT} restore --yes --progress none"
    restore = alternate({
        "restore": (f"{rst} {plain} {rp}", None, remover(rp)),
        "restore (encrypted)": (f"{rst} {enc} {re_} --password-file {pw}", None, remover(re_)),
        f"restore (split {SPLIT})": (f"{rst} {split} {rs}", None, remover(rs)),
    }, runs)
    for row, path in zip(restore.values(), (rp, re_, rs)):
        row.check = "sha256 ok" if sha256_of(path) == want else "SHA256 MISMATCH"
    for row in capture.values():
        row.check = "restored ok"
    volumes = len([p for p in os.listdir(out) if p.startswith("split.imgk")])
    kdf = kdf_seconds()
    c, r = list(capture.values()), list(restore.values())
    lines = [f"## bench_crypto: input A ({os.path.getsize(src) / 2**30:.2f} GiB disk, "
             f"{'full' if args.full else 'quick'} size), {runs} alternating runs, outputs on "
             f"{'tmpfs' if use_shm else 'disk'}\n",
             table("capture", c, "capture"), table("restore", r, "restore"),
             f"Argon2id key derivation (t=3, m=64 MiB, p=4), once per encrypted command: {kdf:.2f} s (median of 5)\n",
             "| overhead (median of per-run ratios) | capture | restore |", "|---|---:|---:|"]
    enc_c, enc_r = per_run_ratio(c[1], c[0]), per_run_ratio(r[1], r[0])
    # The same ratio with the fixed KDF cost taken out: what encryption costs per byte.
    enc_c_nokdf = statistics.median((x.wall - kdf) / y.wall for x, y in zip(c[1].samples, c[0].samples))
    enc_r_nokdf = statistics.median((x.wall - kdf) / y.wall for x, y in zip(r[1].samples, r[0].samples))
    lines += [f"| --encrypt, wall | {enc_c:.3f} | {enc_r:.3f} |",
              f"| --encrypt, wall without the one key derivation | {enc_c_nokdf:.3f} | {enc_r_nokdf:.3f} |",
              f"| --encrypt, user+sys CPU | {per_run_ratio(c[1], c[0], 'cpu'):.3f} | {per_run_ratio(r[1], r[0], 'cpu'):.3f} |",
              f"| --split-size {SPLIT} ({volumes} volumes), wall | {per_run_ratio(c[2], c[0]):.3f} | "
              f"{per_run_ratio(r[2], r[0]):.3f} |",
              f"| --split-size {SPLIT}, output bytes | {c[2].median('out_bytes') / c[0].median('out_bytes'):.4f} | |",
              f"| --encrypt, output bytes | {c[1].median('out_bytes') / c[0].median('out_bytes'):.4f} | |", ""]
    # Per-byte cost in CPU time, scaled to this input's stored chunks (of the default chunk size).
    from imgkit.formats.imgk_reader import ImageReader
    import subprocess
    subprocess.run(f"{cap} {plain}", shell=True, check=True, capture_output=True)
    with ImageReader(plain) as img:
        stored = [e.stored_length for e in img.index if e.kind == 1]
        chunk = img.chunk_size
    data_chunks = len(stored)
    per = crypto_cpu_per_chunk(int(statistics.mean(stored)), chunk)
    extra_c = data_chunks * (per["seal"] + per["keyed_digest"] - per["digest"]) / 1000
    extra_r = data_chunks * (per["open"] + per["keyed_digest"] - per["digest"]) / 1000
    lines += [f"Per-byte work of encryption, in CPU time: AES-256-GCM {per['seal']:.3f} ms to seal and "
              f"{per['open']:.3f} ms to open a mean stored chunk ({statistics.mean(stored) / 1024:.0f} KiB); "
              f"keyed BLAKE3 {per['keyed_digest']:.3f} ms vs plain BLAKE3 {per['digest']:.3f} ms per {chunk >> 20} MiB chunk. "
              f"For this input's {data_chunks} stored chunks: +{extra_c:.2f} s CPU on capture "
              f"({extra_c / c[0].median('cpu') * 100:.1f}% of its {c[0].median('cpu'):.2f} s), "
              f"+{extra_r:.2f} s on restore ({extra_r / r[0].median('cpu') * 100:.1f}% of "
              f"{r[0].median('cpu'):.2f} s); plus one key derivation per command.", ""]
    report = "\n".join(lines)
    publish("crypto.md", report)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
