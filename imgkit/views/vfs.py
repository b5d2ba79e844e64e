"""What an image looks like as a file tree. This module and only this one defines it; the FUSE
adapter (fuse/imgkit_fuse) is a thin protocol layer over it and has no say in names or contents.

    /disk.raw                 the whole disk, byte-exact
    /partitions/p<N>.raw      each partition; /partitions/<label>.raw is a symlink to it
    /files/p<N>/...           the files of each filesystem, through a FilesBackend (the libguestfs
                              appliance), started lazily on first access
    /info.json                what `imgkit info --json` prints

No FUSE imports here: nodes, inode numbers, listings, attributes and read(ino, offset, size).
Errors are imgkit errors (CorruptChunk, NoSuchEntry, ...); the adapter maps them to errno values.
Calls may block (decompression, the appliance): the adapter runs them in worker threads, so every
method here is thread-safe.
"""
from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from .caching_reader import CachingReader, ReadHandle
from .chunk_cache import ChunkCache
from .guest_extents import GuestExtents
from ..errors import ImgkitError, InputError
from ..formats.partitions import is_extended_type
from ..stream import Stream

log = logging.getLogger("imgkit.files")
ROOT_INO = 1
DISK_INO = 2
INFO_INO = 3
PARTITIONS_INO = 4
FILES_INO = 5
_PART_BASE = 100  # partitions/p<N>.raw = _PART_BASE + index
_ALIAS_BASE = 10_000  # partitions/<label>.raw
_FS_ROOT_BASE = 20_000  # files/p<N>
_GUEST_BASE = 1_000_000  # everything inside files/p<N>/, allocated on first sight

# Filesystems the libguestfs appliance reads (the files view offers only these).
FILES_FILESYSTEMS = {"ext2", "ext3", "ext4", "vfat", "ntfs", "exfat", "xfs", "btrfs", "iso9660"}
NAME_MAX = 255
# Loads of a node (listing, symlink target, root stat) are serialised by a lock of this striped pool,
# not one lock a node: a lock is ~60 bytes and 16,000 entries mostly never load.
NODE_LOCKS = 64
GUEST_CACHE_MAX = 8 << 20  # the guest-file block cache's share of the cache budget, at most
LISTING_BATCH = 500  # names per lstatnslist call: keeps each appliance message well under its 4 MiB cap


class NoSuchEntry(InputError):
    """A name that is not in the tree (ENOENT)."""


class NotADirectory(InputError):
    """A directory operation on a file (ENOTDIR)."""


class FilesUnavailable(ImgkitError):
    """The files view cannot be served (the appliance failed to start, a filesystem did not mount)."""


@dataclass(slots=True)  # one per entry of the files view (16,143 for bench input F): no __dict__
class Attr:
    ino: int
    mode: int
    size: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    blocks: int = -1  # 512-byte blocks; -1 = derive from size

    def __post_init__(self):
        if self.blocks < 0:
            self.blocks = (self.size + 511) // 512


class FilesBackend(Protocol):
    """What the files view needs from whatever reads filesystems (imgkit.filesystems.guestfs_session)."""

    def root_stat(self, fs: str) -> dict: ...
    def listdir(self, fs: str, path: str) -> list[tuple[str, dict]]: ...
    def readlink(self, fs: str, path: str) -> str: ...
    def pread(self, fs: str, path: str, size: int, offset: int) -> bytes: ...
    def close(self) -> None: ...
    # Extent maps of ext filesystems (guest_extents.py): facts of the superblock (None: not ext), the
    # regular files' `inode size` lines and debugfs' maps, all text from the appliance, bounded by
    # filesystems/ext_extents.py. A backend that cannot answer raises FilesUnavailable.
    def ext_facts(self, fs: str) -> dict | None: ...
    def ext_regular_files(self, fs: str) -> bytes: ...
    def ext_extent_maps(self, fs: str, inodes: list[int]) -> bytes: ...


