"""`imgkit rescue-iso`: build the bootable rescue ISO (BIOS + UEFI, hybrid: dd to a USB stick).

    system layer (system.py)  Debian 12 minbase + kernel + tools, cached by its key  ~2 min cold
    imgkit layer (layer.py)   this checkout of imgkit + console/job files             seconds
    ISO (here)                GRUB images + xorriso: El Torito BIOS + EFI, hybrid      seconds

The same inputs give the same ISO: every timestamp is SOURCE_DATE_EPOCH, every archive is written
sorted with fixed owners, and the packages come from the cache once downloaded. A failed build
leaves nothing behind: work directories are removed after anything mounted below them (mmdebstrap's
chroot mounts, should it die between mount and unmount) is unmounted; the output appears complete
or not at all."""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import time

from ..errors import EnvironmentProblem, InputError, OperationFailed
from .layer import build_layer_tree, imgkit_version, layer_digest
from .system import SQUASHFS_OPTIONS, build_system, system_key

DEFAULT_CACHE = "/var/cache/imgkit/rescue"
DEFAULT_EPOCH = 1700000000      # 2023-11-14: fixed, so a rebuild gives the same bytes
MAX_SIZE = 300 << 20
VOLUME_ID = "IMGKIT_RESCUE"
GRUB_CFG = """\
# imgkit rescue. Serial (COM1, 115200) and screen both show the menu and the system's console.
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
set timeout=2
set default=0
menuentry "imgkit rescue {version}" {{
  linux /live/vmlinuz console=tty0 console=ttyS0,115200n8 quiet loglevel=3
  initrd /live/initrd.gz
}}
menuentry "imgkit rescue {version} (ignore jobs: imgkit.nojob)" {{
  linux /live/vmlinuz console=tty0 console=ttyS0,115200n8 imgkit.nojob
  initrd /live/initrd.gz
}}
menuentry "imgkit rescue {version} (kernel messages)" {{
  linux /live/vmlinuz console=tty0 console=ttyS0,115200n8
  initrd /live/initrd.gz
}}
"""


def default_cache() -> str:
    return os.environ.get("IMGKIT_RESCUE_CACHE") or DEFAULT_CACHE


class Steps:
    """Progress: one line per step on stderr-like `emit`, with the time since the start."""

    def __init__(self, emit):
        self.emit, self.start = emit, time.monotonic()

    def __call__(self, text: str) -> None:
        if self.emit:
            self.emit(f"rescue-iso: [{time.monotonic() - self.start:6.1f} s] {text}")


def _mounts_under(path: str) -> list[str]:
    from ..platform.blockdev import mountinfo
    path = os.path.realpath(path)
    return [e.mount_point for e in mountinfo() if e.mount_point == path or e.mount_point.startswith(path + "/")]


