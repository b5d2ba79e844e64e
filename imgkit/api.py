"""The documented Python API. The CLI calls only these; other tools can script imgkit with them."""
from __future__ import annotations

import os

from .operations.capture import CapturePlan, CaptureResult, capture_stream, refuse_output_on_source
from .errors import InputError, RefusedTarget
from .formats import imgk_layout as L
from .formats.imgk_reader import ImageReader
from .formats.registry import Password, open_image, password_provider  # noqa: F401 (the API)
from .operations.info import image_info  # noqa: F401 (the API)
from .formats.imgk_settings import DEFAULT_CHUNK_SIZE, LEVEL_DEFAULT
from .progress import Progress
from .operations.restore import RestoreResult, restore_stream
from .formats.sources import RawSource
from .stream import Stream
from .operations.verify import VerifyReport, verify_image

# Opening images lives below the operations (formats/registry.py); `info` has its own module. Both
# are re-exported here for users of the API; nothing inside imgkit imports this module.
_password_provider = password_provider


def is_imgk(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(L.MAGIC)) == L.MAGIC
    except (IsADirectoryError, PermissionError, FileNotFoundError):
        return False


def _local_paths(img: Stream, image: str) -> list[str]:
    """The image's files on this machine (an object in S3 or an RBD image cannot be the target)."""
    from .remote.locations import is_rbd, is_s3
    return [p for p in img.paths() or [image] if not is_s3(p) and not is_rbd(p)]


def open_restore_source(path: str, password: Password = None) -> Stream:
    """What restore reads: any image imgkit reads, raw and ISO included (restoring a VM disk or a
    dd image is a restore too). A file named like an imgk image (.imgk) without imgk's magic is
    refused rather than written out byte for byte: it is a damaged or mistaken image, not a disk."""
    imgk_named = ".imgk" in os.path.basename(path).lower()
    return open_image(path, password, allow_raw=not imgk_named)


def capture(source: str, output: str, *, level: int = LEVEL_DEFAULT, chunk_size: int | None = None,
            split_size: int | None = None, password: Password = None, force: bool = False,
            plan: CapturePlan | None = None, progress: Progress | None = None,
            source_format: str | None = None, source_password: Password = None,
            sector_by_sector: bool = False, partitions: str | None = None,
            base: str | None = None, base_dir: str | None = None) -> CaptureResult:
    """Capture a block device, raw file or ISO (or any image imgkit reads) into an imgk image.
    `password` encrypts the new image; `source_password` opens an encrypted imgk source (default:
    the same password). Filesystem-aware by default: only the blocks each filesystem uses are
    stored (see fsaware.py); `sector_by_sector` keeps every byte; `partitions` ("1,3" or
    names/labels) selects partitions. The result's `warnings` say what a partition selection leaves
    out that the disk needs to boot.
    `base`: an incremental capture, a child of the image (or chain) `base` that stores only the
    chunks that differ from it (imgk_chain.py); an encrypted base makes an encrypted child under
    the same password (`password`, else `source_password`)."""
    if sector_by_sector and partitions:
        raise InputError("--sector-by-sector and --partitions exclude each other",
                         hint="a partition selection is filesystem-aware; drop one of them")
    from .operations.capture import check_output_names
    check_output_names(output, force, [source])
    if os.path.exists(source):
        refuse_output_on_source(source, output)
    parent = _open_base(base, output, password if password is not None else source_password, base_dir) \
        if base else None
    if parent is not None:
        if chunk_size is not None and chunk_size != parent.chunk_size:
            parent.close()
            raise InputError(f"--chunk-size {chunk_size} differs from the base's {parent.chunk_size}",
                             hint="a child has its parent's chunk size: drop --chunk-size")
        chunk_size = parent.chunk_size
        if parent.header.encrypted and password is None:
            password = _password_provider(source_password)() if source_password is not None else None
            if password is None:
                parent.close()
                raise InputError("the base is encrypted: its child is encrypted with the same password, "
                                 "and none was given", hint="use --password-file or IMGKIT_PASSWORD")
        elif not parent.header.encrypted and password is not None:
            parent.close()
            raise InputError(f"{base} is not encrypted: its child cannot be",
                             hint="a chain is encrypted as a whole: capture a new full image with --encrypt")
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    try:
        src = open_image(source, source_password if source_password is not None else password, fmt=source_format)
    except BaseException:
        if parent is not None:
            parent.close()
        raise
    try:
        from .formats.imgk_writer import check_geometry
        check_geometry(src.size, chunk_size)  # before the source is read or planned
        warnings: list[str] = []
        if plan is None and not sector_by_sector:
            from .filesystems.fsaware import build_plan
            fs_plan = build_plan(src, partitions=partitions, chunk_size=chunk_size,
                                 path=source if src.raw_path() else None)
            plan, warnings = fs_plan.plan, fs_plan.warnings
        info = src.describe()
        sealer_factory = None
        if password is not None:
            from .formats.crypto import sealer_factory_for
            sealer_factory = sealer_factory_for(_password_provider(password)())
        if parent is not None:
            warnings += _base_warnings(parent, src, output, base_dir)
        from .platform.targets import consistency_warning
        live = consistency_warning(source) if os.path.exists(source) else None
        if live:
            warnings.insert(0, live)
        result = capture_stream(src, output, source_info=info, level=level, chunk_size=chunk_size,
                                split_size=split_size, sealer_factory=sealer_factory, plan=plan,
                                force=force, progress=progress, base=parent,
                                sources=[source, *src.paths()])
        result.warnings = warnings
        return result
    finally:
        src.close()
        if parent is not None:
            parent.close()


