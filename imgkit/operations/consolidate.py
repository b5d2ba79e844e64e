"""consolidate: fold a chain of incremental images into fewer links (docs/FORMAT.md, *Consolidation*).

`consolidate CHILD OUT` writes a standalone image of the chain's disk (a synthetic full, no source
disk needed); `consolidate --into PARENT CHILD` folds CHILD into its parent: PARENT's file then
holds CHILD's disk (a child of PARENT's own parent, if it had one) and CHILD's file goes.

Both keep CHILD's header core, image id, key slot and chunk digests, so the result has CHILD's chain
digest: children of CHILD resolve to it (imgk_chain.py takes any file with the right id). Nothing is
recompressed: CHILD's stored chunks are copied byte for byte, a parent's chunk is copied as is
(plain) or opened and sealed again under CHILD's keys as object number = its chunk index (encrypted:
that object number was never sealed under CHILD's key, since the entry was PARENT). Every chunk is
authenticated and checked against CHILD's own digest before it is written.

Crash safety (`kill -9` at any point leaves the old chain or the new one): the result is written
under a temporary name and made durable; one rename puts it in place (for --into it replaces
PARENT's volume 1 atomically: the result is one volume); only then are PARENT's other volumes and
CHILD removed. Between the rename and CHILD's removal both the result and CHILD carry CHILD's id:
readers of CHILD's children take the one whose chain opens, and running the same consolidate again
finishes the removal.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from ..platform.targets import check_replaceable, refuse_device_image_path
from ..errors import CorruptChunk, InputError
from ..formats import imgk_layout as L
from ..formats.imgk_chain import _header_id, _same_file, links, open_chain
from ..formats.imgk_reader import ImageReader, PasswordProvider
from ..formats.imgk_writer import ImageWriter, existing_volumes
from ..platform.parallel import ordered_map
from ..progress import NullProgress, Progress
from ..platform.writeback import fsync_parent_dir

# Fault injection for the crash tests (tests/test_consolidate.py): IMGKIT_CRASH_AT=<step> kills the
# process with SIGKILL at that step, as a power cut or kill -9 would.
CRASH_ENV = "IMGKIT_CRASH_AT"
STEPS = ("copied", "durable", "published", "parent-volumes-removed", "child-removed")


def _step(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class ConsolidateResult:
    path: str
    removed: list[str]
    stored_bytes: int
    chunks_copied: int
    chunks_from_parents: int
    still_a_child: bool
    seconds: float
    completed_earlier_run: bool = False


def _other_children(parent: ImageReader, skip: list[str], password) -> list[str]:
    """Images in the parent's directory whose PARENT section names the parent (besides `skip`):
    folding a child into the parent would break them."""
    where = os.path.dirname(os.path.abspath(parent.path))
    out = []
    for name in sorted(os.listdir(where))[:1000]:
        path = os.path.join(where, name)
        if name.startswith(".") or not os.path.isfile(path) or any(_same_file(path, s) for s in skip):
            continue
        if _header_id(path) is None:
            continue
        try:
            with ImageReader(path, password) as img:
                if img.parent_ref is not None and img.parent_ref.image_id == parent.header.image_id:
                    out.append(path)
        except InputError:
            continue
    return out


def consolidate(child: str, output: str | None = None, *, into: str | None = None,
                password: PasswordProvider | None = None, base_dir: str | None = None, force: bool = False,
                progress: Progress | None = None, workers: int | None = None) -> ConsolidateResult:
    if (output is None) == (into is None):
        raise InputError("consolidate needs either OUT (a standalone image) or --into PARENT")
    progress = progress or NullProgress()
    started = time.monotonic()
    if into is not None:
        done = _finish_interrupted(child, into)
        if done is not None:
            return done
    top = open_chain(child, password, base_dir)  # the whole chain is checked here
    try:
        if top.parent is None:
            raise InputError(f"{child} is not an incremental image: there is nothing to consolidate")
        if into is not None:
            parent = top.parent
            if not os.path.exists(into) or not _same_file(into, parent.path):
                raise InputError(f"{into} is not the parent of {child} (its parent is {parent.path})")
            if not force:
                others = _other_children(parent, [child, into], password)
                if others:
                    raise InputError(f"{into} has other children ({', '.join(map(os.path.basename, others))}): "
                                     "folding {child} into it would break them",
                                     hint="consolidate those first, or use --force")
            target, stop = parent.path, parent.parent
        else:
            target, stop = output, None
            for link in links(top):
                for p in link.volume_paths:
                    if os.path.exists(output) and _same_file(output, p):
                        raise InputError(f"{output} is a link of the chain being read",
                                         hint="choose another output name")
            refuse_device_image_path(output, command="consolidate")
            check_replaceable(output, force)
            if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
                raise InputError(f"{os.path.dirname(os.path.abspath(output))}: no such directory")
        # --into replaces the parent's file on purpose (checked above); an OUT replaces only with --force.
        result = _write(top, target, stop, progress, workers, replace=into is not None or force)
        stale = existing_volumes(target)[len(result[0]):] if into is not None else []
    finally:
        top.close()
    paths, copied, pulled, stored = result
    removed: list[str] = []
    for p in stale:  # PARENT's old volumes beyond the new single one
        os.unlink(p)
        removed.append(p)
    if stale:
        fsync_parent_dir(target)
    _step("parent-volumes-removed")
    if into is not None:
        removed += _remove_image(child)
    _step("child-removed")
    progress.finish(stored_bytes=stored)
    return ConsolidateResult(paths[0], removed, stored, copied, pulled, stop is not None,
                             time.monotonic() - started)


def _remove_image(path: str) -> list[str]:
    removed = []
    for p in reversed(existing_volumes(path)):  # volume 1 last: until then the image still "exists"
        os.unlink(p)
        removed.append(p)
    fsync_parent_dir(path)
    return removed


def _finish_interrupted(child: str, into: str) -> ConsolidateResult | None:
    """A consolidate --into killed after its rename left PARENT's file holding CHILD's image id and
    CHILD still there: finish by removing CHILD (it is in PARENT's file now)."""
    cid, pid = _header_id(child), _header_id(into)
    if cid is None or cid != pid or _same_file(child, into):
        return None
    with open(into, "rb") as f:
        count = L.Header.decode(f.read(L.HEADER_SIZE), where=into).volume_count
    removed = existing_volumes(into)[count:]  # PARENT's old volumes, if not removed yet
    for p in removed:
        os.unlink(p)
    removed += _remove_image(child)
    return ConsolidateResult(into, removed, os.path.getsize(into), 0, 0, False, 0.0, completed_earlier_run=True)


def _write(top: ImageReader, target: str, stop: ImageReader | None, progress: Progress,
           workers: int | None, replace: bool = False) -> tuple[list[str], int, int, int]:
    """Write top's disk to `target` with every PARENT entry resolved down to (not into) `stop`."""
    kinds = top.index.kinds()
    writer = ImageWriter(target, top.size, top.chunk_size, template=top.header, sealer=top.sealer,
                         replace=replace)
    progress.total = top.size
    try:
        jobs = []  # (chunk index, link that stores it)
        for i, k in enumerate(kinds):
            if k == L.KIND_FREE:
                writer.set_entry(i, top.index[i])
            elif k == L.KIND_DATA:
                jobs.append((i, top))
            elif k == L.KIND_PARENT:
                link = top.parent
                while link is not stop and link.index.kinds()[i] == L.KIND_PARENT:
                    link = link.parent
                if link is stop:  # still in the part of the chain that stays: keep pointing at it
                    writer.set_entry(i, top.index[i])
                else:
                    jobs.append((i, link))
        progress.advance(top.size - sum(top.chunk_length(i) for i, _ in jobs))

        def fetch(job):
            i, link = job
            e = link.index[i]
            stored = link.read_stored(i, e)
            data = link.decode_stored(i, stored, e)  # authenticated, decompressed, hash-checked
            if link is not top:
                if L.chunk_digest(top.header.hash_algo, data, top.mac_key) != top.index[i].digest:
                    raise CorruptChunk(f"chunk at offset {i * top.chunk_size} of {link.path} does not match "
                                       f"{top.path}'s digest of it", i * top.chunk_size)
                if top.sealer is not None:  # re-seal the same compressed bytes under top's keys
                    length = top.chunk_length(i)
                    payload = link.sealer.open_chunk(e.object, length, e.encoding, stored, i * top.chunk_size)
                    stored = top.sealer.seal_chunk(i, length, e.encoding, payload)
            return i, link, e, stored

        placed: dict[tuple[int, int, int], tuple[int, int, int, int]] = {}
        copied = pulled = 0
        with ordered_map(fetch, jobs, workers) as fetched:
            for i, link, e, stored in fetched:
                key = (id(link), e.volume, e.offset)  # a stored chunk several entries share: write it once
                if key in placed:
                    volume, offset, length, obj = placed[key]
                else:
                    volume, offset = writer.copy_stored(stored)
                    length, obj = len(stored), (e.object if link is top else i)
                    placed[key] = (volume, offset, length, obj)
                    copied += 1
                if link is not top:
                    pulled += 1
                writer.set_entry(i, L.IndexEntry(L.KIND_DATA, e.encoding, volume, length, offset, obj,
                                                 top.index[i].digest))
                progress.advance(top.chunk_length(i))
        for m in top.used_maps:
            writer.add_used_map(m)
        writer.set_parent(stop and _ref_below(top, stop))
        metadata = dict(top.metadata)
        folded = []
        link = top
        while link is not stop:
            folded.append(os.path.basename(link.path))
            link = link.parent
        metadata["consolidated"] = {"from": folded, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if stop is None:
            metadata.pop("incremental", None)
        else:
            metadata["incremental"] = {"base": os.path.basename(stop.path), "base_image_id": stop.header.image_id.hex()}
        _step("copied")
        paths = writer.commit(metadata, before_publish=lambda: _step("durable"))
    except BaseException:
        writer.abort()
        raise
    _step("published")
    return paths, copied, pulled, sum(os.path.getsize(p) for p in paths)


def _ref_below(top: ImageReader, stop: ImageReader) -> L.ParentRef:
    """The PARENT section naming `stop`: the one its child in the chain already holds (same id,
    chain digest and name)."""
    link = top
    while link.parent is not stop:
        link = link.parent
    return link.parent_ref
