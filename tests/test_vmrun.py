"""`imgkit run` as its users meet it: a real `imgkit run` process booting real QEMU (TCG) from imgk
images served by imgkit over NBD. The tiny boot-sector fixture where any bootable disk will do; the
Linux fixture once, with an overlay and --mirror-to, and its mirror booted again with the backup gone.
Overlays: identity recorded and checked, --force, offline `convert --overlay`."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.bootcheck_helpers import TCG, boot_check_json, file_state
from tests.conftest import assert_one_line_error, run_imgkit

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def imgkit_run(*args, timeout=240):
    env = dict(os.environ, **TCG)
    env.pop("IMGKIT_PASSWORD", None)
    return subprocess.run([sys.executable, "-m", "imgkit", "run", *map(str, args)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(vm_fixture, tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    image = d / "tiny.imgk"
    run_imgkit("capture", "--sector-by-sector", vm_fixture("tiny-bios"), image, check=True)
    return image


def test_run_boots_with_the_console_on_stdout_and_never_writes_the_image(tiny):
    before = file_state(tiny)
    proc = imgkit_run(tiny, "--memory", "64M")
    assert proc.returncode == 0, proc.stderr
    assert "IMGKIT-BOOT-OK tiny-bios" in proc.stdout
    assert file_state(tiny) == before


def test_overlay_records_its_image_and_is_refused_over_another(tiny, vm_fixture, tmp_path):
    overlay = tmp_path / "changes.qcow2"
    proc = imgkit_run(tiny, "--overlay", overlay, "--memory", "64M")
    assert proc.returncode == 0, proc.stderr
    assert "new overlay" in proc.stderr
    info = subprocess.run(["qemu-img", "info", "-f", "qcow2", overlay], capture_output=True, text=True).stdout
    assert "backing file: imgkit-image:imgk-" in info
    proc = imgkit_run(tiny, "--overlay", overlay, "--memory", "64M")
    assert proc.returncode == 0 and "reusing overlay" in proc.stderr, proc.stderr
    other = tmp_path / "other.imgk"  # the same disk captured again: another image (another id)
    run_imgkit("capture", "--sector-by-sector", vm_fixture("tiny-bios"), other, check=True)
    state = file_state(overlay)
    proc = imgkit_run(other, "--overlay", overlay, "--memory", "64M")
    assert_one_line_error(proc, 3, "made over a different image")
    assert file_state(overlay) == state
    proc = imgkit_run(other, "--overlay", overlay, "--memory", "64M", "--force")
    assert proc.returncode == 0 and "new overlay" in proc.stderr, proc.stderr
    not_qcow2 = tmp_path / "notes.txt"
    not_qcow2.write_text("mine")
    assert_one_line_error(imgkit_run(tiny, "--overlay", not_qcow2), 3, "not a qcow2")
    assert not_qcow2.read_text() == "mine"


def test_convert_with_overlay_applies_the_kept_writes(tiny, vm_fixture, tmp_path):
    """The overlay's writes (made here with qemu-io: the fixture guests cannot write their disk) on top
    of the image, offline, exact everywhere else; refused for an overlay of another image."""
    overlay = tmp_path / "changes.qcow2"
    assert imgkit_run(tiny, "--overlay", overlay, "--memory", "64M").returncode == 0
    spec = '{"driver": "qcow2", "file": {"driver": "file", "filename": "%s"}, "backing": null}' % overlay
    subprocess.run(["qemu-io", "-f", "qcow2", "json:" + spec, "-c", "write -P 0xab 4M 64k"], check=True,
                   capture_output=True)
    out = tmp_path / "merged.raw"
    run_imgkit("convert", tiny, out, "--overlay", overlay, check=True)
    want = bytearray(open(vm_fixture("tiny-bios"), "rb").read())
    want[4 * MiB:4 * MiB + 65536] = b"\xab" * 65536
    assert out.read_bytes() == bytes(want)
    qcow = tmp_path / "merged.qcow2"
    run_imgkit("convert", tiny, qcow, "--overlay", overlay, check=True)
    assert "identical" in subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", out, qcow],
                                         capture_output=True, text=True).stdout
    other = tmp_path / "other.imgk"
    run_imgkit("capture", "--sector-by-sector", vm_fixture("tiny-bios"), other, check=True)
    assert_one_line_error(run_imgkit("convert", other, tmp_path / "x.raw", "--overlay", overlay), 3,
                          "different image")
    assert not (tmp_path / "x.raw").exists()


def test_mirror_to_yields_a_standalone_disk(tiny, tmp_path):
    mirror = tmp_path / "vm.qcow2"
    proc = imgkit_run(tiny, "--mirror-to", mirror, "--memory", "64M", "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"mirror_completed": true' in proc.stdout
    assert "switching the VM to the new disk" in proc.stderr and "no longer used" in proc.stderr
    assert not list(tmp_path.glob("*.imgkit-part"))
    subprocess.run(["qemu-img", "check", "-f", "qcow2", mirror], check=True, capture_output=True)
    info = subprocess.run(["qemu-img", "info", "-f", "qcow2", mirror], capture_output=True, text=True).stdout
    assert "backing file" not in info
    assert_one_line_error(imgkit_run(tiny, "--mirror-to", mirror), 3, "exists")


def run_on_console(image, *args, steps, timeout=400):
    """`imgkit run` with the guest's serial console driven through stdin/stdout: for each (text, line),
    wait for text on the console, then type line. Returns (exit code, console text, stderr)."""
    import select
    import time
    env = dict(os.environ, **TCG)
    proc = subprocess.Popen([sys.executable, "-m", "imgkit", "run", str(image), *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, start = b"", time.monotonic()
    try:
        for wait_for, line in steps:
            while wait_for.encode() not in out:
                assert time.monotonic() - start < timeout, out[-2000:]
                ready, _, _ = select.select([proc.stdout], [], [], 1)
                if ready:
                    data = os.read(proc.stdout.fileno(), 65536)
                    assert data, (out[-3000:], proc.stderr.read())
                    out += data
            proc.stdin.write(line.encode())
            proc.stdin.flush()
        rest, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, (out + rest).decode(errors="replace"), err.decode(errors="replace")


SHELL = ("IMGKIT-BOOT-OK linux-bios", "imgkit-shell\n")  # the fixture's init offers a shell (recipes/_common.py)


@pytest.mark.slow
def test_linux_file_written_in_the_guest_persists_and_mirror_boots_alone(linux_bios_image, tmp_path):
    """linux-bios from imgk: run 1 writes a file on the guest's ext4 through the serial console into
    --overlay; run 2 (same overlay, and --mirror-to) reads it back while the disk is mirrored; the
    mirror passes qemu-img check, holds the file, and boots with the backup deleted."""
    image = tmp_path / "lb.imgk"
    run_imgkit("capture", linux_bios_image, image, check=True)
    before = file_state(image)
    overlay, mirror = tmp_path / "changes.qcow2", tmp_path / "vm.qcow2"
    code, console, err = run_on_console(image, "--overlay", overlay, "--memory", "256M", steps=[
        SHELL, ("IMGKIT-SHELL-READY", "mkdir -p /mnt && mount -t ext4 /dev/sda1 /mnt && "
                                      "echo kept-by-imgkit-overlay > /mnt/note.txt && umount /mnt && sync && poweroff -f\n")])
    assert code == 0, (console[-2000:], err)
    assert "new overlay" in err
    code, console, err = run_on_console(image, "--overlay", overlay, "--mirror-to", mirror, "--memory", "256M", steps=[
        SHELL, ("IMGKIT-SHELL-READY", "mkdir -p /mnt && mount -t ext4 -o ro /dev/sda1 /mnt && "
                                      "tr a-z A-Z < /mnt/note.txt; umount /mnt; poweroff -f\n")])
    assert code == 0, (console[-2000:], err)
    assert "reusing overlay" in err and "the VM now runs from" in err, err
    assert "KEPT-BY-IMGKIT-OVERLAY" in console, console[-2000:]  # upper case: the file, not the typed echo
    assert file_state(image) == before  # the backup was never written
    subprocess.run(["qemu-img", "check", "-f", "qcow2", mirror], check=True, capture_output=True)
    raw = tmp_path / "vm.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", mirror, raw], check=True)
    assert b"kept-by-imgkit-overlay\n" in raw.read_bytes()
    os.unlink(image)  # the backup is gone: the mirror must boot on its own
    code, doc, err = boot_check_json(mirror, "--timeout", "240")
    assert code == 0, (doc, err)
    assert doc["matched"].startswith("IMGKIT-BOOT-OK linux-bios")


@pytest.mark.slow
def test_linux_uefi_runs_from_imgk_with_uefi_picked(vm_fixture, tmp_path):
    image = tmp_path / "lu.imgk"
    run_imgkit("capture", vm_fixture("linux-uefi"), image, check=True)
    proc = imgkit_run(image, "--memory", "512M", "--json", timeout=400)
    assert proc.returncode == 0, proc.stderr
    assert "IMGKIT-BOOT-OK linux-uefi" in proc.stdout
    assert '"firmware": "uefi"' in proc.stdout


@pytest.mark.parametrize("memory", ["8M", "65G"])
def test_run_refuses_memory_out_of_range_as_boot_check_does(tiny, memory):
    """run_vm uses boot-check's own option checks: the same line and exit code in both commands."""
    ran = imgkit_run(tiny, "--memory", memory)
    checked = run_imgkit("boot-check", tiny, "--memory", memory, env=TCG)
    from imgkit.errors import InputError
    assert_one_line_error(ran, InputError.exit_code, "--memory must be between 16 MiB and 64 GiB")
    assert (ran.returncode, ran.stderr.strip()) == (checked.returncode, checked.stderr.strip())


