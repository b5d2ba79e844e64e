"""Convert between imgk, raw, ISO, qcow2, VHD (qemu's vpc), VHDX and VMDK, in any direction.

Routes (all without a temporary full-size raw copy on disk):
- anything -> imgk: capture (api's capture_stream) from the source Stream (a foreign source is read
  through qemu-storage-daemon + NBD, see formats/qemu_image.py);
- imgk (or a padded stream) -> qcow2/vhd/vhdx/vmdk: the image is served over NBD by
  nbd_export.py and `qemu-img convert -f raw <nbd> -O FMT` reads it; zero runs are holes;
- raw/foreign file -> qcow2/vhd/vhdx/vmdk: `qemu-img convert` directly, explicit -f/-O, after the
  header inspection of formats/foreign.py;
- anything -> raw/iso: imgkit copies the Stream's data runs into a sparse file.
Every destination is written under a temporary name in its directory and renamed when complete,
durably (data and directory fsynced) unless `sync` is False (`--no-sync`: the page cache, like
`qemu-img convert`; imgk and rbd: destinations are always durable).
"""
from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import asdict, dataclass

from ..views.caching_reader import CachingReader
from ..platform.targets import check_replaceable, refuse_device_image_path
from ..errors import CorruptChunk, InputError, Interrupted, OperationFailed
from ..formats.detect import format_from_extension, refuse_json_name
from ..formats.destinations import CAPTURE, COPY, QEMU_IMG, DESTINATIONS, Destination, destination, names
from ..formats.destinations import PRESETS as PRESET_PLANS
from ..formats.imgk_settings import LEVEL_DEFAULT
from ..progress import NullProgress, Progress
from ..remote.locations import is_rbd, is_s3
from ..stream import DATA, Stream
from ..platform.writeback import OutputWriter, WritebackNudger, publish_file

PRESETS = tuple(PRESET_PLANS)
MiB = 1 << 20
COPY_PIECE = 4 * MiB
_PROGRESS_RE = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


@dataclass
class ConvertResult:
    source: str
    source_format: str
    destination: str
    format: str
    subformat: str | None
    virtual_size: int
    file_size: int
    allocated_size: int
    seconds: float
    method: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Plan:
    to: str
    dest: Destination
    subformat: str | None
    compress: bool
    pad_to_mib: bool = False  # the virtual disk rounded up to a whole MiB (zeros added): --preset azure
    size: int | None = None   # the padded size, once the source size is known


def destination_format(dest: str, to: str | None) -> str:
    if to:
        return to
    fmt = format_from_extension(dest)
    if not fmt:
        raise InputError(f"{dest}: cannot tell the destination format from its name",
                         hint="add --to FMT (" + ", ".join(DESTINATIONS) + ")")
    return fmt


def _plan(to: str, subformat: str | None, compress: bool, preset: str | None) -> _Plan:
    dest = destination(to)  # an unknown format is refused first
    p = PRESET_PLANS.get(preset) if preset is not None else None
    if p is not None:
        if to != p.to:
            raise InputError(f"--preset {p.name} makes a {p.to.upper()}, not {to}",
                             hint=f"name the destination .{p.to} or use --to {p.to}")
        if subformat not in (None, p.subformat):
            raise InputError(f"--preset {p.name} needs a {p.subformat} {p.to.upper()}; drop --subformat")
        subformat = p.subformat
    elif preset is not None:
        raise InputError(f"unknown preset {preset!r}", hint="presets: " + ", ".join(PRESET_PLANS))
    if subformat is not None and subformat not in dest.subformats:
        allowed = dest.subformats
        raise InputError(f"--subformat {subformat} does not apply to {to}",
                         hint=f"{to} subformats: {', '.join(allowed)}" if allowed else f"{to} has no subformats")
    if compress and dest.compression is None:
        compressible = ", ".join(f"{d.name} ({d.compression})" for d in DESTINATIONS.values() if d.compression)
        raise InputError(f"--compress applies to {compressible}, not {to}", hint=dest.no_compress_hint)
    return _Plan(to, dest, subformat or dest.default_subformat, compress, pad_to_mib=p is not None and p.pad_to_mib)