def remove_work_dir(path: str) -> None:
    """Unmounts whatever is still mounted below `path` (deepest first), then removes it."""
    for mp in sorted(_mounts_under(path), key=len, reverse=True):
        if subprocess.run(["umount", mp], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mp], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def _system(cache: str, epoch: int, say, refresh: bool) -> tuple[str, bool]:
    """The cached system layer's directory, built first if needed; (dir, was_cached)."""
    key = system_key(epoch)
    final = os.path.join(cache, f"system-{key[:16]}")
    if os.path.isfile(os.path.join(final, "system.squashfs")) and not refresh:
        return final, True
    with open(os.path.join(cache, ".system.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(os.path.join(final, "system.squashfs")) and not refresh:
            return final, True
        work = tempfile.mkdtemp(prefix=".system-", dir=cache)
        try:
            build_system(work, cache, epoch, say, refresh)
            if os.path.exists(final):
                shutil.rmtree(final)
            # A directory, renamed under the cache lock after the old one is gone: not
            # writeback.publish (files only: its fallback is link()).
            os.replace(work, final)
        except BaseException:
            say("build failed: cleaning up")
            remove_work_dir(work)
            raise
        prune(cache, "system-", keep=final)
    return final, False


KEEP_BUILDS = 3


def prune(cache: str, prefix: str, keep: str) -> None:
    """Removes all but the KEEP_BUILDS newest `prefix`* directories (and never `keep`). Not just the
    current one: several checkouts (worktrees, branches) share the cache, and removing each other's
    layers would have them rebuild in turn."""
    dirs = [os.path.join(cache, e) for e in os.listdir(cache) if e.startswith(prefix)]
    dirs = sorted((d for d in dirs if os.path.isdir(d) and d != keep), key=os.path.getmtime, reverse=True)
    for d in dirs[KEEP_BUILDS - 1:]:
        shutil.rmtree(d, ignore_errors=True)


def _make_iso(system: str, work: str, out_tmp: str, epoch: int, say) -> None:
    build_id = open(os.path.join(system, "build-id")).read().strip()
    version = imgkit_version()
    layer_root = os.path.join(work, "layer")
    os.makedirs(layer_root)
    say("writing the imgkit layer (this checkout of imgkit, console, job runner)")
    build_layer_tree(layer_root, build_id)
    iso_root = os.path.join(work, "iso")
    live = os.path.join(iso_root, "live")
    os.makedirs(live)
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(epoch), LC_ALL="C")
    _check(["mksquashfs", layer_root, os.path.join(live, "imgkit.squashfs"), *SQUASHFS_OPTIONS, "-all-root"],
           env, "mksquashfs (imgkit layer)")
    for name in ("vmlinuz", "initrd.gz", "system.squashfs", "packages.txt"):
        os.link(os.path.join(system, name), os.path.join(live, name)) if _same_fs(system, live) \
            else shutil.copyfile(os.path.join(system, name), os.path.join(live, name))
    with open(os.path.join(live, "build-id"), "w") as f:
        f.write(build_id + "\n")
    with open(os.path.join(live, f"build-id-{build_id}"), "w") as f:   # what GRUB searches for
        f.write(build_id + "\n")
    grub = os.path.join(iso_root, "boot", "grub")
    os.makedirs(grub)
    with open(os.path.join(grub, "grub.cfg"), "w") as f:
        f.write(GRUB_CFG.format(version=version))
    say("making the boot images (GRUB i386-pc El Torito, x86_64-efi in a FAT image)")
    _grub_images(work, grub, build_id, env)
    for dirpath, _, filenames in os.walk(iso_root):
        for name in filenames + [""]:
            os.utime(os.path.join(dirpath, name), (epoch, epoch), follow_symlinks=False)
    say("making the ISO (xorriso: BIOS + UEFI El Torito, hybrid MBR/GPT for USB sticks)")
    # grub-mkrescue's arguments, without its --modification-date (it takes the current time, and
    # bakes it into GRUB's search): xorriso derives every date and the GPT GUIDs from SOURCE_DATE_EPOCH.
    _check(["xorriso", "-as", "mkisofs", "-quiet", "-o", out_tmp, "-V", VOLUME_ID, "-r", "-J", "-joliet-long",
            "-b", "boot/grub/bios.img", "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table",
            "--grub2-boot-info", "--grub2-mbr", f"{GRUB_BIOS}/boot_hybrid.img",
            "-eltorito-alt-boot", "-e", "boot/grub/efi.img", "-no-emul-boot",
            "-efi-boot-part", "--efi-boot-image", "--protective-msdos-label",
            "--sort-weight", "0", "/", "--sort-weight", "1", "/boot", iso_root], env, "xorriso")


GRUB_BIOS, GRUB_EFI = "/usr/lib/grub/i386-pc", "/usr/lib/grub/x86_64-efi"
# Everything GRUB needs is built into its two images (no module directories on the ISO).
GRUB_COMMON = ["iso9660", "part_msdos", "part_gpt", "fat", "search", "search_fs_file", "configfile", "normal",
               "linux", "gzio", "serial", "terminal", "echo", "test", "boot", "halt", "reboot"]
GRUB_EMBEDDED = """\
search --no-floppy --file --set=root /live/build-id-{build_id}
set prefix=($root)/boot/grub
configfile $prefix/grub.cfg
"""


def _grub_images(work: str, grub: str, build_id: str, env: dict) -> None:
    """bios.img (i386-pc-eltorito; also reached from the hybrid MBR on a stick) and efi.img (a FAT
    image with EFI/BOOT/BOOTX64.EFI). Both find the ISO's root by the build's marker file."""
    cfg = os.path.join(work, "embedded.cfg")
    with open(cfg, "w") as f:
        f.write(GRUB_EMBEDDED.format(build_id=build_id))
    _check(["grub-mkimage", "-O", "i386-pc-eltorito", "-d", GRUB_BIOS, "-o", os.path.join(grub, "bios.img"),
            "-c", cfg, "-p", "/boot/grub", "biosdisk", *GRUB_COMMON], env, "grub-mkimage (BIOS)")
    efi = os.path.join(work, "BOOTX64.EFI")
    _check(["grub-mkimage", "-O", "x86_64-efi", "-d", GRUB_EFI, "-o", efi, "-c", cfg, "-p", "/boot/grub",
            "efi_gop", "efi_uga", "all_video", *GRUB_COMMON], env, "grub-mkimage (UEFI)")
    os.utime(efi, (int(env["SOURCE_DATE_EPOCH"]),) * 2)
    img = os.path.join(grub, "efi.img")
    kib = max(1440, (os.path.getsize(efi) // 1024 + 256) // 32 * 32)
    # --invariant and SOURCE_DATE_EPOCH (mtools): fixed volume id and dates, so the same bytes.
    _check(["mkfs.fat", "--invariant", "-i", "494D474B", "-n", "IMGKIT_EFI", "-C", img, str(kib)], env, "mkfs.fat")
    _check(["mmd", "-i", img, "::/EFI", "::/EFI/BOOT"], env, "mmd")
    _check(["mcopy", "-m", "-i", img, efi, "::/EFI/BOOT/BOOTX64.EFI"], env, "mcopy")


def _same_fs(a: str, b: str) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def _check(cmd: list[str], env: dict, what: str) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
        raise OperationFailed(f"{what} failed (exit {proc.returncode}): {tail}")


def build_rescue_iso(out: str, cache_dir: str | None = None, *, force: bool = False, refresh: bool = False,
                     epoch: int = DEFAULT_EPOCH, emit=None) -> dict:
    """Builds the ISO at `out`; returns a summary (path, size, sha256, seconds, system_cached)."""
    if os.geteuid() != 0:
        raise EnvironmentProblem("rescue-iso must run as root (mmdebstrap installs packages into a chroot)")
    for prog in ("grub-mkimage", "xorriso", "mksquashfs", "mkfs.fat", "mcopy"):
        if not shutil.which(prog):
            raise EnvironmentProblem(f"{prog} not found", hint="run scripts/setup.sh")
    for d in ("/usr/lib/grub/i386-pc", "/usr/lib/grub/x86_64-efi"):
        if not os.path.isdir(d):
            raise EnvironmentProblem(f"{d} missing", hint="apt-get install grub-pc-bin grub-efi-amd64-bin")
    out = os.path.abspath(out)
    if os.path.exists(out) and not force:
        raise InputError(f"{out} exists", hint="use --force to replace it")
    if not os.path.isdir(os.path.dirname(out)):
        raise InputError(f"{os.path.dirname(out)} is not a directory")
    cache = os.path.abspath(cache_dir or default_cache())
    os.makedirs(cache, exist_ok=True)
    say = Steps(emit)
    started = time.monotonic()
    say(f"cache: {cache}")
    system, cached = _system(cache, epoch, say, refresh)
    if cached:
        say(f"system layer from the cache ({os.path.basename(system)})")
    work = tempfile.mkdtemp(prefix=".rescue-iso-", dir=os.path.dirname(out))
    out_tmp = os.path.join(work, "out.iso")
    try:
        _make_iso(system, work, out_tmp, epoch, say)
        size = os.path.getsize(out_tmp)
        if size > MAX_SIZE:
            raise OperationFailed(f"the ISO is {size >> 20} MiB, over the {MAX_SIZE >> 20} MiB limit")
        os.chmod(out_tmp, 0o644)
        from ..platform.writeback import publish_file
        try:
            publish_file(out_tmp, out, replace=force)  # an OUT that appeared meanwhile is kept without --force
        except FileExistsError as e:
            raise InputError(f"{out}: {e.strerror}", hint="use --force to replace it") from None
    except BaseException:
        say("build failed: cleaning up")
        raise
    finally:
        remove_work_dir(work)
    h = hashlib.sha256()
    with open(out, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    seconds = time.monotonic() - started
    say(f"done: {out} ({size / (1 << 20):.1f} MiB) in {seconds:.1f} s")
    return {"path": out, "size": size, "sha256": h.hexdigest(), "seconds": round(seconds, 1),
            "system_cached": cached, "system": os.path.basename(system), "imgkit_version": imgkit_version()}


def iso_key(epoch: int = DEFAULT_EPOCH) -> str:
    """The hash of every input of the ISO (system layer key + imgkit layer + this file)."""
    h = hashlib.sha256(system_key(epoch).encode() + layer_digest().encode())
    with open(os.path.abspath(__file__), "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def cached_rescue_iso(cache_dir: str | None = None, emit=None) -> str:
    """The ISO for the current inputs from the cache, built once (tests, benchmarks)."""
    cache = os.path.abspath(cache_dir or default_cache())
    os.makedirs(cache, exist_ok=True)
    key = iso_key()
    final = os.path.join(cache, f"iso-{key[:16]}", "imgkit-rescue.iso")
    if os.path.isfile(final):
        return final
    with open(os.path.join(cache, ".iso.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(final):
            return final
        os.makedirs(os.path.dirname(final), exist_ok=True)
        build_rescue_iso(final, cache, force=True, emit=emit)
        prune(cache, "iso-", keep=os.path.dirname(final))
    return final