def test_run_vm_checks_firmware_with_boot_checks_rule(tiny):
    """The CLI's Choice stops a bad --firmware first; the Python API gets boot-check's error."""
    from imgkit.errors import InputError
    from imgkit.operations.bootcheck import BootOptions
    from imgkit.operations.vmrun import run_vm
    with pytest.raises(InputError) as via_run:
        run_vm(str(tiny), firmware="coreboot")
    with pytest.raises(InputError) as via_check:
        BootOptions(firmware="coreboot")
    assert str(via_run.value) == str(via_check.value)


def test_an_overlay_naming_an_external_data_file_is_refused(tmp_path):
    """A qcow2 whose header names a data file elsewhere on the host (qemu would open it, writable
    under `run`) is no overlay imgkit made, even when its backing name is the right identity."""
    from imgkit.errors import InputError
    from imgkit.operations.vmrun import IDENTITY_PREFIX, prepare_overlay
    plain, forged = tmp_path / "plain.qcow2", tmp_path / "forged.qcow2"
    for path, extra in ((plain, []), (forged, ["-o", f"data_file={tmp_path / 'elsewhere.raw'}"])):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, "-u", "-b", IDENTITY_PREFIX + "x",
                        "-F", "raw", path, str(MiB)], check=True)
    assert prepare_overlay(str(plain), "x", MiB, force=False) is False  # the same header, no data file: accepted
    state = file_state(forged)
    with pytest.raises(InputError, match="external data file"):
        prepare_overlay(str(forged), "x", MiB, force=False)
    assert file_state(forged) == state
