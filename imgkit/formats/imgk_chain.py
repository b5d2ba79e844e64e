"""Incremental images: finding, checking and attaching the parents of a child (docs/FORMAT.md,
*Incremental images*).

A chain is read as one Stream: the child's ImageReader, with each link's parent attached, resolves
its PARENT chunks through the parents (ImageReader.read_parent_chunk), so restore, mount, convert,
boot-check and every other view read a child exactly like a full image. Everything about a parent is
checked here, when the chain is opened, before any data is read or any target written: a missing
parent, a file that is another image (swapped), an image whose contents changed since the child
was made (its chain digest differs), a tampered parent (its own structure fails) and a foreign file
are each named with the link they break.
"""
from __future__ import annotations

import os
from typing import Callable

from ..errors import BadImage, InputError, WrongPassword
from . import imgk_layout as L
from ..remote.locations import is_s3
from .byte_source import open_source
from .imgk_reader import ImageReader

PasswordProvider = Callable[[], bytes]
# A directory is searched for a renamed parent by reading the headers of its files; a directory of
# a hundred thousand unrelated files should not turn opening an image into minutes of I/O.
MAX_SCANNED_FILES = 10000


# The directory to find parents in when not next to the child: the CLI's --base-dir sets it (an
# environment variable, so that it also reaches the mount's and boot-check's helper processes).
BASE_DIR_ENV = "IMGKIT_BASE_DIR"


class ParentProblem(InputError):
    """A child's parent cannot be used: missing, swapped, changed, foreign or damaged."""


def parent_ref_for(parent: ImageReader) -> L.ParentRef:
    """The PARENT section of a new child of `parent`."""
    return L.ParentRef(parent.header.image_id, parent.chain_digest, parent.size, parent.chunk_size,
                       os.path.basename(parent.path))


def location_dir(path: str) -> str:
    """The directory of a file, or the "directory" (key prefix) of an s3:// object."""
    if is_s3(path):
        return path.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path))


def _s3_candidates(child: ImageReader, base_dir: str | None):
    """A child in S3: its parent is the object named by the hint beside it (or under base_dir). No
    listing of the prefix for renamed parents: a bucket may hold millions of objects."""
    ref = child.parent_ref
    where = (base_dir or location_dir(child.path)).rstrip("/")
    hinted = f"{where}/{ref.name}"
    want = ref.image_id.hex()
    try:
        src = open_source(hinted)
    except FileNotFoundError:
        raise ParentProblem(f"{child.path}: its parent {ref.name} (image {want}) is missing from {where}",
                            hint="put the parent beside the child, or give --base-dir s3://BUCKET/PREFIX") from None
    try:
        header = L.Header.decode(src.pread(L.HEADER_SIZE, 0), where=hinted)
        got = header.image_id if header.volume_number == 1 else None
    except BadImage:
        got = None
    finally:
        src.close()
    if got != ref.image_id:
        found = "not an imgk image" if got is None else f"image {got.hex()}"
        raise ParentProblem(f"{child.path}: its parent {hinted} has been replaced: it is {found}, not image {want}",
                            hint="put the original parent back, or give --base-dir where it is")
    yield hinted


def _header_id(path: str) -> bytes | None:
    """The image id of volume 1 of an imgk image at `path`, or None for anything else."""
    try:
        with open(path, "rb") as f:
            raw = f.read(L.HEADER_SIZE)
        header = L.Header.decode(raw, where=path)
    except (OSError, BadImage):
        return None
    return header.image_id if header.volume_number == 1 else None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def parent_candidates(child: ImageReader, base_dir: str | None = None):
    """Paths that may hold the child's parent, best first: its file-name hint in `base_dir` (default:
    the child's own directory) when that file has the parent's id, then any other file there with
    that id (a renamed parent, or a consolidated copy, which keeps the id). Scanned lazily: the
    directory is read only if the hint does not lead to a usable parent. Raises ParentProblem
    naming what is wrong when there is no candidate at all."""
    if is_s3(base_dir or child.path):
        yield from _s3_candidates(child, base_dir)
        return
    ref = child.parent_ref
    where = base_dir or os.path.dirname(os.path.abspath(child.path))
    if not os.path.isdir(where):
        raise InputError(f"{where}: no such directory to look for the parent of {child.path}")
    hinted = os.path.join(where, ref.name)
    want = ref.image_id.hex()
    found_other = None
    any_found = False
    if os.path.isfile(hinted) and not _same_file(hinted, child.path):
        got = _header_id(hinted)
        if got == ref.image_id:
            any_found = True
            yield hinted
        else:
            found_other = "not an imgk image" if got is None else f"image {got.hex()}"
    try:
        names = sorted(os.listdir(where))[:MAX_SCANNED_FILES]
    except OSError as e:
        raise InputError(f"{where}: cannot list the directory ({e.strerror})") from None
    for name in names:
        path = os.path.join(where, name)
        if name == ref.name or name.startswith(".") or not os.path.isfile(path) or _same_file(path, child.path):
            continue
        if _header_id(path) == ref.image_id:
            any_found = True
            yield path
    if any_found:
        return
    if found_other:
        raise ParentProblem(f"{child.path}: its parent {hinted} has been replaced: it is {found_other}, "
                            f"not image {want}, and no file in {where} is that image",
                            hint="put the original parent back, or give --base-dir where it is")
    raise ParentProblem(f"{child.path}: its parent {ref.name} (image {want}) is missing from {where}",
                        hint="put the parent next to the child, or give --base-dir DIR")


