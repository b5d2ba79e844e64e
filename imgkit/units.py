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
