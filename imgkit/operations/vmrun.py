"""`imgkit run`: boot a backup as a VM now, without converting it first (Veeam's Instant VM Recovery,
PBS live-restore), and optionally move it to a real disk while it runs (--mirror-to).

The block graph QEMU gets (every image kind goes through imgkit's NBD export, so the backup is only
ever read by imgkit's own reader, never opened writable by anyone):

    src     raw over NBD (imgkit/views/nbd_export.py), read-only
    cache   qcow2 in the private temp dir, backing src: what the guest reads, kept (copy-on-read
            node "cor" on top), so firmware's 512-byte reads are not NBD round trips each (boot-check
            measured 18,777 NBD reads -> 15 for linux-bios); it never holds a write
    disk    qcow2 overlay, backing cor: every guest write. A temp file, or --overlay FILE kept
            across runs. The guest's disk device sits on "disk".

An overlay file records which image it was made over in its backing-file name,
`imgkit-image:<identity>` (an imgk image's 128-bit image id; for other formats the size and a
SHA-256 of the first MiB), with backing format raw. The name is never opened (imgkit always gives the
backing node at run time) and no qemu tool can open it by itself, so the overlay is never used over
the wrong bytes by accident. A different identity is refused; --force starts a new overlay.

--mirror-to: QMP blockdev-mirror (sync=full) from "disk" into a new qcow2 while the guest runs, with
progress; at READY, block-job-complete pivots the guest's device onto the new disk, the old chain is
deleted from QEMU's graph and the NBD export stops: from then on the VM runs from the new disk alone.
The target is written under a temporary name and appears under its own name only once complete.
"""
from __future__ import annotations

import hashlib
import os
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from ..errors import InputError, OperationFailed
from ..platform.qemu_tools import Limits, find_program, kill_group, last_line, popen, wait_or_kill
from ..platform.writeback import publish_file

DEFAULT_MEMORY = 1 << 30
MAX_CPUS = 64
IDENTITY_PREFIX = "imgkit-image:"
QCOW2_MAGIC = b"QFI\xfb"
QCOW2_EXTERNAL_DATA = 1 << 2   # incompatible_features bit: the data lives in another file
IDENTITY_BYTES = 1 << 20
MIRROR_POLL = 0.5
QUIT_SECONDS = 30   # QEMU's time to exit after QMP quit before it is killed


@dataclass
class RunResult:
    image: str
    firmware: str
    media: str
    accel: str
    overlay: str | None             # the kept overlay (--overlay), None for a temp one
    exit_status: int | None         # QEMU's
    seconds: float
    mirror_to: str | None = None
    mirror_completed: bool = False
    mirror_seconds: float | None = None
    read_errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def image_identity(stream, fmt: str) -> str:
    """What an overlay records about the image under it."""
    if stream.image_id:  # the image names itself (imgk): the same image under any file name
        return f"{stream.format_name}-{stream.image_id.hex()}"
    digest = hashlib.sha256(stream.read(0, min(IDENTITY_BYTES, stream.size))).hexdigest()[:32]
    return f"{fmt}-{stream.size}-{digest}"


def read_overlay_backing(path: str) -> tuple[str | None, int]:
    """(backing file name, virtual size) from a qcow2 header, read by hand with every field bounded
    (a user's file: no qemu needed to tell whose overlay it is)."""
    with open(path, "rb") as f:
        head = f.read(80)
        if len(head) < 72 or head[:4] != QCOW2_MAGIC:
            raise InputError(f"{path}: not a qcow2 file", hint="use --force to replace it with a new overlay")
        (version,) = struct.unpack_from(">I", head, 4)
        # An external data file (qcow2 v3 incompatible feature bit 2) is a host path named in the
        # header that qemu would open, writable for run: imgkit never makes one, so it is refused.
        if version >= 3 and len(head) == 80 and struct.unpack_from(">Q", head, 72)[0] & QCOW2_EXTERNAL_DATA:
            raise InputError(f"{path}: a qcow2 with an external data file is not an imgkit overlay",
                             hint="use --force to replace it with a new overlay")
        backing_offset, backing_size = struct.unpack_from(">QI", head, 8)
        (virtual_size,) = struct.unpack_from(">Q", head, 24)
        if not backing_offset:
            return None, virtual_size
        if backing_size > 1023 or backing_offset > (1 << 20):
            raise InputError(f"{path}: implausible qcow2 backing-file field")
        f.seek(backing_offset)
        name = f.read(backing_size)
    return name.decode("utf-8", "replace"), virtual_size


