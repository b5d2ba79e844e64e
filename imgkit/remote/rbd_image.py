"""Ceph RBD block images as a capture source and a restore/convert target, through librbd
(python3-rbd, Debian's: importable from the venv built with --system-site-packages).

`rbd:pool/image` (a source may add `@snapshot`). The cluster comes from CEPH_CONF (the CLI's
--ceph-conf sets it) or /etc/ceph/ceph.conf, the user from CEPH_CLIENT_NAME (default client.admin)
and its keyring from the configuration, as with the `rbd` tool.

Source: read from a snapshot, so the copy is consistent (crash-consistent for a running VM): the
user's `@snapshot`, or one imgkit creates for the capture and removes afterwards. Runs come from
diff_iterate, so unallocated extents are never read and the capture is as sparse as the image.

Target: never an image that exists unless `force`; never an image in use (a watcher: a running VM,
a kernel mapping) even with it. A new image of exactly the image's size is written under a temporary
name (only its data: a new RBD image reads as zeros, so zero ranges are not written, and zero 64 KiB
pieces inside data are skipped too), checked, and then renamed into place: the final name never
holds a half-written image.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from ..errors import EnvironmentProblem, InputError, Interrupted, RefusedTarget
from ..progress import NullProgress, Progress
from ..stream import DATA, ZERO, Run, Stream, merge_runs
from .locations import RBD_PREFIX as PREFIX

SPARSE_GRAIN = 64 << 10
_ZERO_GRAIN = bytes(SPARSE_GRAIN)
AIO_INFLIGHT = 16       # writes in flight: librbd spreads them over the image's 4 MiB objects
WRITE_PIECE = 4 << 20   # an RBD object: a piece never spans two objects more than needed


@dataclass(frozen=True)
class RbdSpec:
    pool: str
    image: str
    snapshot: str | None = None

    def __str__(self) -> str:
        return f"{PREFIX}{self.pool}/{self.image}" + (f"@{self.snapshot}" if self.snapshot else "")


def parse(location: str, allow_snapshot: bool = True) -> RbdSpec:
    rest = location[len(PREFIX):]
    pool, sep, name = rest.partition("/")
    snap = None
    if "@" in name:
        name, snap = name.split("@", 1)
    if not sep or not pool or not name or "/" in name or (snap is not None and not snap):
        raise InputError(f"{location}: expected rbd:POOL/IMAGE" + ("[@SNAPSHOT]" if allow_snapshot else ""))
    if snap and not allow_snapshot:
        raise InputError(f"{location}: a snapshot is read-only: name an image to write")
    return RbdSpec(pool, name, snap)


def _modules():
    try:
        import rados
        import rbd
    except ImportError:
        raise EnvironmentProblem("python3-rados / python3-rbd are not installed",
                                 hint="run ./scripts/setup.sh (apt install python3-rbd)") from None
    return rados, rbd


class Connection:
    """A cluster connection and one pool's I/O context."""

    def __init__(self, spec: RbdSpec):
        rados, rbd = _modules()
        self.spec = spec
        conf = os.environ.get("CEPH_CONF", "")  # '' lets librados search its default places
        try:
            self.cluster = rados.Rados(conffile=conf, name=os.environ.get("CEPH_CLIENT_NAME", "client.admin"))
            self.cluster.connect(timeout=30)
        except rados.Error as e:
            raise InputError(f"{spec}: cannot connect to the Ceph cluster ({e})",
                             hint="set CEPH_CONF or --ceph-conf, and the keyring it names") from None
        try:
            self.ioctx = self.cluster.open_ioctx(spec.pool)
        except rados.ObjectNotFound:
            self.cluster.shutdown()
            raise InputError(f"{spec}: no pool {spec.pool!r}") from None
        self.rbd = rbd.RBD()

    def exists(self, name: str) -> bool:
        return name in self.rbd.list(self.ioctx)

    def watchers(self, name: str) -> list[dict]:
        """Clients watching the image (a VM's librbd, a kernel mapping): it is in use."""
        _, rbd = _modules()
        with rbd.Image(self.ioctx, name, read_only=True) as img:
            return list(img.watchers_list())

    def close(self) -> None:
        self.ioctx.close()
        self.cluster.shutdown()


