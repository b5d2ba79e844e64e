"""The fuzz loop of tests/test_fuzz_images.py, run as its own process so its peak RSS is its own.

Structure-aware mutations of real imgk images (plain, encrypted, split): bit flips in structures,
length/offset/count fields set to edge values (with the unkeyed checksums recomputed, so the
mutation reaches the parsers behind them), sections duplicated, dropped, reordered or cut short
and index entries forged (plain images, every digest re-sealed), truncation, and for split images
volumes dropped or swapped. Every case is opened, verified and read in full; the outcome must be
an ImgkitError with a one-line message, or the original bytes (a forged plain image may read as
anything, but never crash). Usage: fuzz_worker.py CORPUS.json SECONDS SEED OUT.json SAMPLE_DIR"""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import struct
import sys
import time
import traceback

import zstandard

from imgkit.errors import ImgkitError
from imgkit.formats import imgk_layout as L
from imgkit.formats.imgk_reader import ImageReader
from imgkit.operations.verify import verify_image

EDGES = [0, 1, 2, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32, (1 << 63) - 1, (1 << 64) - 1,
         L.HEADER_SIZE - 1, L.HEADER_SIZE, 65536, 1 << 26]


def _u(raw, off, size):
    return int.from_bytes(raw[off:off + size], "little")


def _put(buf, off, size, value):
    buf[off:off + size] = (value % (1 << (8 * size))).to_bytes(size, "little")


def _fix_header(buf):
    buf[L.HEADER_CHECKSUM_OFFSET:L.HEADER_SIZE] = L.digest(bytes(buf[:L.HEADER_CHECKSUM_OFFSET]))


def _layout(raw):
    """(directory offset, directory length, [(entry offset in file)]) of a last volume."""
    t = len(raw) - L.TRAILER_SIZE
    d_off, d_len = _u(raw, t + 24, 8), _u(raw, t + 32, 4)
    count = _u(raw, d_off + 8, 4)
    return t, d_off, d_len, [d_off + L.DIRECTORY_HEAD_SIZE + i * L.DIRECTORY_ENTRY_SIZE for i in range(count)]


def _reseal_tail(buf, d_off, d_len, plain):
    """Recompute the directory digest and the trailer digest (possible for plain images only)."""
    if not plain:
        return
    t = len(buf) - L.TRAILER_SIZE
    buf[t + 72:t + 104] = L.digest(bytes(buf[d_off:d_off + d_len]))
    buf[t + 104:t + 128] = L.digest(bytes(buf[t:t + 104]))[:24]


