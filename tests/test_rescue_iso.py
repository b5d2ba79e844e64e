"""The rescue ISO, built for real (mmdebstrap from Debian 12 packages; cached by the hash of its
inputs in /var/cache/imgkit/rescue, so a second session only rebuilds the small imgkit layer when
imgkit changed) and booted for real under QEMU: to its banner under BIOS and UEFI (boot-check), and
with disks carrying capture and restore jobs, whose results the host checks sector by sector."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from imgkit.rescue import job as rescue_job
from tests.conftest import run_imgkit
from tests.rescue_helpers import (MIB, blank_disk, ext4_job_disk, ext4_read, fat_job_disk, fat_list,
                                  fat_read_text, job_text, rescue_iso, run, sha256_file)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mmdebstrap)")


@pytest.fixture(scope="module")
def iso():
    return rescue_iso()


# -- the job file and kernel parameters (host-side, no VM) ---------------------------------------

def test_job_file_parsing():
    job = rescue_job.parse_job("# c\naction = capture  # comment\n\nSOURCE=/dev/sda\nimage = a b.imgk\n")
    assert job == {"action": "capture", "source": "/dev/sda", "image": "a b.imgk"}
    with pytest.raises(rescue_job.JobError, match="line 2"):
        rescue_job.parse_job("action = capture\nsorce = /dev/sda\n")   # a typo is refused, not ignored
    with pytest.raises(rescue_job.JobError):
        rescue_job.parse_job("just words\n")


def test_kernel_parameters():
    job, nojob = rescue_job.cmdline_job("BOOT_IMAGE=/live/vmlinuz quiet imgkit.action=restore imgkit.target=auto")
    assert job == {"action": "restore", "target": "auto"} and not nojob
    assert rescue_job.cmdline_job("console=ttyS0 imgkit.nojob")[1]
    with pytest.raises(rescue_job.JobError):
        rescue_job.cmdline_job("imgkit.rm=-rf")


@pytest.mark.parametrize("media,firmware", [("cdrom", "uefi"), ("usb", "bios")])
def test_vm_argv_nodes_come_from_format_node(tmp_path, media, firmware):
    """run_iso's QEMU gets -blockdev JSON from the one node builder, explicit drivers at every level:
    no -drive (which would probe), the ISO read-only, the test disks writable scratch files."""
    from imgkit.formats.qemu_image import format_node
    from imgkit.rescue.vm import vm_argv
    iso_path, disks = tmp_path / "r.iso", [tmp_path / "a.raw", tmp_path / "b.raw"]
    for f in (iso_path, *disks):
        f.write_bytes(bytes(512))
    argv = vm_argv("qemu-system-x86_64", str(iso_path), [str(d) for d in disks], str(tmp_path),
                   str(tmp_path / "log"), firmware=firmware, iso_media=media)
    assert "-drive" not in argv
    nodes = {n["node-name"]: n for n in (json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev")}
    name = "stick" if media == "usb" else "cd"
    assert nodes[name] == format_node(str(iso_path), "raw", node_name=name)
    assert nodes[name]["read-only"] is True and nodes[name]["file"]["read-only"] is True
    for i, d in enumerate(disks):
        node = nodes[f"disk{i}"]
        assert node == format_node(str(d), "raw", node_name=f"disk{i}", writable=True, flush=False)
        assert node["driver"] == "raw" and node["file"]["driver"] == "file" and node["read-only"] is False
        assert f"virtio-blk-pci,drive=disk{i}" in argv
    assert all(n["driver"] and n["file"]["driver"] for n in nodes.values())
    machine = argv[argv.index("-machine") + 1]
    if firmware == "uefi":
        assert machine == "pc,pflash0=ovmf-code,pflash1=ovmf-vars"
        assert nodes["ovmf-code"]["read-only"] is True and nodes["ovmf-vars"]["read-only"] is False
        assert nodes["ovmf-vars"]["file"]["filename"].startswith(str(tmp_path))  # a private copy
    else:
        assert machine == "pc" and "ovmf-code" not in nodes


def test_image_path_stays_on_the_imgkit_disk():
    assert rescue_job.image_path("/pc/a.imgk") == os.path.join(rescue_job.MOUNT, "pc/a.imgk")
    for bad in ("../etc/shadow", "a/../../x", "", "/"):
        with pytest.raises(rescue_job.JobError):
            rescue_job.image_path(bad)


# -- the build ---------------------------------------------------------------------------------------

@needs_root
def test_iso_layout_size_and_boot_records(iso):
    assert os.path.getsize(iso) <= 300 * MIB
    listing = run("xorriso", "-indev", iso, "-find", "/live", "-type", "f", stderr=subprocess.DEVNULL)
    for name in ("vmlinuz", "initrd.gz", "system.squashfs", "imgkit.squashfs", "build-id"):
        assert f"/live/{name}" in listing, listing
    eltorito = run("xorriso", "-indev", iso, "-report_el_torito", "plain", stderr=subprocess.STDOUT)
    assert "BIOS" in eltorito and "UEFI" in eltorito, eltorito        # both boot entries
    with open(iso, "rb") as f:
        mbr = f.read(512)
    assert mbr[510:512] == b"\x55\xaa" and any(mbr[:440])               # isohybrid: boots from a USB stick
    assert any(mbr[446 + 16 * i + 4] for i in range(4))                 # with a partition table


@needs_root
def test_squashfs_layers_are_zstd(iso, tmp_path):
    sq = tmp_path / "imgkit.squashfs"
    run("xorriso", "-osirrox", "on", "-indev", iso, "-extract", "/live/imgkit.squashfs", sq,
        stderr=subprocess.DEVNULL)
    stats = run("unsquashfs", "-s", sq)
    assert "Compression zstd" in stats, stats
    files = run("unsquashfs", "-l", sq)
    assert "squashfs-root/opt/imgkit/lib/imgkit/rescue/job.py" in files
    assert "squashfs-root/etc/inittab" in files


@needs_root
def test_same_inputs_give_the_same_iso(iso, tmp_path):
    """The cached system layer and this checkout, built again: byte-identical. (The system layer's
    own reproducibility is measured by bench/bench_rescue.py --reproducible: it costs a full build.)"""
    from imgkit.rescue.build import build_rescue_iso
    doc = build_rescue_iso(str(tmp_path / "again.iso"))
    assert doc["system_cached"]
    assert doc["sha256"] == sha256_file(iso)


@needs_root
def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    """xorriso failing at the last step: no output, no work directory, no mount."""
    rescue_iso()  # the system layer must be cached, or this would be a full build
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "xorriso").write_text("#!/bin/sh\necho 'xorriso: simulated failure' >&2\nexit 1\n")
    (fake / "xorriso").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_imgkit("rescue-iso", out_dir / "r.iso")
    assert proc.returncode == 1, proc.stderr
    assert "simulated failure" in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(out_dir) == []
    with open("/proc/self/mountinfo") as f:
        assert str(out_dir) not in f.read()


@needs_root
def test_cli_refuses_an_existing_output(tmp_path):
    out = tmp_path / "r.iso"
    out.write_bytes(b"keep me")
    proc = run_imgkit("rescue-iso", out)
    assert proc.returncode == 3 and "--force" in proc.stderr
    assert out.read_bytes() == b"keep me"


# -- booted -------------------------------------------------------------------------------------------

@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_boots_to_its_banner(iso, firmware):
    proc = run_imgkit("boot-check", iso, "--firmware", firmware, "--timeout", "180", "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0, (doc, proc.stderr)
    assert doc["media"] == "cdrom" and doc["firmware"] == firmware
    assert re.match(r"imgkit rescue \S+ ready", doc["matched"]), doc["matched"]


@pytest.mark.qemu
@pytest.mark.slow
def test_capture_job_then_host_restores_byte_identical(iso, linux_bios_image, tmp_path):
    """BIOS, the ISO dd'ed to a USB stick (the hybrid MBR path), an ext4 IMGKIT disk."""
    from imgkit.rescue.vm import run_iso
    source = tmp_path / "source.raw"
    shutil.copyfile(linux_bios_image, source)
    before = sha256_file(source)
    job = job_text(action="capture", source="/dev/vda", image="fleet/pc1.imgk", after="poweroff")
    dest = ext4_job_disk(tmp_path / "imgkit.ext4", {"imgkit-job.conf": job.encode(), "fleet/.keep": b""})
    vm = run_iso(iso, [str(source), dest], timeout=600, iso_media="usb")
    assert vm.powered_off, vm.console[-3000:]
    assert "IMGKIT-JOB-DONE rc=0" in vm.console, vm.console[-3000:]
    assert sha256_file(source) == before                       # the capture wrote nothing to the source
    image = ext4_read(dest, "fleet/pc1.imgk", tmp_path / "pc1.imgk")
    log = open(ext4_read(dest, "fleet/pc1.imgk.capture.log", tmp_path / "capture.log")).read()
    assert "$ imgkit capture /dev/vda" in log and "exit 0 after" in log, log
    run_imgkit("verify", image, check=True)
    restored = tmp_path / "restored.raw"
    run_imgkit("restore", image, restored, "--yes", check=True)
    assert sha256_file(restored) == before                      # sector by sector