def _open_base(base: str, output: str, password: Password, base_dir: str | None):
    """The base of an incremental capture, opened as a chain (so a broken chain is refused before
    the source is read), never the image about to be written."""
    from .formats.imgk_chain import open_chain
    from .remote.locations import is_s3
    if is_s3(base) or is_s3(output):
        if base == output:
            raise InputError(f"{output} is the base image: refusing to overwrite the parent of the new image")
        return open_chain(base, _password_provider(password), base_dir)
    if not is_imgk(base):
        raise InputError(f"{base}: --base must be an imgk image" if os.path.exists(base)
                         else f"{base}: no such image for --base")
    if os.path.exists(output) and os.path.samefile(base, output):
        raise InputError(f"{output} is the base image: refusing to overwrite the parent of the new image")
    return open_chain(base, _password_provider(password), base_dir)


def _base_warnings(parent, src: Stream, output: str, base_dir: str | None) -> list[str]:
    from .units import format_size
    out = []
    if src.size != parent.size:
        how = "grown" if src.size > parent.size else "shrunk"
        out.append(f"the source ({format_size(src.size)}) has {how} since the base ({format_size(parent.size)}): "
                   f"chunks {'beyond' if src.size > parent.size else 'at'} the base's end are stored whole")
    from .formats.imgk_chain import location_dir
    if location_dir(parent.path) != location_dir(output):
        out.append(f"the base is not in the new image's directory: open the child with "
                   f"--base-dir {location_dir(parent.path)}")
    return out


def restore(image: str, target: str, *, password: Password = None, confirm=None, verify: bool = False,
            discard: bool = False, progress: Progress | None = None, grow: bool = False,
            force: bool = False, shrink: str | None = None,
            target_size: int | None = None, keep_going: bool = False, dry_run: bool = False) -> RestoreResult:
    """Restore a whole image (any format imgkit reads: imgk, qcow2, VHD, VHDX, VMDK, raw, ISO, a
    block device) to a block device or file. `confirm(text) -> bool` is asked before an
    existing target is overwritten; pass None only when the user already agreed (--yes).
    On a larger target, the backup GPT is moved to the end; `grow` also grows the last partition and
    its filesystem to fill the disk (grow.py). An `rbd:pool/image` target is a new RBD image of
    the image's size; an existing one is replaced only with `force` (remote/rbd_image.py).
    On a smaller target, `shrink` ("proportional" or "last") lays the partitions out anew and shrinks
    filesystems (shrink_restore.py); a file target then has `target_size` bytes (default: its current
    size). `keep_going`: a chunk that fails its check is written as zeros instead of stopping the
    restore; result.damaged describes each such range (damage.py). `dry_run` runs every check of the
    real run (the same refusals, the same errors) and writes nothing; the result's `plan` says what
    would happen."""
    from .remote.locations import is_rbd
    from .remote.rbd_image import check_target, write_image
    if keep_going and (shrink or is_rbd(target)):
        raise InputError("--keep-going applies to a restore onto a disk or a file, without --shrink")
    if is_rbd(target):
        if grow or discard or shrink:
            raise InputError("--grow, --shrink and --discard do not apply to an rbd: target (it gets the image's size)")
        check_target(target, force)  # refuse before reading anything
        if dry_run:
            return RestoreResult(target, 0, 0.0, False, plan=f"This will write a new RBD image {target}.")
        with open_restore_source(image, password) as img:
            r = write_image(img, target, force=force, progress=progress, verify=verify)
        return RestoreResult(r.target, r.bytes_written, r.seconds, verify)
    from .operations.shrink_restore import make_plan, restore_shrunk, target_size_of
    from .operations.shrink_plan import too_small_message
    with open_restore_source(image, password) as img:
        paths = _local_paths(img, image)
        size = img.size
        wanted = target_size_of(target, target_size) if shrink else None
        if shrink and wanted < size:
            if dry_run:  # restore_shrunk's own refusals, without its slow filesystem work
                plan = make_plan(img, wanted, shrink)
                if not plan.fits:
                    raise RefusedTarget(too_small_message(target, plan.target_size, img.size, plan))
                _early_target_checks(target, paths)
                return RestoreResult(target, 0, 0.0, False, plan=plan.describe(), final_size=wanted)
            report, result = restore_shrunk(img, target, make_plan(img, wanted, shrink), image_paths=paths,
                                            confirm=confirm, progress=progress,
                                            early_checks=lambda: _early_target_checks(target, paths))
            result.shrink = report
            return result
        source = img
        if keep_going:
            from .operations.damage import ZeroOnDamage
            source = ZeroOnDamage(img)
        result = restore_stream(source, target, image_paths=paths, confirm=confirm, verify=verify,
                                discard=discard, progress=progress, dry_run=dry_run,
                                too_small=lambda ts: too_small_message(target, ts, size, make_plan(img, ts, "proportional")))
        if keep_going and not dry_run:
            from .operations.damage import report
            result.damaged = report(img, source.damaged_ranges(), target)
    if dry_run:
        return result
    from .operations.grow import fit_to_disk
    with RawSource(target) as written:
        larger = written.size > size
    if larger or grow:
        result.grow = fit_to_disk(target, size, grow).to_dict()
    return result


