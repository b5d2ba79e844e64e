"""A small forger of imgk images for the hostile-input tests (issue 13): it rewrites a real plain
image's sections and re-seals the directory, volume table and trailer, so every checksum is right
and only the forged content is hostile. Also runs the CLI measuring its peak RSS and time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

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


# The measured command runs as the child of this small launcher, not of pytest: Linux keeps a
# process's peak RSS across fork and exec (the forked copy of a 700 MB pytest would be counted).
_LAUNCHER = """
import json, os, subprocess, sys, time
out, err, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
with open(out, "wb") as o, open(err, "wb") as e:
    started = time.monotonic()
    proc = subprocess.Popen(sys.argv[4:], stdout=o, stderr=e, stdin=subprocess.DEVNULL, start_new_session=True)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - started > timeout:
            os.killpg(proc.pid, 9)
            pid, status, usage = os.wait4(proc.pid, 0)
            print(json.dumps({"timeout": True}))
            sys.exit(0)
        time.sleep(0.01)
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "rss": usage.ru_maxrss * 1024,
                  "seconds": time.monotonic() - started}))
"""


def run_measured(*args, env=None, timeout=120, cwd=None):
    """Run the CLI; returns (returncode, stdout, stderr, peak RSS in bytes, seconds)."""
    return run_argv_measured([sys.executable, "-m", "imgkit", *map(str, args)], env=env, timeout=timeout, cwd=cwd)


def run_argv_measured(argv, env=None, timeout=120, cwd=None):
    """Run `argv`; returns (returncode, stdout, stderr, peak RSS in bytes, seconds)."""
    args = argv
    full_env = dict(os.environ)
    full_env.pop("IMGKIT_PASSWORD", None)
    full_env.update(env or {})
    with tempfile.TemporaryDirectory() as d:
        out, err = os.path.join(d, "out"), os.path.join(d, "err")
        launcher = subprocess.run([sys.executable, "-c", _LAUNCHER, out, err, str(timeout), *map(str, args)],
                                  capture_output=True, text=True,
                                  env=full_env, cwd=cwd, timeout=timeout + 30)
        result = json.loads(launcher.stdout)
        if result.get("timeout"):
            raise AssertionError(f"{' '.join(map(str, args))} ran longer than {timeout} s")
        with open(out, "rb") as o, open(err, "rb") as e:
            return (result["code"], o.read().decode(errors="replace"), e.read().decode(errors="replace"),
                    result["rss"], result["seconds"])
