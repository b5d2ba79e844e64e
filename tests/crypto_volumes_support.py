"""Helpers for the encryption and split-volume tests (tests/test_crypto_*.py, tests/test_volumes_*.py).

Images made in-process use cheap Argon2id parameters (t=1, m=8 KiB, p=1) so that thousands of
re-opens stay fast; the construction is otherwise exactly the product's (same Sealer, same key slot
layout, same writer). Images made through the CLI use the real defaults.
"""
from __future__ import annotations

import os
import random
import shutil

from imgkit.operations.capture import capture_stream
from imgkit.formats.crypto import ImageKeys, Sealer, new_key_slot
from imgkit.errors import ImgkitError
from imgkit.formats import imgk_layout as L
from imgkit.formats.imgk_reader import ImageReader
from imgkit.formats.imgk_layout import volume_path
from imgkit.formats.sources import RawSource

CHUNK = 64 << 10
PASSWORD = b"correct horse battery staple"
OTHER_PASSWORD = b"Tr0ub4dor&3"


def make_source(path: str, chunks: int = 20, seed: int = 7) -> bytes:
    """A small disk with realistic mixed content, in 64 KiB chunks: text, random (incompressible),
    record-like data, zero chunks, a duplicated chunk (exercises dedup) and a short last chunk."""
    rng = random.Random(seed)
    words = [b"disk", b"image", b"volume", b"sector", b"kernel", b"ext4", b"inode", b"journal",
             b"backup", b"partition", b"boot", b"grub", b"fstab", b"systemd", b"user"]
    out = bytearray()
    for i in range(chunks):
        kind = i % 5
        if kind == 0:
            text = b" ".join(rng.choice(words) for _ in range(CHUNK // 5))
            out += text[:CHUNK].ljust(CHUNK, b"\n")
        elif kind == 1:
            out += rng.randbytes(CHUNK)
        elif kind == 2:
            recs = b"".join(b"%08d,%s,%d;" % (n, rng.choice(words), rng.randrange(1 << 30)) for n in range(3000))
            out += recs[:CHUNK].ljust(CHUNK, b"\0")
        elif kind == 3:
            out += bytes(CHUNK)
        else:
            out += out[CHUNK:2 * CHUNK]  # the same bytes as chunk 1: stored once
    out += rng.randbytes(12345)  # a short last chunk
    with open(path, "wb") as f:
        f.write(out)
    return bytes(out)


def cheap_sealer_factory(password: bytes):
    def factory(image_id: bytes, core_digest: bytes):
        data_key = os.urandom(32)
        slot = new_key_slot(password, data_key, core_digest, iterations=1, memory_kib=8, lanes=1)
        return Sealer(ImageKeys.from_data_key(data_key, image_id), core_digest), slot
    return factory


def capture_in_process(source: str, output: str, password: bytes | None = PASSWORD,
                       split_size: int | None = None, chunk_size: int = CHUNK) -> list[str]:
    src = RawSource(source)
    try:
        result = capture_stream(src, output, source_info=src.describe(), chunk_size=chunk_size,
                                split_size=split_size, force=True,
                                sealer_factory=cheap_sealer_factory(password) if password else None)
    finally:
        src.close()
    return result.paths


def read_all(path: str, password: bytes | None = PASSWORD) -> bytes:
    """Open the image and read every chunk through its integrity checks."""
    with ImageReader(path, (lambda: password) if password else None) as r:
        return b"".join(r.read_chunk(i) for i in range(r.chunk_count))


def outcome(path: str, expected: bytes, password: bytes | None = PASSWORD) -> str:
    """'detected' (refused with an imgkit error), 'silent' (wrong data handed out) or 'intact'."""
    try:
        data = read_all(path, password)
    except ImgkitError:
        return "detected"
    return "intact" if data == expected else "silent"


def xor_byte(path: str, offset: int, mask: int) -> None:
    """Corrupt by XOR (a fixed value would be a no-op 1 time in 256)."""
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([b[0] ^ mask]), offset)
    finally:
        os.close(fd)


def copy_image(paths: list[str], dest: str) -> list[str]:
    """Copy every volume of an image to `dest` (first volume name), keeping the .NNN suffixes."""
    out = []
    for n, p in enumerate(paths, start=1):
        shutil.copyfile(p, volume_path(dest, n))
        out.append(volume_path(dest, n))
    return out


def regions(path: str, password: bytes | None = PASSWORD) -> dict:
    """Byte ranges of the structures of a single-volume image: {name: (volume path, start, end)}."""
    with ImageReader(path, (lambda: password) if password else None) as r:
        last = r.volume_paths[-1]
        size = r.volume_sizes[-1]
        dir_len = L.DIRECTORY_HEAD_SIZE + len(r.sections) * L.DIRECTORY_ENTRY_SIZE
        names = {L.SECTION_INDEX: "index", L.SECTION_METADATA: "metadata", L.SECTION_VOLUMES: "volume table",
                 L.SECTION_USED_MAP: "used map"}
        out = {"header": (r.volume_paths[0], 0, L.HEADER_SIZE),
               "directory": (last, size - L.TRAILER_SIZE - dir_len, size - L.TRAILER_SIZE),
               "trailer": (last, size - L.TRAILER_SIZE, size)}
        for s in r.sections:
            out[names.get(s.type, f"section {s.type}")] = (last, s.offset, s.offset + s.stored_length)
        chunks = [(i, e) for i, e in enumerate(r.index) if e.kind == L.KIND_DATA]
        out["chunks"] = [(i, volume_path(path, e.volume), e.offset, e.offset + e.stored_length, e.object)
                         for i, e in chunks]
    return out


def run_on_tty(argv: list[str], answers: list[str], timeout: float = 60.0, env: dict | None = None):
    """Run a command with a pseudo-terminal as its controlling terminal (so getpass prompts, as for
    a user at a terminal). Each answer is typed after the next prompt ending in ': ' appears.
    Returns (exit code, everything the terminal showed)."""
    import fcntl
    import select
    import subprocess
    import sys
    import termios

    master, slave = os.openpty()

    def become_session_leader():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    full_env = dict(os.environ)
    full_env.pop("IMGKIT_PASSWORD", None)
    full_env.update(env or {})
    proc = subprocess.Popen([sys.executable, "-m", "imgkit", *argv], stdin=slave, stdout=slave,
                            stderr=slave, preexec_fn=become_session_leader, env=full_env, close_fds=True)
    os.close(slave)
    shown = b""
    pending = list(answers)
    prompts_seen = 0
    import time
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                shown += data
            if pending and shown.count(b": ") > prompts_seen and shown.rstrip(b" ").endswith(b":"):
                prompts_seen = shown.count(b": ")
                os.write(master, pending.pop(0).encode() + b"\n")
            if proc.poll() is not None and not ready:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, shown.decode(errors="replace")