def attach(child: ImageReader, parent: ImageReader) -> None:
    """Check that `parent` is the image the child was made from, then make the child read its
    PARENT chunks from it."""
    ref = child.parent_ref
    if parent.header.image_id != ref.image_id:
        raise ParentProblem(f"{child.path}: {parent.path} is image {parent.header.image_id.hex()}, "
                            f"not its parent {ref.image_id.hex()}")
    if parent.chain_digest != ref.content_digest or parent.size != ref.logical_size \
            or parent.chunk_size != ref.chunk_size:
        raise ParentProblem(f"{child.path}: its parent {parent.path} has changed since the child was made "
                            "(its contents no longer match the digest the child recorded)",
                            hint="the chain is broken at this link; a consolidated or earlier copy of the "
                                 "parent may still match")
    if parent.chunk_size != child.chunk_size:
        raise ParentProblem(f"{child.path}: its parent {parent.path} has {parent.chunk_size}-byte chunks, "
                            f"the child {child.chunk_size}")
    if child.header.encrypted != parent.header.encrypted:
        raise ParentProblem(f"{child.path}: the child is {'' if child.header.encrypted else 'not '}encrypted "
                            f"but its parent {parent.path} is {'' if parent.header.encrypted else 'not'}",
                            hint="a chain is encrypted as a whole or not at all")
    kinds, pkinds = child.index.kinds(), parent.index.kinds()
    same_digests = not child.mac_key and not parent.mac_key and child.header.hash_algo == parent.header.hash_algo
    for i, k in enumerate(kinds):
        if k != L.KIND_PARENT:
            continue
        if i >= len(pkinds) or pkinds[i] not in (L.KIND_DATA, L.KIND_PARENT) \
                or parent.chunk_length(i) != child.chunk_length(i) \
                or (same_digests and parent.index[i].digest != child.index[i].digest):
            raise ParentProblem(f"{child.path}: chunk at offset {i * child.chunk_size} refers to its parent "
                                f"{parent.path}, which holds no such chunk (damaged or forged child)")
    child.parent = parent


def open_chain(path: str, password: PasswordProvider | None = None, base_dir: str | None = None) -> ImageReader:
    """Open an imgk image and, if it is a child, every parent down to the full image. Returns the
    child's reader, which reads the whole chain. Parents are found next to each child, or in
    `base_dir`. One password (asked once) opens every link."""
    asked: list[bytes] = []

    def once() -> bytes:
        if not asked:
            asked.append(password())
        return asked[0]

    provider = once if password is not None else None
    if base_dir is None:
        base_dir = os.environ.get(BASE_DIR_ENV) or None
    top = ImageReader(path, provider)
    try:
        _attach_parents(top, provider, base_dir, {top.header.image_id})
    except BaseException:
        top.close()
        raise
    return top


def _attach_parents(link: ImageReader, provider, base_dir: str | None, seen: set[bytes]) -> None:
    """Find, check and attach link's parent and, recursively, its parents. Several files may carry
    the parent's id (a consolidated copy, a child left behind by an interrupted consolidate
    --into): the first candidate whose whole chain opens wins; if none does, the first problem is
    the one reported."""
    if link.parent_ref is None:
        return
    if len(seen) > L.MAX_CHAIN_DEPTH:
        raise ParentProblem(f"{link.path}: the chain is longer than {L.MAX_CHAIN_DEPTH} links",
                            hint="consolidate it (imgkit consolidate)")
    if link.parent_ref.image_id in seen:
        raise ParentProblem(f"{link.path}: its parent chain loops back to image {link.parent_ref.image_id.hex()}")
    first_problem = None
    for parent_path in parent_candidates(link, base_dir):
        try:
            parent = ImageReader(parent_path, provider)
        except WrongPassword:
            raise WrongPassword(f"the password opens {link.path} but not its parent {parent_path}",
                                hint="every link of a chain opens with the same password; "
                                     "was the password of one link changed alone?") from None
        except BadImage as e:  # a tampered or truncated parent: say which link it breaks
            first_problem = first_problem or ParentProblem(
                f"{link.path}: its parent {parent_path} is damaged: {e}", hint=e.hint)
            continue
        try:
            attach(link, parent)
            _attach_parents(parent, provider, base_dir, seen | {parent.header.image_id})
            return
        except (ParentProblem, BadImage) as e:
            link.parent = None
            parent.close()
            first_problem = first_problem or e
        except BaseException:
            link.parent = None
            parent.close()
            raise
    raise first_problem


def links(img: ImageReader) -> list[ImageReader]:
    """The readers of a chain, child first."""
    out = []
    while img is not None:
        out.append(img)
        img = img.parent
    return out