def prepare_overlay(path: str, identity: str, size: int, force: bool, cluster: int | None = None) -> bool:
    """Create the overlay at `path`, or check that the existing one was made over this image.
    True when a new one was created."""
    expected = IDENTITY_PREFIX + identity
    if os.path.exists(path) and not force:
        name, vsize = read_overlay_backing(path)
        if name != expected:
            raise InputError(f"{path}: this overlay was made over a different image "
                             f"({name or 'no backing image'})",
                             hint="use the image it was made for, another --overlay file, or --force to start over")
        if vsize != size:
            raise InputError(f"{path}: overlay size {vsize} differs from the image's {size}")
        return False
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory")
    tmp = f"{path}.imgkit-new"
    from ..formats.qemu_image import create_overlay
    create_overlay(tmp, size, cluster=cluster, backing=expected)
    try:
        publish_file(tmp, path, replace=force)  # an overlay that appeared meanwhile is not replaced
    except FileExistsError as e:
        os.unlink(tmp)
        raise InputError(f"{path}: {e.strerror}", hint=None if force else "use --force to start a new overlay") from None
    return True


def _qemu_argv(qemu, plan, work, export, overlay, memory, cpus, accel, display, vnc, net, cdrom) -> list[str]:
    """The machine, firmware, QMP and sandbox as boot-check builds them (operations/bootcheck/
    qemu_cmdline.py); the display, console, network and the block graph of the module docstring."""
    from ..formats.qemu_image import create_overlay, filter_node, format_node
    from .bootcheck import qemu_cmdline as Q
    argv = Q.machine_args(qemu, "imgkit-run", accel, memory, cpus) + Q.qmp_args(work)
    # The guest may power off while a mirror still runs: QEMU then stays, paused, until done.
    argv += ["-no-shutdown"]
    if display == "vnc":
        argv += ["-display", f"vnc={vnc}", "-serial", "none"]
    else:
        # mux: Ctrl-A x quits QEMU, Ctrl-A h lists the keys; Ctrl-C goes to the guest (signal=off).
        argv += ["-display", "none", "-chardev", "stdio,id=con,mux=on,signal=off", "-serial", "chardev:con"]
    argv += ["-nic", "user,model=e1000" if net == "user" else "none"]
    argv += Q.blockdev(Q.nbd_source(export.socket_path))
    argv += Q.firmware_args(plan.firmware, work)
    if cdrom:
        argv += ["-device", "ide-cd,drive=src,bootindex=0"]
    else:
        cache = os.path.join(work, "cache.qcow2")
        create_overlay(cache, plan.size, cluster=Q.STREAM_CLUSTER)
        argv += (Q.blockdev(format_node(cache, "qcow2", node_name="cache", writable=True, backing="src"))
                 + Q.blockdev(filter_node("copy-on-read", "cor", over="cache"))
                 + Q.blockdev(format_node(os.path.abspath(overlay), "qcow2", node_name="disk", writable=True,
                                          backing="cor"))
                 + ["-device", "ide-hd,drive=disk,bootindex=0"])
    return argv + Q.sandbox_args(qemu)