def _tmp_name(dest: str) -> str:
    """A private directory beside dest holding a file of dest's own name: formats that record their
    file name (a VMDK's extent line) record the final one."""
    d, base = os.path.split(os.path.abspath(dest))
    import tempfile
    return os.path.join(tempfile.mkdtemp(prefix=f".{base}.imgkit-tmp-", dir=d), base)


def _check_destination(source: str, dest: str, force: bool) -> None:
    if is_s3(dest):
        return  # capture_stream refuses an existing object without --force
    refuse_json_name(dest)
    refuse_device_image_path(dest, other=source, command="convert")
    out_dir = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(out_dir):
        raise InputError(f"{out_dir}: no such directory for the destination")
    if os.path.lexists(dest) and os.path.exists(source) and os.path.samefile(source, dest):
        raise InputError(f"{dest} is the source itself: refusing to overwrite what is converted")
    check_replaceable(dest, force, [source])


def _finish_file(tmp: str, dest: str, force: bool, sync: bool = True) -> None:
    try:
        publish_file(tmp, dest, replace=force, sync=sync)  # a DEST that appeared meanwhile is never replaced
    except FileExistsError as e:
        raise InputError(f"{dest}: {e.strerror}", hint="use --force to replace it") from None


class PaddedStream(Stream):
    """A stream followed by zeros up to `size` (Azure wants whole MiB disks)."""

    def __init__(self, base: Stream, size: int):
        self.base, self.size = base, size
        self.unit_size, self.unit_phase = base.unit_size, base.unit_phase
        self.thread_safe, self.read_ahead_bytes = base.thread_safe, base.read_ahead_bytes
        self.format_name, self.metadata = base.format_name, base.metadata

    def read_unit(self, i: int, unit: int | None = None) -> bytes:
        start, end = self.unit_span(i, unit)
        data = self.base.read_unit(i, unit) if start < self.base.size else b""
        return data + bytes(end - start - len(data))

    def unit_is_stored(self, i: int) -> bool:
        if not self.unit_size:
            return True
        return self.unit_span(i)[0] < self.base.size and self.base.unit_is_stored(i)

    def unit_is_cheap(self, i: int) -> bool:
        return self.base.unit_is_cheap(i)

    def will_need(self, offset: int, length: int) -> None:
        self.base.will_need(offset, length)

    def describe(self) -> dict:
        return self.base.describe()

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size:
            return b""
        length = min(length, self.size - offset)
        data = self.base.read(offset, length) if offset < self.base.size else b""
        return data + bytes(length - len(data))

    def runs(self):
        from ..stream import ZERO, Run
        yield from self.base.runs()
        if self.size > self.base.size:
            yield Run(ZERO, self.base.size, self.size - self.base.size)


