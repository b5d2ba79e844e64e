"""Sizes as users type them (512, 64K, 650M, 4G) and as imgkit prints them (IEC units)."""
import re

from .errors import InputError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'4G' -> 4294967296. Binary units; a bare number is bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise InputError(f"not a size: {text!r}", hint="use bytes or a number with K, M, G or T (binary units), e.g. 650M")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    return int(value)


def format_size(n: int) -> str:
    """4294967296 -> '4.0 GiB'; small values in bytes."""
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024.0
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


# Split-size presets (`--split-size fat32|dvd`), the largest volume each medium holds.
# FAT32 stores a file's size in a 32-bit field: the largest file is 4 GiB - 1 byte. imgkit never
# writes a volume above the split size, so no further margin is needed ("4G" would be 1 byte too many).
FAT32_MAX_FILE = (4 << 30) - 1
# A single-layer DVD+R holds 2,295,104 sectors of 2048 bytes = 4,700,372,992 bytes (DVD-R holds a
# little more, 4,707,319,808): take the smaller, less 8 MiB for the disc's own filesystem (ISO 9660
# + Joliet/UDF descriptors and directories need well under 1 MiB for a few files).
DVD_SINGLE_LAYER = 4_700_372_992
DVD_FILESYSTEM_MARGIN = 8 << 20
SPLIT_PRESETS = {"fat32": FAT32_MAX_FILE, "dvd": DVD_SINGLE_LAYER - DVD_FILESYSTEM_MARGIN}


def parse_split_size(text: str | int) -> int:
    """A size (650M, 4G) or a preset name (fat32, dvd)."""
    if isinstance(text, str) and text.strip().lower() in SPLIT_PRESETS:
        return SPLIT_PRESETS[text.strip().lower()]
    try:
        n = parse_size(text)
    except InputError:
        raise InputError(f"not a split size: {text!r}",
                         hint="use a size such as 650M or 4000M, or a preset: fat32 (4 GiB - 1 byte), "
                              "dvd (single-layer DVD)") from None
    if n <= 0:
        raise InputError(f"split size must be positive, not {text!r}")
    return n


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90', '30s', '10m', '2h', '1d' -> seconds."""
    from .errors import InputError
    t = str(text).strip().lower()
    unit = _DURATION_UNITS.get(t[-1:], None)
    number = t[:-1] if unit else t
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        raise InputError(f"bad duration {text!r}", hint="e.g. 30s, 10m, 2h, 1d") from None
    if value < 0:
        raise InputError(f"bad duration {text!r}: negative")
    return value