class _Mirror:
    """blockdev-mirror of "disk" into a new qcow2, driven from the run loop."""

    def __init__(self, qmp, dest: str, size: int, force: bool, say):
        self.qmp, self.dest, self.say = qmp, os.path.abspath(dest), say
        self.tmp = f"{self.dest}.imgkit-part"
        self.started = time.monotonic()
        self.done = self.failed = False
        self.seconds = None
        self.ready = False
        self._last_report = 0.0
        from ..formats.qemu_image import create_overlay, format_node
        create_overlay(self.tmp, size, what="qemu-img create (the mirror target)")
        try:
            qmp.command("blockdev-add", **format_node(self.tmp, "qcow2", node_name="mirror", writable=True))
            qmp.command("blockdev-mirror", **{"job-id": "imgkit-mirror", "device": "disk", "target": "mirror",
                                              "sync": "full"})
        except BaseException:
            self.abandon()  # the caller has no _Mirror to abandon: the part file goes here
            raise
        say(f"mirroring to {self.dest} while the VM runs")

    def poll(self) -> None:
        """Progress, READY -> complete, COMPLETED -> finish."""
        for ev in list(self.qmp.events):
            name = ev.get("event")
            data = ev.get("data", {})
            if data.get("device") not in (None, "imgkit-mirror") and name and name.startswith("BLOCK_JOB"):
                continue
            if name == "BLOCK_JOB_READY" and not self.ready:
                self.ready = True
                self.say("mirror in sync: switching the VM to the new disk")
                self.qmp.command("block-job-complete", device="imgkit-mirror")
            elif name == "BLOCK_JOB_COMPLETED":
                if data.get("error"):
                    self.failed = True
                    self.say(f"mirror failed: {data['error']}")
                else:
                    self._finish()
            elif name == "BLOCK_JOB_CANCELLED":
                self.failed = True
                self.say("mirror cancelled")
        self.qmp.events[:] = [e for e in self.qmp.events if not str(e.get("event", "")).startswith("BLOCK_JOB")]
        now = time.monotonic()
        if not (self.done or self.failed) and now - self._last_report >= 1.0:
            self._last_report = now
            try:
                jobs = self.qmp.command("query-block-jobs")
            except (RuntimeError, OSError, EOFError, TimeoutError):
                jobs = []
            for j in jobs:
                if j.get("device") == "imgkit-mirror" and j.get("len"):
                    self.say(f"mirror: {100 * j['offset'] // j['len']}% "
                             f"({j['offset'] >> 20} of {j['len'] >> 20} MiB)", progress=True)

    def _finish(self) -> None:
        # Not writeback.publish: the guest already runs on this inode (QEMU keeps writing to it), so
        # the rename must not fail now over a name that appeared meanwhile (--force was checked at
        # the start); a refusal would leave the live disk under its temporary name.
        os.replace(self.tmp, self.dest)
        self.done = True
        self.seconds = round(time.monotonic() - self.started, 3)
        # The old chain is no longer in use: drop it from QEMU's graph (the NBD export stops after).
        for node in ("disk", "cor", "cache", "src"):
            try:
                self.qmp.command("blockdev-del", **{"node-name": node})
            except (RuntimeError, OSError, EOFError, TimeoutError) as e:
                self.say(f"note: could not detach {node}: {e}")
        self.say(f"the VM now runs from {self.dest}; the backup is no longer used "
                 f"(mirrored in {self.seconds:.1f} s)")

    def abandon(self) -> None:
        if not self.done:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass


def run_vm(image: str, *, overlay: str | None = None, force: bool = False, firmware: str = "auto",
           accel: str = "auto", memory: int = DEFAULT_MEMORY, cpus: int = 1, display: str = "none",
           vnc: str = "127.0.0.1:0", net: str = "none", mirror_to: str | None = None, password=None,
           fmt: str | None = None, log=None) -> RunResult:
    from ..formats.registry import detect, open_image
    from ..platform.accel import choose_accel
    from .bootcheck import plan_boot
    from .bootcheck.options import check_firmware, check_memory
    from ..views.nbd_export import export_stream
    from ..formats.detect import refuse_json_name

    say = log or (lambda msg, progress=False: print(f"imgkit: run: {msg}", file=sys.stderr, flush=True))
    # boot-check's own checks: the same limits, messages and exit code in both commands
    check_firmware(firmware)
    check_memory(memory)
    if not (1 <= cpus <= MAX_CPUS):
        raise InputError(f"--cpus must be between 1 and {MAX_CPUS}")
    if mirror_to:
        if os.path.exists(mirror_to) and not force:
            raise InputError(f"{mirror_to}: exists", hint="use --force to replace it")
        if overlay and os.path.abspath(overlay) == os.path.abspath(mirror_to):
            raise InputError("--mirror-to and --overlay must be different files")
    qemu = find_program("qemu-system-x86_64")
    refuse_json_name(image)
    if not os.path.exists(image):
        raise InputError(f"{image}: no such file or device")
    fmt = fmt or detect(image)
    for other in (overlay, mirror_to):
        if other and os.path.exists(other) and os.path.samefile(other, image):
            raise InputError(f"{other}: is the image itself")
    accel_name, _why = choose_accel(accel)
    started = time.monotonic()
    stream = open_image(image, password, fmt=fmt, serving=True)
    try:
        plan = plan_boot(stream, fmt, firmware, stream.metadata)
        cdrom = plan.media == "cdrom"
        if cdrom and (overlay or mirror_to):
            raise InputError("an ISO boots as a read-only CD-ROM: --overlay and --mirror-to do not apply")
        with tempfile.TemporaryDirectory(prefix="imgkit-run-") as work:
            os.chmod(work, 0o700)
            ov_path = overlay or os.path.join(work, "overlay.qcow2")
            if not cdrom:
                created = prepare_overlay(ov_path, image_identity(stream, fmt), stream.size, force)
                if overlay:
                    say(f"{'new' if created else 'reusing'} overlay {overlay}")

            def on_error(message: str) -> None:
                say(f"I/O error for the guest: {message}")
            with export_stream(stream, socket_dir=work, on_error=on_error) as export:
                argv = _qemu_argv(qemu, plan, work, export, ov_path, memory, cpus, accel_name, display, vnc,
                                  net, cdrom)
                result = _supervise(argv, work, memory, plan, accel_name, image, overlay, mirror_to, force,
                                    stream.size, export, say)
                result.read_errors = list(export.errors)
            result.seconds = round(time.monotonic() - started, 3)
            return result
    finally:
        stream.close()