def _guest_number(value) -> int:
    """An inode number from the appliance's lstat (untrusted): 0 when it is not a plausible one."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        return 0
    return n if 0 < n < 1 << 32 else 0


# -- the tree ---------------------------------------------------------------------------------------
@dataclass(slots=True)  # one per entry, like Attr: slots keep a node at its fields (no __dict__)
class _Node:
    attr: Attr
    kind: str  # "dir", "disk" (a byte range of the disk), "bytes", "symlink", "fsroot", "guest"
    parent: int = ROOT_INO
    children: dict[bytes, int] | None = None  # dirs: name -> ino, in listing order
    start: int = 0  # "disk": offset of the range on the disk
    content: bytes = b""  # "bytes": the file; "symlink": the target
    fs: str = ""  # "fsroot"/"guest": the filesystem's name in the files view (p1, disk)
    path: str = ""  # "guest": the path inside that filesystem ("" for its root)
    guest_ino: int = 0  # "guest" regular files: the inode number in its filesystem (for extent maps)


def safe_name(text: str) -> bytes | None:
    """A name from the image (label, file name) as a directory entry, or None when it cannot be one.
    Image strings are untrusted: no '/', no NUL, not '.' or '..', at most NAME_MAX bytes."""
    raw = os.fsencode(text)
    if not raw or raw in (b".", b"..") or b"/" in raw or b"\0" in raw or len(raw) > NAME_MAX:
        return None
    return raw


def _label_alias(label: str) -> bytes | None:
    cleaned = re.sub(r"[\x00-\x1f/\x7f]", "_", label).strip()
    return safe_name(cleaned + ".raw") if cleaned else None


class ImageTree:
    """The tree of one opened image. `files_backend(device_map)` is called at most once, on the
    first access to files/, with {fs name: device index} ("p1" -> 1, "disk" -> 0)."""

    def __init__(self, stream: Stream, info: dict, *, cache_bytes: int = 64 << 20,
                 files_backend: Callable[[dict[str, int]], FilesBackend] | None = None,
                 mtime_ns: int | None = None, uid: int | None = None, gid: int | None = None):
        # The disk's bytes come through the one caching reader; disk.raw and partitions/ share it.
        self.disk = stream if isinstance(stream, CachingReader) else CachingReader(stream, cache_bytes)
        self.info = info
        self._files_factory = files_backend
        self._files: FilesBackend | None = None
        self._files_lock = threading.Lock()
        self._files_error: ImgkitError | None = None
        # Blocks of guest files read through the appliance, inside the disk cache's budget (the
        # --cache-size the user gave: one bound for all decoded bytes the daemon keeps), at most
        # an eighth of it (two blocks at least): what this cache holds, the disk cache gives up.
        share = min(GUEST_CACHE_MAX, max(2 * self.GUEST_BLOCK, self.disk.cache.max_bytes // 8))
        self._guest_file_cache = ChunkCache(share, within=self.disk.cache)
        now = mtime_ns if mtime_ns is not None else time.time_ns()
        self._base = dict(uid=os.getuid() if uid is None else uid, gid=os.getgid() if gid is None else gid,
                          atime_ns=now, mtime_ns=now, ctime_ns=now)
        self.nodes: dict[int, _Node] = {}
        self._node_locks = tuple(threading.Lock() for _ in range(NODE_LOCKS))
        self._next_guest = _GUEST_BASE
        self._ino_lock = threading.Lock()
        self.fs_devices: dict[str, int] = {}
        self.fs_areas: dict[str, tuple[int, int]] = {}  # fs -> (start, size) of its partition on the disk
        self._build()
        self.extents = GuestExtents(self.disk, self.files, self.fs_areas)

    # construction ---------------------------------------------------------------------------
    def _dir(self, ino: int, parent: int) -> _Node:
        node = _Node(Attr(ino, stat.S_IFDIR | 0o555, nlink=2, **self._base), "dir", parent, {})
        self.nodes[ino] = node
        return node

    def _add(self, parent: _Node, name: bytes, node: _Node) -> None:
        node.parent = parent.attr.ino
        self.nodes[node.attr.ino] = node
        parent.children[name] = node.attr.ino

    def _build(self) -> None:
        root = self._dir(ROOT_INO, ROOT_INO)
        size = self.disk.size
        self._add(root, b"disk.raw", _Node(Attr(DISK_INO, stat.S_IFREG | 0o444, size, **self._base), "disk"))
        parts_dir = self._dir(PARTITIONS_INO, ROOT_INO)
        files_dir = self._dir(FILES_INO, ROOT_INO)
        root.children[b"partitions"] = PARTITIONS_INO
        root.children[b"files"] = FILES_INO
        info_bytes = (json.dumps(self.info, indent=2, sort_keys=True) + "\n").encode()
        self._add(root, b"info.json", _Node(Attr(INFO_INO, stat.S_IFREG | 0o444, len(info_bytes), **self._base),
                                            "bytes", content=info_bytes))
        table = self.info.get("partition_table") or {}
        aliases: dict[bytes, list[bytes]] = {}
        for k, p in enumerate(table.get("partitions") or []):
            if is_extended_type(str(p.get("type") or "")):
                continue  # a container of logical partitions, not a partition with contents
            start, psize = int(p["start"]), int(p["size"])
            if start >= size:
                continue
            psize = min(psize, size - start)  # a table pointing past the end: show what exists
            name = f"p{int(p['number'])}"
            self._add(parts_dir, f"{name}.raw".encode(),
                      _Node(Attr(_PART_BASE + k, stat.S_IFREG | 0o444, psize, **self._base), "disk", start=start))
            label = p.get("label") or p.get("name")
            alias = _label_alias(label) if isinstance(label, str) else None
            if alias:
                aliases.setdefault(alias, []).append(f"{name}.raw".encode())
            if p.get("filesystem") in FILES_FILESYSTEMS:
                self._add_fs_root(files_dir, name, int(p["number"]), k)
                self.fs_areas[name] = (start, psize)
        # An alias only when it is unambiguous and does not shadow a p<N>.raw name.
        for k, (alias, targets) in enumerate(sorted(aliases.items())):
            if len(targets) == 1 and alias not in parts_dir.children:
                self._add(parts_dir, alias, _Node(Attr(_ALIAS_BASE + k, stat.S_IFLNK | 0o777, len(targets[0]),
                                                       **self._base), "symlink", content=targets[0]))
        if table.get("type", "none") == "none":
            fs = table.get("filesystem") or ("iso9660" if self.info.get("optical") else None)
            if fs in FILES_FILESYSTEMS:
                self._add_fs_root(files_dir, "disk", 0, 9999)
                self.fs_areas["disk"] = (0, size)

    def _add_fs_root(self, files_dir: _Node, name: str, device: int, k: int) -> None:
        self.fs_devices[name] = device
        node = _Node(Attr(_FS_ROOT_BASE + k, stat.S_IFDIR | 0o555, nlink=2, **self._base), "fsroot",
                     fs=name, path="")
        self._add(files_dir, name.encode(), node)

    # the files backend ----------------------------------------------------------------------
    def files(self) -> FilesBackend:
        with self._files_lock:
            if self._files is None:
                if self._files_error is not None:
                    raise self._files_error
                if self._files_factory is None:
                    self._files_error = FilesUnavailable("the files view is not available for this mount")
                    raise self._files_error
                try:
                    self._files = self._files_factory(dict(self.fs_devices))
                except ImgkitError as e:
                    self._files_error = e
                    raise
            return self._files

    @property
    def files_started(self) -> bool:
        return self._files is not None

    def stop_read_ahead(self) -> None:
        self.disk.close()

    def close(self) -> None:
        """Stop the disk's read-ahead and the files view (the stream stays open: its owner closes it)."""
        self.disk.close()
        self.extents.close()
        with self._files_lock:
            files, self._files = self._files, None
            self._files_error = FilesUnavailable("the mount is shutting down")
        if files is not None:
            if any(self.extents.stats.values()):
                log.info("files view: %s", self.extents.summary())
            files.close()

    # queries --------------------------------------------------------------------------------
    def node(self, ino: int) -> _Node:
        node = self.nodes.get(ino)
        if node is None:
            raise NoSuchEntry(f"no inode {ino}")
        return node

    def blocking(self, ino: int, reading: bool = False) -> str | None:
        """How a call on this inode (`reading`: a read of its bytes) may block: "disk"
        (decompression), "files" (the appliance) or None (answered from memory). A guest directory
        already listed, a guest file's attributes or a symlink already read are memory: answered on
        the caller's thread, they cost no hand-off to a worker (a `tar` of 14,478 files makes ~50,000
        such calls)."""
        node = self.nodes.get(ino)
        if node is None:
            return None
        if node.kind == "disk":
            return "disk"
        if node.kind == "guest" and not reading:
            if stat.S_ISDIR(node.attr.mode):
                return "files" if node.children is None else None
            if stat.S_ISLNK(node.attr.mode):
                return None if node.content else "files"
            return None
        # files/ itself too: a lookup in it reads the stat of a filesystem's root from the appliance.
        return "files" if node.kind in ("fsroot", "guest") or ino == FILES_INO else None

    def getattr(self, ino: int) -> Attr:
        node = self.node(ino)
        if node.kind == "fsroot" and self.files_started:
            self._load_fs_root(node)
        return node.attr

    def lookup(self, parent: int, name: bytes) -> Attr:
        children = self._children(parent)
        ino = children.get(name)
        if ino is None:
            raise NoSuchEntry(f"{name!r} not found")
        return self.getattr(ino)

    def listdir(self, ino: int) -> list[tuple[bytes, Attr]]:
        children = self._children(ino)
        return [(name, self.nodes[child].attr) for name, child in children.items()]

    def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        if not stat.S_ISLNK(node.attr.mode):
            raise InputError("not a symlink")
        if node.kind == "guest":
            with self._lock_of(node):
                if not node.content:
                    node.content = os.fsencode(self.files().readlink(node.fs, node.path))
        return node.content

    def parent(self, ino: int) -> int:
        return self.node(ino).parent

    def open_reader(self, ino: int) -> ReadHandle | None:
        """A read position on a disk-backed file (disk.raw, a partition): its sequential reads are
        read ahead by the caching reader. None for other files."""
        node = self.nodes.get(ino)
        if node is None or node.kind != "disk":
            return None
        return self.disk.handle(node.start, node.attr.size)

    def read(self, ino: int, offset: int, size: int, handle: ReadHandle | None = None) -> bytes | memoryview:
        """The file's bytes [offset, offset+size). For a disk-backed file, a read-only view into the
        decoded chunk when the read lies in one (no copy: the caller only hands it on)."""
        node = self.node(ino)
        if node.kind == "disk":
            if handle is not None:
                return handle.read_buffer(offset, size)
            end = min(offset + size, node.attr.size)
            if offset >= end:
                return b""
            return self.disk.read_buffer(node.start + offset, end - offset)
        if node.kind == "bytes":
            return node.content[offset:offset + size]
        if node.kind == "guest" and stat.S_ISREG(node.attr.mode):
            return self._read_guest(node, offset, size)
        raise InputError("not a regular file")

    def read_is_cheap(self, ino: int, offset: int, size: int) -> bool:
        node = self.nodes.get(ino)
        if node is not None and node.kind == "guest":
            return bool(node.guest_ino) and self.extents.is_cheap(node.fs, node.guest_ino, node.attr.size,
                                                                  offset, size)
        if node is None or node.kind != "disk":
            return node is not None and node.kind == "bytes"
        return self.disk.is_cheap(node.start + offset, min(size, max(0, node.attr.size - offset)))

    # the files view -------------------------------------------------------------------------
    def _children(self, ino: int) -> dict[bytes, int]:
        node = self.node(ino)
        if node.kind in ("fsroot", "guest"):
            if not stat.S_ISDIR(node.attr.mode) and node.kind == "guest":
                raise NotADirectory("not a directory")
            self._load_listing(node)
        elif node.children is None:
            raise NotADirectory("not a directory")
        return node.children

    def _lock_of(self, node: _Node) -> threading.Lock:
        """The lock serialising loads of this node (a stripe of the pool: the holder never takes
        another node's lock, so two nodes sharing one cannot deadlock)."""
        return self._node_locks[node.attr.ino % NODE_LOCKS]

    def _load_fs_root(self, node: _Node) -> None:
        with self._lock_of(node):
            if node.content:  # marks "root stat loaded"
                return
            st = self.files().root_stat(node.fs)
            node.attr = self._attr_from_stat(node.attr.ino, st)
            node.content = b"loaded"

    def _load_listing(self, node: _Node) -> None:
        if node.children is not None:
            return  # loaded (without the lock: the FUSE loop's thread calls this for loaded listings)
        if node.kind == "fsroot":
            self._load_fs_root(node)
        with self._lock_of(node):
            if node.children is not None:
                return
            entries = self.files().listdir(node.fs, node.path)
            children: dict[bytes, int] = {}
            for name, st in entries:
                raw = safe_name(name)
                if raw is None or raw in children:
                    continue  # a hostile or damaged name cannot become a directory entry
                path = f"{node.path}/{name}" if node.path else name
                ino = self._new_guest_inode()
                child = _Node(self._attr_from_stat(ino, st), "guest", node.attr.ino, fs=node.fs, path=path)
                if stat.S_ISREG(child.attr.mode):
                    child.guest_ino = _guest_number(st.get("st_ino"))
                    self.extents.note_regular(node.fs, child.guest_ino, child.attr.size)
                self.nodes[ino] = child
                children[raw] = ino
            node.children = children

    def _new_guest_inode(self) -> int:
        """A fresh inode number. A directory is listed once (its children are never reloaded), so
        each path of the files view gets exactly one, with no path -> number map to keep."""
        with self._ino_lock:
            ino = self._next_guest
            self._next_guest += 1
            return ino

    @staticmethod
    def _attr_from_stat(ino: int, st: dict) -> Attr:
        def ns(prefix: str) -> int:
            return int(st.get(f"st_{prefix}_sec", 0)) * 1_000_000_000 + int(st.get(f"st_{prefix}_nsec", 0))
        mode = int(st["st_mode"])
        fmt = stat.S_IFMT(mode)
        if fmt not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                       stat.S_IFIFO, stat.S_IFSOCK):
            mode = stat.S_IFREG | stat.S_IMODE(mode)
        return Attr(ino, mode, max(0, int(st.get("st_size", 0))), max(1, int(st.get("st_nlink", 1))),
                    int(st.get("st_uid", 0)) & 0xFFFFFFFF, int(st.get("st_gid", 0)) & 0xFFFFFFFF,
                    int(st.get("st_rdev", 0)) if fmt in (stat.S_IFCHR, stat.S_IFBLK) else 0,
                    ns("atime"), ns("mtime"), ns("ctime"), max(0, int(st.get("st_blocks", 0))))

    GUEST_BLOCK = 1 << 20

    def _read_guest(self, node: _Node, offset: int, size: int) -> bytes:
        """Guest files are read from the image where the appliance mapped them (ext2/3/4: see
        guest_extents.py), else from the appliance in 1 MiB blocks (one round trip serves the
        kernel's 128 KiB reads of the same block), cached in a small LRU."""
        end = min(offset + size, node.attr.size)
        if offset >= end:
            return b""
        files = self.files()
        if node.guest_ino:
            data = self.extents.read(node.fs, node.guest_ino, node.attr.size, offset, end - offset)
            if data is not None:
                return data
        bs = self.GUEST_BLOCK
        parts = []
        pos = offset
        while pos < end:
            b = pos // bs
            key = (node.attr.ino << 24) | b  # block numbers < 2^24 (16 TiB files); else uncached
            if b >= 1 << 24:
                block = files.pread(node.fs, node.path, bs, b * bs)
            else:
                block = self._guest_file_cache.get(key, lambda _k: files.pread(node.fs, node.path, bs, b * bs))
            piece = block[pos - b * bs:min(end, (b + 1) * bs) - b * bs]
            if not piece:
                break  # the file is shorter than its stat said
            parts.append(piece)
            pos += len(piece)
        return b"".join(parts)

    def statfs(self) -> dict:
        return {"blocks": (self.disk.size + 4095) // 4096, "bsize": 4096, "files": len(self.nodes)}
