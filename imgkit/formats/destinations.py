"""Writing images: which formats convert makes, and how each one is written.

The destination side of the format registry (registry.py is the source side). Each output format
declares, in one entry of DESTINATIONS, everything convert needs to route a conversion to it:
- how it is written: CAPTURE (imgkit's own image, filesystem-aware), COPY (the bytes as they are,
  into a sparse file) or QEMU_IMG (`qemu-img convert -O qemu_name`), and for the last, when imgkit
  writes it natively instead (a writer in this package, under the conditions it supports);
- its subformats and the default, the fixed `-o` options qemu-img gets, and whether --compress
  applies (the options and arguments it adds);
- whether it only holds an optical disc (ISO), and whether it keeps an image encrypted (imgk).
PRESETS names the destination setups a platform requires (Azure: a fixed VHD of whole MiB).
convert (imgkit/operations/convert.py) reads these declarations and switches on no format name, so
a new output format is one entry here (plus its writer module if imgkit writes it itself).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import InputError

CAPTURE = "capture"    # imgkit's own image: capture_stream
COPY = "copy"          # the disk's bytes as they are, into a sparse file
QEMU_IMG = "qemu-img"  # qemu-img convert -O qemu_name (or imgkit's native writer where declared)

# write(stream, path, map_pieces, advance=..., durable=...) -> data bytes written: see qcow2_writer.write_qcow2.
NativeWrite = Callable[..., int]


@dataclass(frozen=True)
class NativeWriter:
    """imgkit writes the format itself (measured faster than qemu-img reading the NBD export) for
    the subformats listed, and only uncompressed unless `compresses`."""
    load: Callable[[], NativeWrite]  # imported when used: convert to other formats never loads it
    subformats: tuple[str | None, ...] = (None,)
    compresses: bool = False

    def applies(self, subformat: str | None, compress: bool) -> bool:
        return subformat in self.subformats and (self.compresses or not compress)


@dataclass(frozen=True)
class Destination:
    name: str
    route: str                            # CAPTURE, COPY or QEMU_IMG
    qemu_name: str | None = None          # qemu-img's -O name; None: qemu-img cannot write it
    subformats: tuple[str, ...] = ()      # what --subformat accepts
    default_subformat: str | None = None
    qemu_options: tuple[str, ...] = ()    # -o options always given (after subformat=)
    # --compress: what it means for this format (named in errors); None when it does not apply.
    compression: str | None = None
    compress_options: tuple[str, ...] = ()  # -o options --compress adds
    compress_args: tuple[str, ...] = ()     # qemu-img arguments --compress adds
    no_compress_hint: str | None = None     # why --compress is not needed here, if it is not
    native: NativeWriter | None = None
    optical: bool = False                  # holds an optical disc only (refuses a hard disk)
    encrypts: bool = False                 # keeps an encrypted source encrypted (takes --encrypt)

    def qemu_img_options(self, subformat: str | None, compress: bool) -> list[str]:
        """qemu-img's `-o` argument for this destination (empty when there is nothing to set)."""
        opts = [f"subformat={subformat}"] if self.subformats and subformat else []
        opts += self.qemu_options
        if compress:
            opts += self.compress_options
        return ["-o", ",".join(opts)] if opts else []


def _qcow2_writer() -> NativeWrite:
    from .qcow2_writer import write_qcow2
    return write_qcow2


def _vhd_writer() -> NativeWrite:
    from .vhd_writer import write_vhd
    return write_vhd


# In the order the CLI lists them (detect.FORMATS).
DESTINATIONS: dict[str, Destination] = {d.name: d for d in (
    Destination("imgk", CAPTURE, encrypts=True, no_compress_hint="imgk is always zstd-compressed; --level sets the level"),
    Destination("raw", COPY, qemu_name="raw"),
    Destination("iso", COPY, qemu_name="raw", optical=True),
    Destination("qcow2", QEMU_IMG, qemu_name="qcow2", qemu_options=("compat=1.1",),
                compression="zstd clusters", compress_options=("compression_type=zstd",),
                # Out-of-order writes: qcow2 allocates clusters as they come, and with -c the
                # compression of several clusters overlaps instead of waiting for the previous write
                # (measured faster). Not without -c: over NBD, uncompressed, -W -m 16 made qemu-img
                # 2.5x slower (1.81 s against 0.73 s for 1.2 GiB from nbdkit's file plugin, all
                # system time).
                compress_args=("-c", "-W", "-m", "16"),
                native=NativeWriter(_qcow2_writer)),
    # force_size keeps the exact virtual size (qemu otherwise rounds up to a CHS geometry).
    Destination("vhd", QEMU_IMG, qemu_name="vpc", subformats=("fixed", "dynamic"), default_subformat="dynamic",
                qemu_options=("force_size=on",), native=NativeWriter(_vhd_writer, subformats=("dynamic",))),
    Destination("vhdx", QEMU_IMG, qemu_name="vhdx", subformats=("dynamic", "fixed"), default_subformat="dynamic"),
    Destination("vmdk", QEMU_IMG, qemu_name="vmdk", subformats=("monolithicSparse", "streamOptimized"),
                default_subformat="monolithicSparse",
                no_compress_hint="streamOptimized VMDK is always compressed"),
)}


@dataclass(frozen=True)
class Preset:
    """A named destination setup a platform requires (convert --preset)."""
    name: str
    to: str                  # the only destination format it makes
    subformat: str
    pad_to_mib: bool = False  # the virtual disk rounded up to a whole MiB (zeros added)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    # Azure takes a fixed VHD whose virtual size is a whole number of MiB.
    Preset("azure", "vhd", "fixed", pad_to_mib=True),
)}


def destination(name: str) -> Destination:
    try:
        return DESTINATIONS[name]
    except KeyError:
        raise InputError(f"unknown destination format {name!r}", hint="formats: " + ", ".join(DESTINATIONS)) from None


def names(pred: Callable[[Destination], bool]) -> str:
    """The destinations matching `pred`, as a sentence lists them: "raw, qcow2 or vmdk"."""
    found = [d.name for d in DESTINATIONS.values() if pred(d)]
    return ", ".join(found[:-1]) + " or " + found[-1] if len(found) > 1 else "".join(found)
