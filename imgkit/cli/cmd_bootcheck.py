"""The boot-check command: boot an image in QEMU and say whether it came up."""
from __future__ import annotations

import re
import signal
import sys

import click

from ..operations import bootcheck
from ..operations.bootcheck.options import check_output_path
from ..errors import OperationFailed
from ..formats.detect import FORMATS
from ..units import format_size
from ..platform.writeback import replace_small_file
from .main import cli
from .options import SIZE, json_option, password_options, reading_password
from .junit import junit_xml
from .output import emit_json


def _regex(ctx, param, value):
    if value is None:
        return None
    try:
        re.compile(value)
    except re.error as e:
        raise click.BadParameter(f"not a valid regular expression: {e}")
    return value


def _terminate(signum, frame):
    raise KeyboardInterrupt


def render_result(r: bootcheck.BootResult) -> str:
    lines = [r.summary(),
             f"  image:    {r.format}{' (streamed by imgkit over NBD)' if r.streamed else ''}, boots as {r.media}",
             f"  firmware: {r.firmware} ({r.firmware_why})",
             f"  accel:    {r.accel} ({r.accel_why})",
             f"  memory:   {format_size(r.memory)}, timeout {r.timeout:g} s, total {r.total_seconds:.1f} s"]
    if r.screenshot:
        lines.append(f"  screenshot: {r.screenshot}")
    if r.screenshot_error:
        lines.append(f"  screenshot failed: {r.screenshot_error}")
    if r.console_tail:
        lines.append("  last console lines:")
        lines += [f"    | {ln}" for ln in r.console_tail[-(10 if r.passed else 20):]]
    elif not r.passed and r.firmware_log_tail:
        lines.append("  no console output; last firmware log lines:")
        lines += [f"    | {ln}" for ln in r.firmware_log_tail]
    return "\n".join(lines)


@cli.command("boot-check")
@click.argument("image", type=click.Path())
@click.option("--expect", callback=_regex, metavar="REGEX",
              help="What the serial console must print (default: a login prompt, the vm-fixtures marker "
                   "IMGKIT-BOOT-OK or the rescue ISO's banner).")
@click.option("--firmware", type=click.Choice(["auto", "bios", "uefi"]), default="auto", show_default=True,
              help="auto: UEFI for GPT with an ESP and no BIOS boot code, BIOS otherwise; ISOs boot as a CD-ROM.")
@click.option("--timeout", type=click.FloatRange(0.1, 86400), default=bootcheck.DEFAULT_TIMEOUT,
              show_default=True, help="Seconds to wait for the match.")
@click.option("--memory", type=SIZE, default="512M", show_default=True, help="Guest memory.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
              help="auto: KVM if a probe guest runs under it (cached per host boot), else TCG. "
                   "IMGKIT_ACCEL=tcg forces TCG.")
@click.option("--format", "image_format", type=click.Choice(FORMATS),
              help="Format of IMAGE (default: read from its header).")
@click.option("--screenshot", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="Save the guest's screen as PNG when the check ends.")
@click.option("--junit", type=click.Path(dir_okay=False), metavar="FILE.xml", help="Write a JUnit XML report.")
@click.option("--console-log", type=click.Path(dir_okay=False), metavar="FILE",
              help="Append the raw serial console output to FILE.")
@password_options
@json_option
def boot_check(image, expect, firmware, timeout, memory, accel, image_format, screenshot, junit, console_log,
               password_file, as_json):
    """Boot IMAGE in QEMU and check that it comes up.

    Any image imgkit reads: imgk (plain, encrypted, split; streamed, never unpacked), raw, iso, qcow2,
    vhd, vhdx, vmdk. The image is never written: QEMU writes to a throwaway overlay. No network, no
    host shares, a timeout. Passes when the serial console matches --expect; otherwise names the
    reason: no bootable device, kernel panic, bootloader failed, guest stopped, timeout.

    Exit status: 0 pass, 1 fail, 3 bad image or option, 4 QEMU/OVMF missing.

    Example: imgkit boot-check backup.imgk --expect 'login:' --timeout 300 --junit boot.xml
    """
    # A CI job's timeout sends SIGTERM: unwind (stopping QEMU, removing the temp dir) as for Ctrl-C.
    signal.signal(signal.SIGTERM, _terminate)
    if junit:
        check_output_path(junit, "--junit")
    result = bootcheck.boot_check(image, expect=expect, firmware=firmware, timeout=timeout, memory=memory,
                                  accel=accel, screenshot=screenshot, password=reading_password(password_file),
                                  fmt=image_format, console_log=console_log)
    if junit:
        replace_small_file(junit, junit_xml(result))
    if as_json:
        emit_json(result.to_json())
    else:
        click.echo(render_result(result))
    if not result.passed:
        sys.exit(OperationFailed.exit_code)  # the report is out; a failed boot is exit 1
