"""boot_check: open the image, plan the boot, give QEMU the image's block node, run, report."""
from __future__ import annotations

import os
import tempfile
import time

from ...errors import InputError
from ...platform.accel import choose_accel
from ...platform.qemu_tools import find_program
from . import qemu_cmdline
from .options import DEFAULT_MEMORY, DEFAULT_TIMEOUT, BootOptions
from .plan import plan_boot
from .result import BootResult
from .runner import BootRun

PLAN_CACHE = 8 << 20   # planning makes many small reads of the same first chunks


def boot_check(image: str, *, expect: str | None = None, firmware: str = "auto", timeout: float = DEFAULT_TIMEOUT,
               memory: int = DEFAULT_MEMORY, accel: str = "auto", screenshot: str | None = None,
               password=None, fmt: str | None = None, console_log: str | None = None) -> BootResult:
    """Boot `image` (any format imgkit reads) and report. Raises InputError for unusable arguments
    or images, EnvironmentProblem when QEMU or OVMF is missing; a failed boot is a BootResult."""
    from ...formats.detect import refuse_json_name
    from ...formats.registry import detect, lookup, open_image
    from ...remote.locations import is_s3
    from ...views.caching_reader import CachingReader

    started = time.monotonic()
    options = BootOptions(expect=expect, firmware=firmware, timeout=timeout, memory=memory, accel=accel,
                          screenshot=screenshot, console_log=console_log)
    qemu = find_program("qemu-system-x86_64")
    if is_s3(image):  # an imgk image in S3: served over NBD from ranged GETs, like a local one
        fmt = fmt or "imgk"
    else:
        refuse_json_name(image)
        if not os.path.exists(image):
            raise InputError(f"{image}: no such file or device")
        fmt = fmt or detect(image)
    accel_choice = choose_accel(accel)

    stream = open_image(image, password, fmt=fmt)  # inspects foreign headers, checks imgk structure
    pinned_fd = None
    try:
        with CachingReader(stream, PLAN_CACHE) as probe:
            plan = plan_boot(probe, fmt, firmware, stream.metadata)
        entry = lookup(fmt)  # open_image accepted it
        if entry.via_qemu:
            # QEMU reads the very file that was inspected: the inspection's descriptor, duplicated
            # before the planning stream (which owns it) closes, never the path again.
            pinned_fd = os.dup(stream.inspected.fd)
        if entry.qemu_driver is not None:
            stream.close()  # qemu opens the file itself; the Stream was only for planning
            stream = None
        with tempfile.TemporaryDirectory(prefix="imgkit-boot-") as work:
            os.chmod(work, 0o700)
            if stream is not None:
                from ...views.nbd_export import export_stream
                with export_stream(stream, socket_dir=work) as export:
                    src = qemu_cmdline.nbd_source(export.socket_path)
                    return BootRun(qemu, image, plan, options, accel_choice, src, work, True, started).run()
            # never a backing file; a foreign image through its inspected descriptor
            src = qemu_cmdline.file_source(image, fmt, fd=pinned_fd)
            return BootRun(qemu, image, plan, options, accel_choice, src, work, False, started,
                           pass_fds=(pinned_fd,) if pinned_fd is not None else ()).run()
    finally:
        if stream is not None:
            stream.close()
        if pinned_fd is not None:
            os.close(pinned_fd)
