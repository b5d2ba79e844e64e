"""A small forger of imgk images for the hostile-input tests (issue 13): it rewrites a real plain
image's sections and re-seals the directory, volume table and trailer, so every checksum is right
and only the forged content is hostile. Also runs the CLI measuring its peak RSS and time."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from imgkit.formats import imgk_layout as L
from imgkit.formats.imgk_reader import ImageReader


def reseal(img_path, out_path, mutate):
    """Write to `out_path` the plain single-volume image `img_path` with its sections replaced by
    mutate(sections, end_of_body) -> (new sections, bytes appended to the body). The VOLUMES
    section is rebuilt to state the final size."""
    raw = bytearray(open(img_path, "rb").read())
    with ImageReader(str(img_path)) as r:
        header, sections = r.header, list(r.sections)
        trailer_at = len(raw) - L.TRAILER_SIZE
        d_off = L.Trailer.decode(bytes(raw[trailer_at:]), len(raw)).directory_offset
    body = bytes(raw[:d_off])
    new_sections, extra = mutate(sections, len(body))
    body += extra
    new_sections = [s for s in new_sections if s.type != L.SECTION_VOLUMES]
    d_len = L.DIRECTORY_HEAD_SIZE + (len(new_sections) + 1) * L.DIRECTORY_ENTRY_SIZE
    table = L.encode_volume_table([len(body) + 8 + d_len + L.TRAILER_SIZE])
    new_sections.append(L.SectionEntry(L.SECTION_VOLUMES, 1, len(body), 8, 8, L.digest(table)))
    body += table
    d = L.encode_directory(new_sections)
    d_off = len(body)
    trailer = L.Trailer(header.image_id, d_off, len(d), header.volume_count, header.core_digest(), L.digest(d))
    with open(out_path, "wb") as f:
        f.write(body + d + trailer.encode())
    return out_path


def replace_section(img_path, out_path, section_type, raw: bytes, *, declared: int | None = None):
    """`img_path` with the (first) section of `section_type` replaced by zstd(raw)."""
    import zstandard
    frame = zstandard.ZstdCompressor().compress(raw)

    def mutate(sections, end):
        out = [s for s in sections if s.type != section_type]
        out.append(L.SectionEntry(section_type, 1, end, len(frame),
                                  len(raw) if declared is None else declared, L.digest(frame)))
        return out, frame
    return reseal(img_path, out_path, mutate)


def run_measured(*args, env=None, timeout=120, cwd=None):
    """Run the CLI; returns (returncode, stdout, stderr, peak RSS in bytes, seconds)."""
    full_env = dict(os.environ)
    full_env.pop("IMGKIT_PASSWORD", None)
    full_env.update(env or {})
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "imgkit", *map(str, args)], stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, env=full_env, cwd=cwd, start_new_session=True)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.killpg(proc.pid, 9)
                pid, status, usage = os.wait4(proc.pid, 0)
                raise AssertionError(f"imgkit {' '.join(map(str, args))} ran longer than {timeout} s")
            time.sleep(0.01)
        seconds = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                usage.ru_maxrss * 1024, seconds)