class RbdSource(Stream):
    """An RBD image (at a snapshot) as a Stream; unallocated extents are ZERO runs."""

    image = None  # the open librbd image; None before it opens and after close()

    def __init__(self, location: str):
        _, rbd = _modules()
        self.path = location
        self.spec = parse(location)
        self.conn = Connection(self.spec)
        self._own_snap = None
        try:
            if not self.conn.exists(self.spec.image):
                raise InputError(f"{location}: no such RBD image")
            snap = self.spec.snapshot
            if snap is None:  # a consistent copy even while a VM writes to the image
                snap = f"imgkit-capture-{os.getpid()}-{os.urandom(3).hex()}"
                try:
                    with rbd.Image(self.conn.ioctx, self.spec.image) as img:
                        img.create_snap(snap)
                except rbd.PermissionError:
                    raise InputError(f"{location}: no permission to snapshot the image for a consistent copy",
                                     hint=f"name an existing snapshot: {self.spec}@SNAPSHOT") from None
                self._own_snap = snap
            try:
                self.image = rbd.Image(self.conn.ioctx, self.spec.image, snapshot=snap, read_only=True)
            except rbd.ImageNotFound:
                raise InputError(f"{location}: no such snapshot") from None
            self.size = self.image.size()
            self._lock = threading.Lock()
        except BaseException:
            self._drop_snapshot()
            self.conn.close()
            raise

    def describe(self) -> dict:
        return {"path": str(self.spec), "kind": "rbd", "size": self.size, "logical_sector_size": 512,
                "physical_sector_size": 512, "model": None, "serial": None}

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        return self.image.read(offset, min(length, self.size - offset))

    def runs(self) -> Iterator[Run]:
        extents: list[tuple[int, int]] = []
        self.image.diff_iterate(0, self.size, None, lambda off, n, exists: extents.append((off, n, exists)))
        out, pos = [], 0
        for off, n, exists in sorted(extents):
            if not exists:
                continue
            if off > pos:
                out.append(Run(ZERO, pos, off - pos))
            out.append(Run(DATA, off, n))
            pos = off + n
        if pos < self.size:
            out.append(Run(ZERO, pos, self.size - pos))
        return merge_runs(out)

    def _drop_snapshot(self) -> None:
        if self._own_snap is None:
            return
        _, rbd = _modules()
        try:
            with rbd.Image(self.conn.ioctx, self.spec.image) as img:
                img.remove_snap(self._own_snap)
        except rbd.Error:
            pass
        self._own_snap = None

    def close(self) -> None:
        image = self.image
        if image is not None:
            image.close()
            self.image = None
            self._drop_snapshot()
            self.conn.close()


@dataclass
class RbdWriteResult:
    target: str
    bytes_written: int
    seconds: float
    replaced: bool


def _data_pieces(image: Stream, piece: int) -> Iterator[tuple[int, int]]:
    for run in image.runs():
        if run.kind != DATA:
            continue
        pos = run.offset
        while pos < run.end:
            n = min(run.end - pos, piece - pos % piece)
            yield pos, n
            pos += n


def check_target(location: str, force: bool) -> RbdSpec:
    """Refuse before anything is read: an existing image without force, an image in use ever."""
    spec = parse(location, allow_snapshot=False)
    conn = Connection(spec)
    try:
        if conn.exists(spec.image):
            if not force:
                raise RefusedTarget(f"{spec} already exists", hint="use --force to replace it")
            watchers = conn.watchers(spec.image)
            if watchers:
                raise RefusedTarget(f"{spec} is in use ({len(watchers)} watcher(s): a running VM or a "
                                    f"kernel mapping, e.g. {watchers[0].get('addr')})",
                                    hint="stop the VM or `rbd unmap` it first")
    finally:
        conn.close()
    return spec