class Case:
    def __init__(self, image, rng):
        self.image, self.rng = image, rng
        self.vols = [bytearray(open(p, "rb").read()) for p in image["paths"]]
        self.plain = image["password"] is None
        self.forged = False  # checksums recomputed: a plain image may then read as other bytes
        self.what = ""

    # -- mutators -----------------------------------------------------------------------------
    def flip(self):
        v = self.rng.randrange(len(self.vols))
        buf = self.vols[v]
        t, d_off, _, _ = _layout(buf) if v == len(self.vols) - 1 else (len(buf), len(buf), 0, [])
        zone = self.rng.choice(["header", "tail", "any"])
        lo, hi = {"header": (0, L.HEADER_SIZE), "tail": (min(d_off, len(buf) - 1), len(buf)),
                  "any": (0, len(buf))}[zone]
        off = self.rng.randrange(lo, hi)
        buf[off] ^= 1 << self.rng.randrange(8)
        self.what = f"flip volume {v + 1} byte {off}"

    def header_field(self):
        v = self.rng.randrange(len(self.vols))
        off, size = self.rng.choice([(8, 2), (12, 4), (16, 8), (24, 8), (48, 4), (52, 4), (56, 8), (64, 4),
                                     (68, 1), (69, 1), (72, 8), (132, 4), (136, 4), (140, 4)])
        _put(self.vols[v], off, size, self.rng.choice(EDGES + [_u(self.vols[v], off, size) + self.rng.choice([-1, 1])]))
        _fix_header(self.vols[v])  # the header checksum is unkeyed: any forger can do this
        self.forged = True
        self.what = f"header field {off}/{size} of volume {v + 1}"

    def tail_field(self):
        buf = self.vols[-1]
        t, d_off, d_len, entries = _layout(buf)
        fields = [(t + 24, 8), (t + 32, 4), (t + 36, 4), (d_off + 8, 4)]
        for e in entries:
            fields += [(e, 4), (e + 4, 4), (e + 8, 8), (e + 16, 8), (e + 24, 8)]
        off, size = self.rng.choice(fields)
        _put(buf, off, size, self.rng.choice(EDGES + [len(buf), len(buf) - 1, _u(buf, off, size) + self.rng.choice([-1, 1, 4096])]))
        _reseal_tail(buf, d_off, d_len, self.plain)
        self.forged = self.plain
        self.what = f"directory/trailer field at {off}/{size}"

    def truncate(self):
        v = self.rng.randrange(len(self.vols))
        buf = self.vols[v]
        cut = self.rng.choice([self.rng.randrange(len(buf)), L.HEADER_SIZE, len(buf) - L.TRAILER_SIZE, len(buf) - 1])
        del buf[cut:]
        self.what = f"truncate volume {v + 1} at {cut}"

    def sections(self):
        """Plain images: rewrite the directory (duplicate, drop, reorder, shorten) and re-seal it."""
        if not self.plain:
            return self.flip()
        buf = self.vols[-1]
        t, d_off, d_len, entries = _layout(buf)
        raw = [bytes(buf[e:e + L.DIRECTORY_ENTRY_SIZE]) for e in entries]
        how = self.rng.choice(["duplicate", "drop", "reorder", "shorten", "index"])
        if how == "duplicate":
            raw.insert(self.rng.randrange(len(raw) + 1), self.rng.choice(raw))
        elif how == "drop":
            raw.pop(self.rng.randrange(len(raw)))
        elif how == "reorder":
            self.rng.shuffle(raw)
        elif how == "shorten":
            i = self.rng.randrange(len(raw))
            e = bytearray(raw[i])
            stored = _u(e, 16, 8)
            _put(e, 16, 8, self.rng.randrange(max(1, stored)))
            raw[i] = bytes(e)
        else:
            return self.index_entry()
        body = bytes(buf[:d_off])
        directory = struct.pack("<8sI4x", L.DIRECTORY_MAGIC, len(raw)) + b"".join(raw)
        trailer = bytearray(buf[t:])
        new = bytearray(body + directory + trailer)
        nt = len(new) - L.TRAILER_SIZE
        _put(new, nt + 24, 8, len(body))
        _put(new, nt + 32, 4, len(directory))
        _reseal_tail(new, len(body), len(directory), True)
        self.vols[-1] = new
        self.forged = True
        self.what = f"sections {how}"

    def index_entry(self):
        """Plain images: an index entry's field set to an edge value, the index re-sealed."""
        if not self.plain:
            return self.header_field()
        buf = self.vols[-1]
        t, d_off, d_len, entries = _layout(buf)
        for e in entries:
            if _u(buf, e, 4) == L.SECTION_INDEX:
                off, stored, length = _u(buf, e + 8, 8), _u(buf, e + 16, 8), _u(buf, e + 24, 8)
                index = bytearray(zstandard.ZstdDecompressor().decompress(bytes(buf[off:off + stored]),
                                                                          max_output_size=length))
                n = len(index) // L.INDEX_ENTRY_SIZE
                pos = self.rng.randrange(n) * L.INDEX_ENTRY_SIZE
                foff, fsize = self.rng.choice([(0, 1), (1, 1), (2, 2), (4, 4), (8, 8), (16, 8)])
                _put(index, pos + foff, fsize, self.rng.choice(EDGES + [_u(index, pos + foff, fsize) + 1]))
                frame = zstandard.ZstdCompressor().compress(bytes(index))
                # the new frame goes where the directory was; directory and trailer follow it
                body = bytes(buf[:d_off]) + frame
                directory = bytearray(buf[d_off:d_off + d_len])
                rel = e - d_off
                _put(directory, rel + 8, 8, d_off)
                _put(directory, rel + 16, 8, len(frame))
                directory[rel + 32:rel + 64] = L.digest(frame)
                # the VOLUMES section states the volume's size: update it to the new size
                new_size = len(body) + len(directory) + L.TRAILER_SIZE
                for e2 in range(L.DIRECTORY_HEAD_SIZE, len(directory), L.DIRECTORY_ENTRY_SIZE):
                    if _u(directory, e2, 4) == L.SECTION_VOLUMES:
                        voff = _u(directory, e2 + 8, 8)
                        table = bytearray(buf[voff:voff + _u(directory, e2 + 16, 8)])
                        _put(table, len(table) - 8, 8, new_size)
                        body = body[:voff] + bytes(table) + body[voff + len(table):]
                        directory[e2 + 32:e2 + 64] = L.digest(bytes(table))
                new = bytearray(body + bytes(directory) + bytes(buf[t:]))
                nt = len(new) - L.TRAILER_SIZE
                _put(new, nt + 24, 8, len(body))
                _reseal_tail(new, len(body), len(directory), True)
                self.vols[-1] = new
                self.forged = True
                self.what = f"index entry {pos // L.INDEX_ENTRY_SIZE} field {foff}/{fsize}"
                return
        self.flip()

    def volumes(self):
        if len(self.vols) < 2:
            return self.truncate()
        how = self.rng.choice(["drop", "swap"])
        if how == "drop":
            self.vols.pop(self.rng.randrange(1, len(self.vols)))
        else:
            i, j = self.rng.sample(range(len(self.vols)), 2)
            self.vols[i], self.vols[j] = self.vols[j], self.vols[i]
        self.what = f"volumes {how}"

    def write(self, directory):
        os.makedirs(directory, exist_ok=True)
        for f in os.listdir(directory):
            os.unlink(os.path.join(directory, f))
        names = [os.path.basename(p) for p in self.image["paths"]]
        for name, data in zip(names, self.vols):
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        return os.path.join(directory, names[0])


