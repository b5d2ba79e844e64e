"""Run one ImageTree as a FUSE filesystem until it is unmounted or told to stop.

Shutdown order matters: the libguestfs appliance reads our own disk.raw, so it is shut down (in a
worker thread, while this loop still answers its last requests) before the session is ended."""
from __future__ import annotations

import logging
import signal
from typing import Callable

import pyfuse3
import trio

from imgkit.views.vfs import ImageTree

from .operations import ImageOperations

log = logging.getLogger("imgkit.operations.mount")
MAX_READ = 1 << 20
BDI_READ_AHEAD_KB = 4096


def mount_options(allow_other: bool = False) -> set[str]:
    opts = {"ro", "nosuid", "nodev", "fsname=imgkit", "subtype=imgkit"}
    if allow_other:
        # Other users see the image's own owners and modes, so the kernel must enforce them.
        opts |= {"allow_other", "default_permissions"}
    return opts


def _tune_read_ahead(mountpoint: str) -> None:
    """Buffered reads come in read_ahead_kb pieces (up to max_pages): raise it from 128 KiB. Found via
    mountinfo, never by stat()ing the mount (that would wait for this very loop)."""
    import os

    from imgkit.platform.blockdev import mountinfo
    target = os.path.abspath(mountpoint)  # realpath would lstat the mount: a request to ourselves
    dev = None
    try:
        for e in mountinfo():
            if e.mount_point == target and e.fstype == "fuse.imgkit":
                dev = e.device
        if dev:
            with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
                f.write(str(BDI_READ_AHEAD_KB))
    except OSError:
        pass


def serve(tree: ImageTree, mountpoint: str, *, allow_other: bool = False,
          on_ready: Callable[[], None] | None = None, workers: int = 2) -> None:
    """Mount, serve until unmounted or SIGINT/SIGTERM/SIGHUP, unmount. Raises RuntimeError when the
    kernel refuses the mount."""
    ops = ImageOperations(tree, workers)
    pyfuse3.init(ops, mountpoint, mount_options(allow_other))
    try:
        trio.run(_main, ops, tree, mountpoint, on_ready)
    finally:
        try:
            pyfuse3.close(unmount=True)
        finally:
            try:
                ops.close()  # no prefetch thread may read the image after this
            finally:
                tree.close()
        log.info("unmounted %s", mountpoint)


async def _main(ops: ImageOperations, tree: ImageTree, mountpoint: str, on_ready) -> None:
    async with trio.open_nursery() as nursery:
        ops.set_nursery(nursery)

        async def fuse_loop():
            try:
                await pyfuse3.main(min_tasks=2, max_tasks=64)
            finally:
                nursery.cancel_scope.cancel()

        async def stop_on_signal():
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
                async for signum in signals:
                    log.info("signal %d: unmounting", signum)
                    await trio.to_thread.run_sync(tree.close)
                    pyfuse3.terminate()
                    return

        async def tune_read_ahead():
            # The kernel sets the mount's read-ahead when it gets the reply to FUSE_INIT; this
            # runs after that (INIT is the first request, answered before any other).
            await ops.initialized.wait()
            await trio.sleep(0.05)
            _tune_read_ahead(mountpoint)

        nursery.start_soon(fuse_loop)
        nursery.start_soon(stop_on_signal)
        nursery.start_soon(tune_read_ahead)
        await trio.sleep(0)
        if on_ready is not None:
            on_ready()