@pytest.mark.qemu
@pytest.mark.slow
def test_restore_job_writes_the_disk_byte_identical(iso, linux_bios_image, tmp_path):
    """UEFI from the CD-ROM, a FAT32 IMGKIT partition on an MBR stick, target = auto, verify = yes."""
    from imgkit.rescue.vm import run_iso
    image = tmp_path / "pc2.imgk"
    run_imgkit("capture", linux_bios_image, image, check=True)
    conf = tmp_path / "imgkit-job.conf"
    conf.write_text(job_text(action="restore", image="pc2.imgk", target="auto", verify="yes"))
    stick = fat_job_disk(tmp_path / "stick.raw", {"pc2.imgk": str(image), "imgkit-job.conf": str(conf)})
    target = blank_disk(tmp_path / "target.raw", os.path.getsize(linux_bios_image))
    vm = run_iso(iso, [target, stick], timeout=600, firmware="uefi")  # target = auto: the only other disk
    assert vm.powered_off, vm.console[-3000:]
    assert "IMGKIT-JOB-DONE rc=0" in vm.console, vm.console[-3000:]
    assert sha256_file(target) == sha256_file(linux_bios_image)
    assert "PC2.IMGK.RESTORE.LOG" in fat_list(stick).upper() or "pc2.imgk.restore.log" in fat_list(stick)
    log = fat_read_text(stick, "pc2.imgk.restore.log")
    assert "$ imgkit restore" in log and "/dev/vda" in log and "--verify" in log and "exit 0 after" in log, log