MUTATORS = ["flip", "flip", "header_field", "tail_field", "tail_field", "truncate", "sections", "sections",
            "index_entry", "volumes"]


def check(path, image):
    """'detected', 'same' or 'forged-read'; raises AssertionError on a crash or silent change."""
    pw = image["password"]
    try:
        with ImageReader(path, (lambda: pw.encode()) if pw else None) as r:
            report = verify_image(r, workers=1)
            if not report.ok:
                return "detected"
            data = r.read(0, r.size)
    except ImgkitError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "Traceback" not in msg, f"not one line: {msg!r}"
        return "detected"
    return "same" if data == open(image["raw"], "rb").read() else "changed"


def main():
    corpus_path, seconds, seed, out_path, sample_dir = sys.argv[1:6]
    corpus = json.load(open(corpus_path))
    rng = random.Random(int(seed))
    work = os.path.join(os.path.dirname(out_path), "case")
    stats = {"cases": 0, "detected": 0, "same": 0, "forged_changed": 0, "by_mutator": {}, "slowest": 0.0}
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    deadline = time.monotonic() + float(seconds)
    samples = 0
    while time.monotonic() < deadline:
        image = rng.choice(corpus)
        case = Case(image, rng)
        mutator = rng.choice(MUTATORS)
        getattr(case, mutator)()
        path = case.write(work)
        started = time.monotonic()
        try:
            outcome = check(path, image)
        except Exception:  # noqa: BLE001 - any non-imgkit error is the finding
            json.dump({"failure": f"{image['name']}: {case.what}: {traceback.format_exc()}", **stats}, open(out_path, "w"))
            shutil.copytree(work, os.path.join(sample_dir, "failure"), dirs_exist_ok=True)
            return 1
        took = time.monotonic() - started
        stats["slowest"] = max(stats["slowest"], took)
        if outcome == "changed" and not case.forged:
            json.dump({"failure": f"{image['name']}: {case.what}: silent change", **stats}, open(out_path, "w"))
            return 1
        stats["cases"] += 1
        stats[{"detected": "detected", "same": "same", "changed": "forged_changed"}[outcome]] += 1
        stats["by_mutator"][mutator] = stats["by_mutator"].get(mutator, 0) + 1
        if outcome == "detected" and samples < 12 and rng.random() < 0.2:  # kept for the CLI checks
            dest = os.path.join(sample_dir, f"s{samples:02d}-{image['name']}")
            shutil.copytree(work, dest)
            json.dump({"image": os.path.join(dest, os.path.basename(path)), "password": image["password"],
                       "what": case.what}, open(dest + ".json", "w"))
            samples += 1
    stats["rss_growth"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    stats["base_rss"] = base_rss
    json.dump(stats, open(out_path, "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
