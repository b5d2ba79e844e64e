"""What a disk holds: partition table, each partition's filesystem and label, optical (ISO) facts.
Shared by capture (stored as metadata) and info (for raw and foreign sources)."""
from __future__ import annotations

from .probe import probe
from ..formats.partitions import PartitionTable, read_partition_table
from ..stream import SliceStream, Stream


def describe_partitions(disk: Stream) -> tuple[PartitionTable, dict]:
    table = read_partition_table(disk)
    doc = {"type": table.type, "disk_id": table.disk_id, "sector_size": table.sector_size,
           "problems": table.problems, "partitions": []}
    for p in table.partitions:
        entry = {"number": p.number, "start": p.start, "size": p.size, "type": p.type,
                 "type_name": p.type_name, "uuid": p.uuid, "name": p.name, "bootable": p.bootable,
                 "logical": p.logical, "filesystem": None, "label": None}
        if not p.is_extended and p.end <= disk.size:
            found = probe(SliceStream(disk, p.start, p.size))
            entry["filesystem"], entry["label"] = found.type, found.label
        doc["partitions"].append(entry)
    if table.type == "none":
        whole = probe(disk)
        doc["filesystem"], doc["label"] = whole.type, whole.label
    return table, doc


def optical_facts(disk: Stream) -> dict | None:
    """ISO 9660 primary volume descriptor at sector 16 (ECMA-119 8.4) and El Torito (boot record)."""
    if disk.size < 17 * 2048:
        return None
    pvd = disk.read(16 * 2048, 2048)
    if pvd[1:6] != b"CD001" or pvd[0] != 1:
        return None
    facts = {"sector_size": 2048, "volume_id": pvd[40:72].decode("ascii", "replace").strip() or None,
             "el_torito": False}
    for n in range(17, 32):  # the descriptor set ends with a terminator (type 255)
        vd = disk.read(n * 2048, 2048)
        if len(vd) < 2048 or vd[1:6] != b"CD001" or vd[0] == 255:
            break
        if vd[0] == 0 and vd[7:30].rstrip(b"\0") == b"EL TORITO SPECIFICATION":
            facts["el_torito"] = True
    return facts