def _supervise(argv, work, memory, plan, accel, image, overlay, mirror_to, force, size, export, say) -> RunResult:
    import select

    from ..platform.accel import kvm_failure
    from ..platform.qmp import QmpClient
    limits = Limits(cpu_seconds=None, address_space=memory + (4 << 30), wall_seconds=None)
    stderr_path = os.path.join(work, "qemu.stderr")
    with open(stderr_path, "wb") as stderr:
        # The serial console is imgkit's own stdin/stdout (QEMU inherits them).
        proc = popen(argv, limits, stdin=None, stderr=stderr)
    mirror = None
    qmp = None
    powered_off = stuck = False
    try:
        try:
            qmp = QmpClient(os.path.join(work, "qmp.sock"), proc)
        except (OSError, EOFError, TimeoutError):
            qmp = None
        if qmp is not None and mirror_to:
            mirror = _Mirror(qmp, mirror_to, size, force, say)
        while proc.poll() is None:
            if qmp is None:
                time.sleep(0.2)
                continue
            ready, _, _ = select.select([qmp], [], [], MIRROR_POLL)
            if ready:
                try:
                    qmp.pump()
                except (EOFError, OSError):
                    qmp = None
                    continue
            if any(e.get("event") == "SHUTDOWN" for e in qmp.events):
                powered_off = True
                qmp.events[:] = [e for e in qmp.events if e.get("event") != "SHUTDOWN"]
            if mirror is not None and not (mirror.done or mirror.failed):
                mirror.poll()
                if mirror.done:
                    export.close()  # nothing reads the backup any more
            if powered_off and (mirror is None or mirror.done or mirror.failed):
                try:
                    qmp.command("quit")
                except (RuntimeError, OSError, EOFError, TimeoutError):
                    pass
                if not wait_or_kill(proc, QUIT_SECONDS):
                    # the guest's work is over (powered off, mirror settled): a QEMU stuck on its
                    # way out is stopped and said so, not a reason to fail the run
                    say(f"QEMU did not exit within {QUIT_SECONDS} s of being told to quit: stopped it")
                    stuck = True
        code = None if stuck else proc.wait()
    except KeyboardInterrupt:
        say("stopping the VM")
        code = None
        raise
    finally:
        if qmp is not None:
            qmp.close()
        kill_group(proc)
        if mirror is not None:
            mirror.abandon()
    if code not in (0, None):
        line = last_line(stderr_path) or f"exit status {code}"
        if problem := kvm_failure(line):
            raise problem
        raise OperationFailed(f"qemu: {line}")
    if mirror is not None and not mirror.done:
        raise OperationFailed(f"the mirror to {mirror_to} did not complete; nothing was left under that name")
    return RunResult(image=image, firmware=plan.firmware, media=plan.media, accel=accel, overlay=overlay,
                     exit_status=code, seconds=0.0, mirror_to=os.path.abspath(mirror_to) if mirror_to else None,
                     mirror_completed=bool(mirror and mirror.done),
                     mirror_seconds=mirror.seconds if mirror else None)