# -- the routes -----------------------------------------------------------------------------------
def _run_qemu_img_convert(src_args: list[str], plan: _Plan, tmp: str, size: int, progress: Progress,
                          export=None, pass_fds: tuple[int, ...] = (), sync: bool = True) -> None:
    from ..platform.qemu_tools import describe_failure, kill_group, limits_for_size, popen
    argv = ["qemu-img", "convert", "-p", *src_args, "-O", plan.dest.qemu_name,
            *plan.dest.qemu_img_options(plan.subformat, plan.compress)]
    if plan.compress:
        argv += plan.dest.compress_args  # see destinations.py (qcow2: -c, out-of-order writes)
    argv.append(tmp)
    limits = limits_for_size(size)
    import subprocess
    proc = popen(argv, limits, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=False, pass_fds=pass_fds)
    err_chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    deadline = time.monotonic() + limits.wall_seconds
    buf = b""
    # Write the output back while qemu-img writes it: the fsync before the rename then waits for
    # the tail only (imgk -> qcow2 of disk F: the fsync of 1 GiB cost as much as the conversion).
    nudger = WritebackNudger(tmp) if sync else None
    try:
        while True:
            piece = proc.stdout.read1(4096)
            if nudger is not None:
                nudger.poll()
            if not piece:
                break
            buf = (buf + piece)[-256:]
            found = _PROGRESS_RE.findall(buf.decode("ascii", "replace"))
            if found:
                done = int(float(found[-1]) * size / 100)
                if done > progress.done:
                    progress.advance(done - progress.done)
            if time.monotonic() > deadline:
                kill_group(proc)
                raise OperationFailed(f"qemu-img convert took longer than {limits.wall_seconds:.0f} s: stopped")
        proc.wait(max(1.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        kill_group(proc)
        raise Interrupted("convert interrupted: no destination was written") from None
    except BaseException:
        kill_group(proc)
        raise
    finally:
        if nudger is not None:
            nudger.close()
    reader.join(5)
    if proc.returncode != 0:
        if export is not None and export.errors:
            raise OperationFailed(f"reading the source failed: {export.errors[0]}")
        dest = os.path.join(os.path.dirname(os.path.dirname(tmp)), os.path.basename(tmp))  # see _tmp_name
        raise OperationFailed(f"qemu-img convert to {dest} failed: "
                              + describe_failure(proc.returncode, b"".join(err_chunks).decode("utf-8", "replace")))
    if progress.done < size:
        progress.advance(size - progress.done)


def _write_native(fmt: str, stream: Stream, tmp: str, progress: Progress, sync: bool = True) -> None:
    write = destination(fmt).native.load()
    reader = CachingReader(stream, cache_bytes=0)
    stream.read_sequentially()
    progress.total = stream.size
    try:
        write(stream, tmp, reader.map_pieces, advance=progress.advance, durable=sync)
    except CorruptChunk as e:  # as through qemu-img: the conversion failed on a damaged source
        raise OperationFailed(f"reading the source failed: {e}") from None
    if progress.done < stream.size:
        progress.advance(stream.size - progress.done)


def _copy_to_raw(stream: Stream, tmp: str, progress: Progress, sync: bool = True) -> None:
    """Data runs into a sparse file; holes and all-zero pieces stay holes. Read through the one
    caching reader, in pieces cut where the source's units are (an imgk chunk decodes once), and
    written on the writer thread, directly to the disk where the filesystem allows (OutputWriter)."""
    reader = CachingReader(stream, cache_bytes=0)
    piece = stream.unit_size or COPY_PIECE
    pieces = list(reader.cut_pieces(stream.runs(), {DATA}, piece))
    with OutputWriter(tmp, durable=sync) as out:
        for off, length in _joined(pieces):  # allocated up front (see OutputWriter.preallocate)
            out.preallocate(off, length)
        stream.read_sequentially()
        zero = bytes(piece)
        for (off, length), data in reader.map_pieces(pieces):
            if len(data) != length:
                raise OperationFailed(f"short read from the source at offset {off}")
            if zero.startswith(data):  # memcmp against zeros, in place: a hole again
                out.discard(off, length)
            else:
                out.write(off, data)
            progress.advance(length)
        out.truncate(stream.size)


def _joined(pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Consecutive (offset, length) pieces joined into ranges."""
    ranges: list[list[int]] = []
    for off, length in pieces:
        if ranges and ranges[-1][0] + ranges[-1][1] == off:
            ranges[-1][1] += length
        else:
            ranges.append([off, length])
    return [(off, length) for off, length in ranges]


# -- the operation --------------------------------------------------------------------------------
def convert(source: str, dest: str, *, source_format: str | None = None, to: str | None = None,
            compress: bool = False, subformat: str | None = None, preset: str | None = None,
            force: bool = False, password=None, progress: Progress | None = None,
            level: int | None = None, overlay: str | None = None, encrypt: bytes | None = None,
            decrypt: bool = False, sector_by_sector: bool = False, sync: bool = True) -> ConvertResult:
    """Convert `source` into `dest`. An encrypted imgk source stays encrypted in an imgk destination
    (under the same password, or under `encrypt`, a new one); any output in clear from it (imgk
    with `decrypt`, or raw/qcow2/...) needs `decrypt`: nobody gets a clear copy of an encrypted
    backup without saying so. `encrypt` also encrypts an imgk destination of a clear source.
    An imgk destination stores only the blocks filesystems use, like capture, unless
    `sector_by_sector`. `sync` False (`--no-sync`) leaves the output in the page cache, unsynced,
    as `qemu-img convert` does (still written under a temporary name and renamed when complete);
    refused for imgk and rbd: destinations, which are always durable."""
    from ..formats.registry import open_image  # convert only routes what the registry opens
    progress = progress or NullProgress()
    started = time.monotonic()
    refuse_json_name(source)
    if overlay is not None:
        return _with_overlay(source, dest, overlay, source_format=source_format, to=to, compress=compress,
                             subformat=subformat, preset=preset, force=force, password=password,
                             progress=progress, started=started, decrypt=decrypt, sync=sync)
    if is_rbd(dest):  # a VM disk in Ceph: librbd writes it sparse (remote/rbd_image.py)
        if not sync:
            raise InputError("--no-sync applies to file destinations, not to an rbd: image")
        return _to_rbd(source, dest, source_format, to, compress or subformat or preset or level is not None,
                       force, password, progress, started, decrypt)
    to = destination_format(dest, to)
    plan = _plan(to, subformat, compress, preset)  # an unknown format: destination() says so
    if encrypt is not None and not plan.dest.encrypts:
        raise InputError(f"--encrypt applies to imgk destinations, not {to}")
    if encrypt is not None and decrypt:
        raise InputError("--encrypt and --decrypt exclude each other")
    if level is not None and plan.dest.route != CAPTURE:
        raise InputError(f"--level applies to imgk destinations, not {to}",
                         hint="for a compressed qcow2 use --compress")
    if not sync and plan.dest.route == CAPTURE:
        raise InputError(f"--no-sync does not apply to an {to} destination: an imgk image is always written durably",
                         hint="convert to raw, qcow2, vhd, vhdx or vmdk for a scratch copy")
    _check_destination(source, dest, force)
    direct = _direct_source(source, source_format, plan)
    if direct is not None:  # a file qemu-img reads itself: no stream, no NBD
        src_fmt, size, inspected = direct
        progress.total = size
        try:
            if inspected is None:  # raw or ISO: qemu's raw driver takes the bytes as they are
                from ..formats.registry import lookup
                src_args, fds = ["-f", lookup(src_fmt).qemu_driver, os.path.abspath(source)], ()
            else:  # the inspected descriptor, with backing: null (qemu_image.format_node)
                from ..formats.qemu_image import image_spec
                src_args, fds = [image_spec(inspected)], (inspected.fd,)
            _into_temp(dest, lambda tmp: _run_qemu_img_convert(src_args, plan, tmp, size, progress, pass_fds=fds,
                                                                sync=sync), force, sync)
        finally:
            if inspected is not None:
                inspected.close()
        method, virtual = "qemu-img", size
    else:
        src = open_image(source, password, fmt=source_format)  # detects, inspects, refuses hostile images
        try:
            src_fmt = src.format_name or source_format or "raw"
            progress.total = src.size
            if plan.pad_to_mib:
                plan.size = -(-src.size // MiB) * MiB
            sealer = _sealer_for(src, source, plan.to, password, encrypt, decrypt)
            method = _route(src, source, dest, plan, force, progress, level, sealer, sector_by_sector, sync)
            virtual = plan.size or src.size
        finally:
            src.close()
    if method != "capture":  # capture reports its own end
        progress.finish()
    if is_s3(dest):
        from ..remote.s3 import S3Object
        file_size = allocated = S3Object(dest).size
    else:
        st = os.stat(dest)
        file_size, allocated = st.st_size, st.st_blocks * 512
    return ConvertResult(source=source, source_format=src_fmt, destination=dest, format=plan.to,
                         subformat=plan.subformat, virtual_size=virtual, file_size=file_size,
                         allocated_size=allocated, seconds=round(time.monotonic() - started, 3),
                         method=method)


def _to_rbd(source: str, dest: str, source_format, to, options: bool, force: bool, password,
            progress: Progress, started: float, decrypt: bool = False) -> ConvertResult:
    from ..formats.registry import open_image
    from ..remote.rbd_image import check_target, write_image
    if to not in (None, "rbd", "raw"):
        raise InputError(f"an rbd: destination is a raw block image, not {to}")
    if options:
        raise InputError("--compress, --subformat, --preset and --level do not apply to an rbd: destination")
    check_target(dest, force)  # refuse before reading anything
    src = open_image(source, password, fmt=source_format)
    try:
        src_fmt = src.format_name or source_format or "raw"
        _sealer_for(src, source, "rbd", password, None, decrypt)  # an RBD image is clear: --decrypt
        result = write_image(src, dest, force=force, progress=progress)
        size = src.size
    finally:
        src.close()
    return ConvertResult(source=source, source_format=src_fmt, destination=result.target, format="rbd",
                         subformat=None, virtual_size=size, file_size=size, allocated_size=result.bytes_written,
                         seconds=round(time.monotonic() - started, 3), method="librbd")


def _direct_source(source: str, source_format: str | None, plan: _Plan):
    """(format, virtual size, inspection or None) when qemu-img can read the source file itself,
    after inspection; the caller closes the inspection (it holds the descriptor qemu-img reads)."""
    from ..formats.registry import FORMATS, detect
    if plan.dest.route != QEMU_IMG or plan.pad_to_mib or not os.path.isfile(source):
        return None
    if source_format is None:
        source_format = detect(source)
    entry = FORMATS.get(source_format)
    if entry is None or entry.qemu_driver is None:
        return None  # only imgkit reads it (imgk)
    if entry.via_qemu:
        from ..formats import foreign  # the header inspectors: only a foreign source needs them
        inspected = foreign.inspect(source, source_format)
        return source_format, inspected.virtual_size, inspected
    return source_format, os.path.getsize(source), None  # raw bytes (raw, ISO)


def _into_temp(dest: str, write, force: bool = False, sync: bool = True) -> None:
    """Run write(tmp) and rename tmp to dest when it is complete (synced first unless `sync` is
    False); never leave tmp behind."""
    tmp = _tmp_name(dest)
    try:
        try:
            write(tmp)
        except OSError as e:  # ENOSPC and friends name the destination the user gave
            if e.filename and e.filename != tmp:
                raise
            raise OSError(e.errno, e.strerror, dest) from None
        _finish_file(tmp, dest, force, sync)
    finally:
        import shutil
        shutil.rmtree(os.path.dirname(tmp), ignore_errors=True)


def _sealer_for(src: Stream, source: str, to: str, password, encrypt: bytes | None, decrypt: bool):
    """The sealer factory of an imgk destination (None: clear), after the clear-output rule."""
    keeps_encryption = to in DESTINATIONS and DESTINATIONS[to].encrypts  # not "rbd"
    encrypted = src.encrypted
    if encrypted and not decrypt and not keeps_encryption:
        raise InputError(f"{source} is encrypted: converting it to {to} writes the disk in clear",
                         hint="add --decrypt to confirm, or convert to .imgk to keep it encrypted")
    from ..formats.crypto import sealer_factory_for
    if encrypt is not None:
        return sealer_factory_for(encrypt)
    if encrypted and not decrypt and keeps_encryption:
        from ..formats.registry import password_provider
        return sealer_factory_for(password_provider(password)())  # the same password, a new data key
    return None


def _holds_a_disk(d: Destination | None) -> bool:
    """A destination qemu-img writes a hard disk into (the output of an overlay's convert)."""
    return d is not None and d.qemu_name is not None and not d.optical


def _route(src: Stream, source: str, dest: str, plan: _Plan, force: bool, progress: Progress,
           level: int | None, sealer_factory=None, sector_by_sector: bool = False, sync: bool = True) -> str:
    if plan.dest.route == CAPTURE:
        info = src.describe()
        if level is None:
            level = LEVEL_DEFAULT
        # Filesystem-aware like capture: only the blocks each filesystem uses are stored.
        from .capture import capture_stream  # imported where needed: `imgkit convert` starts sooner
        fs_plan = None
        if not sector_by_sector:
            from ..filesystems.fsaware import build_plan
            fs_plan = build_plan(src, path=source if src.raw_path() else None).plan
        capture_stream(src, dest, source_info=info, level=level, force=force, progress=progress,
                       sources=[source, *src.paths()], plan=fs_plan,
                       sealer_factory=sealer_factory)
        return "capture"
    if plan.dest.route == COPY:
        if plan.dest.optical:
            from ..filesystems.disk_info import optical_facts
            optical = src.metadata.get("optical") if src.metadata is not None else optical_facts(src)
            if not optical:
                raise InputError(f"{source} is not an optical image (no ISO 9660 volume descriptor at "
                                 f"sector 16): refusing to make an .{plan.to} of a hard disk",
                                 hint=f"convert it to {names(_holds_a_disk)} instead")
        _into_temp(dest, lambda tmp: _copy_to_raw(src, tmp, progress, sync), force, sync)
        return "copy"
    stream = PaddedStream(src, plan.size) if plan.size and plan.size != src.size else src
    if plan.dest.native is not None and plan.dest.native.applies(plan.subformat, plan.compress):
        # Written natively: the chunks decode in parallel, in order, and go straight into the file
        # (qemu-img reading the NBD export waited on each request; see formats/qcow2_writer.py).
        _into_temp(dest, lambda tmp: _write_native(plan.to, stream, tmp, progress, sync), force, sync)
        return "native"

    def write(tmp: str) -> None:
        from ..views.nbd_export import export_stream
        with export_stream(stream) as export:
            _run_qemu_img_convert(["-f", "raw", export.qemu_filename], plan, tmp, stream.size, progress, export,
                                  sync=sync)
    _into_temp(dest, write, force, sync)
    return "nbd-export"


def _with_overlay(source: str, dest: str, overlay: str, *, source_format, to, compress, subformat, preset, force,
                  password, progress: Progress, started: float, decrypt: bool = False,
                  sync: bool = True) -> ConvertResult:
    """The image with an `imgkit run --overlay` file's writes on top, as one standalone disk (what
    `run --mirror-to` does live, done offline): qemu-img reads the overlay, whose backing node is
    the image served by imgkit over NBD. The overlay must have been made over this very image."""
    from ..formats.registry import open_image
    from .vmrun import IDENTITY_PREFIX, image_identity, read_overlay_backing
    to = destination_format(dest, to)
    if not _holds_a_disk(DESTINATIONS.get(to)):
        raise InputError(f"--overlay: the destination must be {names(_holds_a_disk)}, not {to}")
    plan = _plan(to, subformat, compress, preset)
    if plan.pad_to_mib:
        raise InputError("--overlay does not combine with --preset azure")
    if not os.path.isfile(overlay):
        raise InputError(f"{overlay}: no such overlay file")
    _check_destination(source, dest, force)
    backing, vsize = read_overlay_backing(overlay)
    src = open_image(source, password, fmt=source_format)
    try:
        src_fmt = src.format_name or source_format or "raw"
        _sealer_for(src, source, to, password, None, decrypt)  # a clear output of an encrypted image needs --decrypt
        if backing != IDENTITY_PREFIX + image_identity(src, src_fmt):
            raise InputError(f"{overlay}: this overlay was made over a different image ({backing or 'none'})")
        if vsize != src.size:
            raise InputError(f"{overlay}: overlay size {vsize} differs from the image's {src.size}")
        progress.total = src.size

        def write(tmp: str) -> None:
            # qemu-img has no -blockdev, and through a json: name qemu puts the overlay header's backing
            # name on the NBD node (refused); so a private sparse copy of the overlay (only the guest's
            # writes, small next to the disk) gets the export's URI as its backing name instead.
            import subprocess
            import tempfile
            from ..views.nbd_export import export_stream
            with tempfile.TemporaryDirectory(prefix="imgkit-overlay-") as work, export_stream(src, socket_dir=work) as export:
                os.chmod(work, 0o700)
                copy = os.path.join(work, "overlay.qcow2")
                subprocess.run(["cp", "--sparse=always", "--reflink=auto", "--", overlay, copy], check=True)
                from ..platform.qemu_tools import run as run_qemu
                run_qemu(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", export.qemu_filename, "-F", "raw", copy],
                         what="qemu-img rebase (the overlay copy)")
                _run_qemu_img_convert(["-f", "qcow2", copy], plan, tmp, src.size, progress, export, sync=sync)
        _into_temp(dest, write, force, sync)
    finally:
        src.close()
    progress.finish()
    st = os.stat(dest)
    return ConvertResult(source=source, source_format=src_fmt, destination=dest, format=plan.to,
                         subformat=plan.subformat, virtual_size=vsize, file_size=st.st_size,
                         allocated_size=st.st_blocks * 512, seconds=round(time.monotonic() - started, 3),
                         method="nbd-export+overlay")
