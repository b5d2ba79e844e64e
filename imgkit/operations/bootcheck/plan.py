"""How an image will be booted, decided before QEMU starts: CD-ROM or disk, BIOS or UEFI (and
where the UEFI firmware is)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ...errors import EnvironmentProblem
from ...stream import Stream

OVMF_CANDIDATES = [  # (code, vars): Debian/Ubuntu, then Fedora/Arch
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
    ("/usr/share/edk2/x64/OVMF_CODE.fd", "/usr/share/edk2/x64/OVMF_VARS.fd"),
]


@dataclass
class BootPlan:
    """How an image will be booted, decided before QEMU starts."""
    format: str          # imgk, raw, iso, qcow2, vhd, vhdx, vmdk
    media: str           # disk or cdrom
    firmware: str        # bios or uefi
    firmware_why: str
    size: int


def plan_boot(stream: Stream, fmt: str, firmware: str = "auto", metadata: dict | None = None) -> BootPlan:
    """Media and firmware for a disk. `auto`: an ISO 9660 image boots as a CD-ROM with BIOS; a GPT disk
    with an EFI system partition and no BIOS boot code (MBR code all zero, no BIOS boot partition)
    boots with UEFI; everything else with BIOS."""
    from ...filesystems.disk_info import optical_facts
    from ...formats.partitions import read_partition_table

    optical = (metadata or {}).get("optical") or optical_facts(stream)
    from ...formats.registry import FORMATS
    declared = FORMATS.get(fmt)
    media = "cdrom" if ((declared is not None and declared.optical) or optical) else "disk"
    if firmware in ("bios", "uefi"):
        return BootPlan(fmt, media, firmware, "forced by --firmware", stream.size)
    if media == "cdrom":
        return BootPlan(fmt, media, "bios", "ISO 9660 image: El Torito boot from a CD-ROM", stream.size)
    mbr = stream.read(0, 512)
    boot_code = len(mbr) == 512 and any(mbr[:440])
    table = read_partition_table(stream)
    esp = any(p.is_esp for p in table.partitions)
    bios_boot = any(p.is_bios_boot for p in table.partitions)
    if table.type == "gpt" and esp and not boot_code and not bios_boot:
        return BootPlan(fmt, media, "uefi", "GPT with an EFI system partition and no BIOS boot code",
                        stream.size)
    if table.type == "gpt" and esp:
        why = "GPT with an ESP, but also BIOS boot code" + (" and a BIOS boot partition" if bios_boot else "")
    elif boot_code:
        why = f"{table.type.upper() if table.type != 'none' else 'no partition table'}, MBR boot code present"
    else:
        why = "no EFI system partition"
    return BootPlan(fmt, media, "bios", why, stream.size)


def find_ovmf() -> tuple[str, str]:
    """(code, vars template) of the UEFI firmware: IMGKIT_OVMF_CODE and IMGKIT_OVMF_VARS, else the
    distributions' usual places."""
    code, vars_ = os.environ.get("IMGKIT_OVMF_CODE"), os.environ.get("IMGKIT_OVMF_VARS")
    if code and vars_:
        candidates = [(code, vars_)]
    else:
        candidates = OVMF_CANDIDATES
    for c, v in candidates:
        if os.path.isfile(c) and os.path.isfile(v):
            return c, v
    raise EnvironmentProblem("UEFI firmware (OVMF) not found",
                             hint="apt-get install ovmf, or set IMGKIT_OVMF_CODE and IMGKIT_OVMF_VARS")