def write_image(image: Stream, location: str, *, force: bool = False, progress: Progress | None = None,
                workers: int | None = None, verify: bool = False) -> RbdWriteResult:
    """Write `image` as the RBD image at `location` (rules in the module docstring)."""
    from ..views.caching_reader import CachingReader
    _, rbd = _modules()
    progress = progress or NullProgress()
    started = time.monotonic()
    spec = check_target(location, force)
    conn = Connection(spec)
    tmp = f"{spec.image}.imgkit-partial-{os.getpid()}-{os.urandom(3).hex()}"
    written = 0
    created = False
    try:
        conn.rbd.create(conn.ioctx, tmp, image.size, old_format=False)
        created = True
        with rbd.Image(conn.ioctx, tmp) as out:
            if out.size() != image.size:
                raise RefusedTarget(f"{spec}: created with {out.size()} bytes, expected {image.size}")
            # librbd's cache stays write-through until it sees a flush (rbd_cache_writethrough_until_flush,
            # a guard for guests that never flush); we flush at the end, so say so now, as qemu does.
            out.flush()
            progress.total = image.size
            for run in image.runs():
                if run.kind != DATA:
                    progress.advance(run.length)
            piece = image.unit_size or WRITE_PIECE
            sem = threading.BoundedSemaphore(AIO_INFLIGHT)
            errors: list[int] = []

            def done(completion) -> None:
                if completion.get_return_value() < 0:
                    errors.append(completion.get_return_value())
                sem.release()

            def submit(data, offset) -> None:
                sem.acquire()
                if errors:
                    raise InputError(f"{spec}: write failed (error {errors[0]})")
                out.aio_write(bytes(data), offset, done)

            read_workers = workers or image.read_workers  # an image in S3: several GETs in flight
            image.read_sequentially()
            reader = CachingReader(image, cache_bytes=0)  # the one read engine: a front-to-back pass
            for (offset, length), data in reader.map_pieces(_data_pieces(image, piece), read_workers):
                view = memoryview(data)
                start = None
                for pos in range(0, length, SPARSE_GRAIN):  # zero pieces stay unallocated
                    if view[pos:pos + SPARSE_GRAIN] == _ZERO_GRAIN[:min(SPARSE_GRAIN, length - pos)]:
                        if start is not None:
                            submit(view[start:pos], offset + start)
                            written += pos - start
                            start = None
                    elif start is None:
                        start = pos
                if start is not None:
                    submit(view[start:], offset + start)
                    written += length - start
                progress.advance(length)
            for _ in range(AIO_INFLIGHT):  # wait for every write
                sem.acquire()
            if errors:
                raise InputError(f"{spec}: write failed (error {errors[0]})")
            out.flush()
            if verify:
                _verify(image, out, spec, piece, read_workers)
        replaced = conn.exists(spec.image)
        if replaced:  # checked before writing; it may have been created or opened since
            if not force:
                raise RefusedTarget(f"{spec} was created while the restore ran: left as it is",
                                    hint="use --force to replace it")
            if conn.watchers(spec.image):
                raise RefusedTarget(f"{spec} came into use during the restore: left as it was")
            conn.rbd.remove(conn.ioctx, spec.image)
        conn.rbd.rename(conn.ioctx, tmp, spec.image)
        created = False
    except KeyboardInterrupt:
        raise Interrupted(f"write to {spec} interrupted: the image was not written") from None
    except rbd.Error as e:
        raise InputError(f"{spec}: RBD operation failed ({e})") from None
    finally:
        if created:
            try:
                conn.rbd.remove(conn.ioctx, tmp)
            except rbd.Error:
                pass
        conn.close()
    progress.finish()
    return RbdWriteResult(str(spec), written, time.monotonic() - started, replaced)


def _verify(image: Stream, out, spec: RbdSpec, piece: int, workers) -> None:
    from ..errors import OperationFailed
    from ..platform.parallel import ordered_map
    pieces = [(o, min(piece, image.size - o)) for o in range(0, image.size, piece)]
    with ordered_map(lambda p: (p, out.read(*p) == image.read(*p)), pieces, workers) as checked:
        for (o, n), same in checked:
            if not same:
                raise OperationFailed(f"verify after restore: {spec} differs from the image at offset {o}")


def qemu_filename(location: str) -> str:
    """The name qemu's rbd driver takes (rbd:pool/image[@snap][:conf=FILE])."""
    spec = parse(location)
    conf = os.environ.get("CEPH_CONF")
    name = f"rbd:{spec.pool}/{spec.image}" + (f"@{spec.snapshot}" if spec.snapshot else "")
    return name + (f":conf={conf}" if conf else "")