def _early_target_checks(target: str, image_paths: list[str]) -> None:
    """restore_stream's target checks (targets.open_restore_target), run before slow preparation
    (restore_stream runs them again)."""
    from .platform.targets import open_restore_target
    open_restore_target(target, list(image_paths), write=False).close()


def plan_restore(image: str, target: str, *, password: Password = None, shrink: str | None = None,
                 target_size: int | None = None) -> dict:
    """What restore would do (--dry-run): sizes, and with a smaller target the shrink plan."""
    from .operations.shrink_restore import make_plan, target_size_of
    with open_restore_source(image, password) as img:
        doc = {"image_size": img.size, "target": target, "shrink": shrink}
        try:
            wanted = target_size_of(target, target_size)
        except InputError:
            wanted = None  # a new file: it gets the image's size
        doc["target_size"] = wanted
        if wanted is not None and wanted < img.size:
            plan = make_plan(img, wanted, shrink or "proportional")
            doc["shrink_plan"] = plan.to_dict()
            doc["plan_text"] = plan.describe()
            doc["fits"] = bool(shrink) and plan.fits
            if not shrink:
                from .operations.shrink_plan import too_small_message
                doc["refused"] = too_small_message(target, wanted, img.size, plan)
        else:
            doc["fits"] = True
        return doc


def plan_partition_restore(image: str, target: str, number: int, *, to_partition: int | None = None,
                           password: Password = None, check: bool = False):
    """Where partition `number` of the image would go on `target` (partition_restore.py has the rules).
    `check` (a dry run) also runs every target check the real run runs (targets.py)."""
    from .operations.partition_restore import plan_partition_restore as make_plan
    from .platform.targets import open_restore_target
    with open_restore_source(image, password) as img:
        plan = make_plan(img, target, number, to_partition, img.metadata)
        if check:
            open_restore_target(target, img.paths() or [image], start=plan.offset,
                                length=plan.source.size, write=False).close()
        return plan


def restore_partition(image: str, target: str, number: int, *, to_partition: int | None = None,
                      password: Password = None, confirm=None, progress: Progress | None = None):
    """Restore one partition of an image; returns (plan, RestoreResult)."""
    from .operations.partition_restore import plan_partition_restore as make_plan, restore_partition as run
    with open_restore_source(image, password) as img:
        plan = make_plan(img, target, number, to_partition, img.metadata)
        return plan, run(img, plan, image_paths=_local_paths(img, image), confirm=confirm,
                         progress=progress)


def verify(image: str, *, password: Password = None, progress: Progress | None = None,
           shallow: bool = False, base_dir: str | None = None) -> VerifyReport:
    """Check every chunk the image reads, through its whole chain; `shallow`: only the chunks an
    incremental image stores itself, without opening its parents."""
    if shallow:
        from .errors import InputError as _Input
        if not is_imgk(image):
            raise _Input(f"{image}: --shallow applies to imgk images")
        with ImageReader(image, _password_provider(password)) as img:
            return verify_image(img, progress, shallow=True)
    with open_image(image, password, fmt="imgk", base_dir=base_dir) as img:
        return verify_image(img, progress)


