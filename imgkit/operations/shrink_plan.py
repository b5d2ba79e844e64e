"""Where each partition of an image goes on a smaller disk, and whether it fits (restore --shrink).

The plan keeps the partition order, the table's identity (GUIDs, types, names, attributes, the MBR
boot code and disk id are copied by shrink_table.py) and the boot layout: everything before the first
partition (MBR, primary GPT, the post-MBR gap where GRUB lives) stays where it is, and a BIOS boot
partition, an ESP, and every partition whose filesystem imgkit cannot shrink keep their sizes.
The others give up free space: in proportion to their free space (default), or only the last
partition (`--shrink last`). Starts and shrunk sizes are 1 MiB aligned; the gap between two
partitions (an EBR before a logical partition) is kept.

Minimums here are estimates from the used-block map (the image's USED_MAP sections, or imgkit's
own parsers): used bytes plus each filesystem's slack. The restore asks the filesystem's own tool for
its real minimum inside the appliance before anything is written (shrink_fs.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..filesystems.usedmap import NotUsable
from ..formats.partitions import Partition, PartitionTable, read_partition_table
from ..stream import SliceStream, Stream
from ..units import format_size

MIB = 1 << 20
SHRINKABLE = ("ext2", "ext3", "ext4", "ntfs", "vfat", "btrfs")
CANNOT_SHRINK = {"xfs": "XFS cannot shrink"}
GPT_TAIL_SECTORS = 33
BTRFS_FLOOR = 256 * MIB  # Linux refuses to resize a btrfs below 256 MiB (btrfs_ioctl_resize: EINVAL)  # backup entry array (32 sectors of 128 entries) + backup header


def _align_up(n: int, a: int = MIB) -> int:
    return -(-n // a) * a


def _align_down(n: int, a: int = MIB) -> int:
    return n // a * a


def estimated_minimum(fs: str, used: int, size: int) -> int:
    """A filesystem's smallest size from its used bytes: the used blocks (which include its own
    metadata: inode tables, journal, MFT, FATs) plus what its resizer needs to move things around."""
    slack = {"ext2": 0.08, "ext3": 0.08, "ext4": 0.08, "ntfs": 0.10, "vfat": 0.05, "btrfs": 0.25}[fs]
    floor = {"btrfs": BTRFS_FLOOR, "vfat": 2 * MIB}.get(fs, 4 * MIB)
    extra = {"ntfs": 4 * MIB, "btrfs": 16 * MIB}.get(fs, 1 * MIB)
    return min(size, _align_up(max(floor, int(used * (1 + slack)) + extra)))


@dataclass
class PartPlan:
    number: int
    filesystem: str | None
    label: str | None
    old_start: int
    old_size: int
    new_start: int = 0
    new_size: int = 0
    used: int | None = None       # bytes the filesystem uses (None: unknown)
    minimum: int | None = None    # smallest size (None: cannot shrink)
    minimum_exact: bool = False   # measured by the filesystem's own resizer, not estimated
    pinned: int | None = None     # a size decided earlier (a FAT rebuilt at it): kept when re-planning
    fixed_reason: str | None = None  # why it keeps its size (None: it may shrink)
    logical: bool = False
    extended: bool = False

    @property
    def shrinks(self) -> bool:
        return self.new_size < self.old_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shrinks"] = self.shrinks
        return d

    def describe(self) -> str:
        what = f"{self.filesystem or 'unknown'}" + (f" '{self.label}'" if self.label else "")
        line = (f"partition {self.number} ({what}): {format_size(self.old_size)} at {self.old_start // MIB} MiB"
                f" -> {format_size(self.new_size)} at {self.new_start // MIB} MiB")
        if self.used is not None:
            line += f"; uses {format_size(self.used)}"
        if self.minimum is not None:
            line += f", minimum {'' if self.minimum_exact else '~'}{format_size(self.minimum)}"
        if self.fixed_reason and not self.extended:
            line += f" (keeps its size: {self.fixed_reason})"
        return line


@dataclass
class ShrinkPlan:
    table_type: str
    image_size: int
    target_size: int
    mode: str  # "proportional" or "last"
    parts: list[PartPlan] = field(default_factory=list)
    fits: bool = False
    reason: str | None = None  # why it does not fit
    needed: int | None = None  # the smallest target this plan could use

    @property
    def shrunk(self) -> list[PartPlan]:
        return [p for p in self.parts if p.shrinks and not p.extended]

    def to_dict(self) -> dict:
        return {"table_type": self.table_type, "image_size": self.image_size, "target_size": self.target_size,
                "mode": self.mode, "fits": self.fits, "reason": self.reason, "needed": self.needed,
                "partitions": [p.to_dict() for p in self.parts]}

    def describe(self) -> str:
        head = (f"shrink plan ({self.mode}): image {format_size(self.image_size)} onto "
                f"{format_size(self.target_size)}: " + ("fits" if self.fits else f"does not fit: {self.reason}"))
        return "\n".join([head] + ["  " + p.describe() for p in self.parts if not p.extended])


def _used_bytes(image: Stream, part: Partition, fs: str | None, used_maps: dict) -> int | None:
    m = used_maps.get(part.number)
    if m is not None:
        used = int.from_bytes(m.bitmap, "little").bit_count() * m.block_size
        return used + max(0, part.size - m.block_count * m.block_size)
    from ..filesystems.allocation import OWN_PARSERS, read_used_blocks
    if fs not in OWN_PARSERS:
        return None
    try:
        return read_used_blocks(fs, SliceStream(image, part.start, part.size)).used_bytes(part.size)
    except NotUsable:
        return None


def plan_shrink(image: Stream, target_size: int, mode: str = "proportional",
                metadata: dict | None = None, used_maps: list | None = None,
                table: PartitionTable | None = None, minimums: dict[int, int] | None = None,
                pinned: dict[int, int] | None = None) -> ShrinkPlan:
    """The layout of `image` on a disk of `target_size` bytes. Never raises for a layout that does
    not fit: the plan says why (fits False, reason), so --dry-run can show it. `minimums`: real
    minimums measured by the resizers (replacing the estimates); `pinned`: sizes already fixed."""
    table = table or read_partition_table(image)
    plan = ShrinkPlan(table.type, image.size, target_size, mode)
    if table.type not in ("gpt", "mbr") or not table.partitions:
        plan.reason = "the image has no partition table: there is nothing to lay out anew"
        return plan
    if table.problems:
        plan.reason = "the image's partition table has problems: " + "; ".join(table.problems)
        return plan
    described = {e.get("number"): e for e in ((metadata or {}).get("partition_table") or {}).get("partitions", [])}
    maps = {m.partition_number: m for m in (used_maps or [])}
    from ..filesystems.disk_info import describe_partitions
    if not described:
        described = {e["number"]: e for e in describe_partitions(image)[1]["partitions"]}
    ordered = sorted((p for p in table.partitions if not p.is_extended), key=lambda p: p.start)
    last_number = ordered[-1].number
    for p in ordered:
        entry = described.get(p.number, {})
        fs, label = entry.get("filesystem"), entry.get("label")
        pp = PartPlan(p.number, fs, label, p.start, p.size, logical=p.logical)
        if p.end > image.size:
            plan.reason = f"partition {p.number} extends past the end of the image"
            return plan
        pp.used = _used_bytes(image, p, fs, maps) if fs in SHRINKABLE else None
        if p.is_bios_boot:
            pp.fixed_reason = "BIOS boot partition"
        elif p.is_esp:
            pp.fixed_reason = "EFI system partition"
        elif fs in CANNOT_SHRINK:
            pp.fixed_reason = CANNOT_SHRINK[fs]
        elif fs not in SHRINKABLE:
            pp.fixed_reason = f"imgkit cannot shrink {fs or 'an unknown filesystem'}"
        elif pp.used is None:
            pp.fixed_reason = "its used space is unknown"
        elif mode == "last" and p.number != last_number:
            pp.fixed_reason = "--shrink last shrinks only the last partition"
        if pp.fixed_reason is None:
            pp.minimum = estimated_minimum(fs, pp.used, p.size)
            if minimums and p.number in minimums:
                real = max(minimums[p.number], BTRFS_FLOOR if fs == "btrfs" else 0)
                pp.minimum, pp.minimum_exact = min(p.size, _align_up(real)), True
            if pinned and p.number in pinned:
                pp.pinned = pp.minimum = pinned[p.number]
        plan.parts.append(pp)
    sector = table.sector_size
    end_limit = _align_down(target_size - (GPT_TAIL_SECTORS * sector if table.type == "gpt" else 0), sector)
    _lay_out(plan, ordered, end_limit)
    ext = next((p for p in table.partitions if p.is_extended), None)
    if ext is not None:
        logicals = [pp for pp in plan.parts if pp.logical]
        if logicals:
            first, last = logicals[0], logicals[-1]
            start = first.new_start - (first.old_start - ext.start)
            pe = PartPlan(ext.number, None, None, ext.start, ext.size, start, last.new_start + last.new_size - start,
                          fixed_reason="extended partition (container of the logical partitions)", extended=True)
            plan.parts.append(pe)
    return plan


def _place(plan: ShrinkPlan, ordered: list[Partition], sizes: list[int]) -> int:
    """Set each partition's new start from `sizes`; the end of the last one."""
    pos = ordered[0].start  # the MBR/GPT, the post-MBR gap: all stay where they are
    prev_old_end = None
    for p, pp, size in zip(ordered, plan.parts, sizes):
        if prev_old_end is not None:
            gap = max(0, p.start - prev_old_end)  # an EBR, or the alignment the image had
            start = pos + gap
            pp.new_start = _align_up(start) if p.start % MIB == 0 else start
        else:
            pp.new_start = p.start
        pp.new_size = size
        pos = pp.new_start + size
        prev_old_end = p.end
    return pos


