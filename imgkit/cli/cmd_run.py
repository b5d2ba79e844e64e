"""The run command: boot a backup as a VM now; optionally move it to a real disk while it runs."""
from __future__ import annotations

import signal

import click

from ..formats.detect import FORMATS
from .main import cli
from .options import SIZE, json_option, password_options, reading_password
from .output import emit_json


def _terminate(signum, frame):
    raise KeyboardInterrupt


@cli.command()
@click.argument("image", type=click.Path())
@click.option("--overlay", type=click.Path(dir_okay=False), metavar="FILE.qcow2",
              help="Keep the VM's writes in this qcow2 across runs (default: a throwaway overlay). "
                   "Refused if it was made over a different image.")
@click.option("--force", is_flag=True, help="Start a new --overlay over an existing file; replace --mirror-to.")
@click.option("--firmware", type=click.Choice(["auto", "bios", "uefi"]), default="auto", show_default=True,
              help="auto: UEFI for GPT with an ESP and no BIOS boot code, BIOS otherwise; ISOs boot as a CD-ROM.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
              help="auto: KVM if a probe guest runs under it, else TCG. IMGKIT_ACCEL=tcg forces TCG.")
@click.option("--memory", type=SIZE, default="1G", show_default=True, help="Guest memory.")
@click.option("--cpus", type=click.IntRange(1, 64), default=1, show_default=True, help="Virtual CPUs.")
@click.option("--display", type=click.Choice(["none", "vnc"]), default="none", show_default=True,
              help="none: the serial console on this terminal (Ctrl-A x quits); vnc: a VNC display.")
@click.option("--vnc", "vnc_address", default="127.0.0.1:0", show_default=True, metavar="HOST:DISPLAY",
              help="Where the VNC display listens (with --display vnc).")
@click.option("--net", type=click.Choice(["none", "user"]), default="none", show_default=True,
              help="user: QEMU user-mode network (NAT, outgoing only).")
@click.option("--mirror-to", type=click.Path(dir_okay=False), metavar="DISK.qcow2",
              help="While the VM runs, copy backup + writes into this standalone qcow2, then switch the VM to it.")
@click.option("--format", "image_format", type=click.Choice(FORMATS), help="Format of IMAGE (default: from its header).")
@password_options
@json_option
def run(image, overlay, force, firmware, accel, memory, cpus, display, vnc_address, net, mirror_to, image_format,
        password_file, as_json):
    """Boot IMAGE as a virtual machine now, without converting it.

    Any image imgkit reads. The image is never written: the VM's writes go to a throwaway overlay,
    or to --overlay FILE kept across runs. Firmware and accelerator are picked as boot-check does.
    The serial console is on this terminal (no network unless --net user). With --mirror-to, the
    whole disk is copied to a standalone qcow2 while the VM runs, and the VM switches to it when in
    sync: the backup is no longer needed. A damaged chunk is an I/O error in the guest, logged here.

    Examples: imgkit run backup.imgk; imgkit run backup.imgk --overlay changes.qcow2;
    imgkit run backup.imgk --mirror-to vm.qcow2 --display vnc
    """
    from ..operations.vmrun import run_vm

    signal.signal(signal.SIGTERM, _terminate)
    result = run_vm(image, overlay=overlay, force=force, firmware=firmware, accel=accel, memory=memory, cpus=cpus,
                    display=display, vnc=vnc_address, net=net, mirror_to=mirror_to,
                    password=reading_password(password_file), fmt=image_format)
    if as_json:
        emit_json(result.to_json())
    else:
        click.echo(f"imgkit: run: the VM stopped after {result.seconds:.1f} s"
                   + (f"; its disk is now {result.mirror_to}" if result.mirror_completed else ""), err=True)