@needs_root
def test_failed_system_build_leaves_nothing_mounted(tmp_path, monkeypatch):
    """mmdebstrap dying with its chroot mounts still in place (a stand-in that mounts a tmpfs and a
    bind mount under the root it was given, then fails; a real one takes minutes to get there): one
    error line naming the log, no work directory, no mount below the cache, the log kept."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mmdebstrap").write_text(
        "#!/bin/sh\n"
        'root=$(for a; do case "$a" in */.system-*/root) echo "$a";; esac; done)\n'
        'mkdir -p "$root/proc" "$root/dev" && mount -t tmpfs none "$root/proc" && mount --bind /dev "$root/dev"\n'
        "echo 'E: simulated failure inside the chroot'\nexit 25\n")
    (fake / "mmdebstrap").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    cache = tmp_path / "cache"
    proc = run_imgkit("rescue-iso", tmp_path / "r.iso", "--cache-dir", cache)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "imgkit: error: mmdebstrap" in proc.stderr, proc.stderr
    leftovers = sorted(os.listdir(cache))
    assert not [e for e in leftovers if e.startswith((".system-", "system-"))], leftovers
    logs = [e for e in leftovers if e.startswith("build-") and e.endswith(".log")]
    assert logs and "simulated failure" in (cache / logs[0]).read_text()
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()
    assert not os.path.exists(tmp_path / "r.iso")