def _lay_out(plan: ShrinkPlan, ordered: list[Partition], end_limit: int) -> None:
    parts = plan.parts
    sizes = [pp.pinned or pp.old_size for pp in parts]
    end = _place(plan, ordered, sizes)
    if end <= end_limit:
        plan.fits, plan.needed = True, end
        return
    flexible = [i for i, pp in enumerate(parts) if pp.minimum is not None and pp.pinned is None]
    minimal = [pp.minimum if pp.minimum is not None else pp.old_size for pp in parts]
    need = _place(plan, ordered, minimal)
    plan.needed = need + (plan.target_size - end_limit)
    if need > end_limit:
        _place(plan, ordered, sizes)
        blocked = [pp for pp in parts if pp.filesystem in CANNOT_SHRINK]
        why = (f"the data needs {format_size(plan.needed)} ({plan.needed} bytes) even with every filesystem "
               f"at its minimum; the target is {format_size(plan.target_size)} ({plan.target_size} bytes)")
        if blocked:
            names = ", ".join(f"partition {pp.number} ({pp.filesystem}, {format_size(pp.old_size)})" for pp in blocked)
            why += f"; {names} cannot shrink ({CANNOT_SHRINK[blocked[0].filesystem]}) and needs its full size"
        if not flexible:
            why = ("no partition can shrink (" + "; ".join(f"{pp.number}: {pp.fixed_reason}" for pp in parts)
                   + f"): the layout needs {format_size(end + plan.target_size - end_limit)}")
        plan.reason = why
        return
    # Share the room above the minimums in proportion to each partition's free space above its minimum.
    room = end_limit - need
    spare = [parts[i].old_size - minimal[i] for i in range(len(parts))]
    total_spare = sum(spare[i] for i in flexible) or 1
    sizes = list(minimal)
    for i in flexible:
        sizes[i] = min(parts[i].old_size, _align_down(minimal[i] + spare[i] * room // total_spare))
    end = _place(plan, ordered, sizes)
    while end > end_limit:  # alignment rounding: take it from the largest shrunk partition
        i = max(flexible, key=lambda j: sizes[j] - minimal[j])
        sizes[i] -= _align_up(end - end_limit)
        if sizes[i] < minimal[i]:
            plan.reason = "the layout does not fit after alignment"
            return
        end = _place(plan, ordered, sizes)
    plan.fits = True


def too_small_message(target: str, target_size: int, image_size: int, plan: ShrinkPlan | None) -> str:
    """The refusal of a target smaller than the image, saying whether --shrink would fit it."""
    msg = (f"{target} is {format_size(target_size)} ({target_size} bytes), smaller than the image's "
           f"{format_size(image_size)} ({image_size} bytes)")
    if plan is None:
        return msg
    if plan.fits:
        return msg + "; --shrink would fit it (see --shrink --dry-run)"
    return msg + f"; --shrink would not fit it either: {plan.reason}"
