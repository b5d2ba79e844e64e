"""The rescue ISO's system layer: a Debian 12 minbase root (mmdebstrap) with the kernel and the tools
imgkit drives, the Python wheels imgkit needs at run time, squashed with zstd; plus the kernel and
our initramfs (initramfs.py) taken from that root.

This is the slow, rarely changing half of the build, so it is cached on its own, keyed by the hash of
what decides its bytes (package list, dpkg filters, wheel pins, this code, the tool versions); the
imgkit layer (layer.py) changes with every commit and costs seconds. Debian point releases don't
change the key: `--refresh` rebuilds from the mirror.

Package cache: every .deb mmdebstrap downloads is kept in CACHE/debs with a flat apt index
(apt-ftparchive), and the next build installs from there (file:// mirror) without the network, so
the same cache gives the same packages and, with SOURCE_DATE_EPOCH, the same bytes."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib import resources

from ..errors import EnvironmentProblem, OperationFailed
from .initramfs import build_initramfs

SUITE = "bookworm"
MIRRORS = [
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
]
# What imgkit runs at run time (the same tools scripts/setup.sh installs), a kernel, busybox for the
# initramfs and as init, and Python. No libguestfs or qemu-system: the rescue system images the
# machine it runs on, it boots no VMs.
PACKAGES = [
    # apt named explicitly: mmdebstrap adds it (and gpgv, the keyring...) when bootstrapping from the
    # mirror but not from the flat file:// cache, and both must give the same root.
    "apt", "linux-image-amd64", "busybox-static", "kmod", "python3",
    "qemu-utils", "partclone", "e2fsprogs", "dosfstools", "ntfs-3g", "xfsprogs", "btrfs-progs",
    "exfatprogs", "fatresize", "fdisk", "gdisk", "mtools", "zstd", "fuse3", "less",
]
# Wheels imgkit needs that Debian 12 has too old or not at all (pyproject's minimums), pinned so
# the same cache gives the same layer. pyfuse3/trio are left out: `imgkit mount` is not for the
# rescue system (and needs a compiler to install).
WHEELS = ["click==8.1.8", "zstandard==0.25.0", "blake3==1.0.11", "cryptography==50.0.2", "cffi==2.1.1",
          "pycparser==3.12"]
PYTHON_VERSION = "3.11"   # Debian 12's: the wheels are chosen for it, not for the host's Python
# Kernel modules no rescue console needs (graphics, sound, radio, industrial I/O...): ~100 MB less
# to squash. Storage, filesystems, USB, HID and Ethernet stay.
PRUNED_MODULE_DIRS = [
    "drivers/gpu", "drivers/media", "drivers/net/wireless", "drivers/infiniband", "drivers/staging",
    "drivers/iio", "drivers/comedi", "drivers/mtd", "drivers/isdn", "drivers/target", "drivers/bluetooth",
    "drivers/nfc", "sound", "net/wireless", "net/mac80211", "net/bluetooth",
]
DPKG_OPTIONS = (
    ["path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
     "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/locale/*", "path-exclude=/usr/share/info/*",
     # The kernel's postinst would run mkinitramfs for an initramfs we replace by ours.
     "path-exclude=/etc/kernel/postinst.d/initramfs-tools"]
    + [f"path-exclude=/lib/modules/*/kernel/{d}/*" for d in PRUNED_MODULE_DIRS])
# Timestamps: mksquashfs takes SOURCE_DATE_EPOCH from the environment (and refuses -all-time with it).
# zstd level 9, not mksquashfs's default 15: measured on the system layer (506 MB), level 15 took
# ~120 s on the loaded 2 cores for 121.7 MiB, level 9 19 s for 122.5 MiB, level 3 5.7 s for 133.4 MiB.
SQUASHFS_OPTIONS = ["-comp", "zstd", "-Xcompression-level", "9", "-b", "1M", "-noappend", "-no-progress",
                    "-no-xattrs"]
_TOOLS = ("mmdebstrap", "squashfs-tools", "apt", "apt-utils")


def _tool_versions() -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\n", *_TOOLS],
                         capture_output=True, text=True)
    return out.stdout


def system_key(epoch: int) -> str:
    """The cache key of the system layer (hex)."""
    h = hashlib.sha256()
    h.update(json.dumps({"suite": SUITE, "mirrors": MIRRORS, "packages": PACKAGES, "wheels": WHEELS,
                         "dpkg": DPKG_OPTIONS, "squashfs": SQUASHFS_OPTIONS, "epoch": epoch,
                         "tools": _tool_versions()}, sort_keys=True).encode())
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("system.py", "initramfs.py", os.path.join("files", "init")):
        with open(os.path.join(here, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


def _run(cmd: list[str], env: dict, what: str, log=None) -> None:
    proc = subprocess.run(cmd, env=env, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "" if log else "\n".join((proc.stdout or "").splitlines()[-15:])
        raise OperationFailed(f"{what} failed (exit {proc.returncode})" + (f":\n{tail}" if tail else ""),
                              hint="see the build log" if log else None)


def _deb_cache_ready(debs: str) -> bool:
    return all(os.path.isfile(os.path.join(debs, n)) for n in ("Packages", "Release", "complete"))


def _mmdebstrap(root: str, debs: str, env: dict, refresh: bool, log) -> str:
    """Bootstraps into `root`; returns "cache" or "mirror" (where the packages came from)."""
    offline = _deb_cache_ready(debs) and not refresh
    hooks = ["--skip=download/empty", "--skip=essential/unlink",
             "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/",
             f"--setup-hook=sync-in {debs} /var/cache/apt/archives/",
             f"--customize-hook=sync-out /var/cache/apt/archives {debs}"]
    sources = [f"deb [trusted=yes] file://{debs} ./"] if offline else MIRRORS
    cmd = (["mmdebstrap", "--mode=root", "--variant=minbase", "--verbose",
            "--include=" + ",".join(PACKAGES)]
           + [f"--dpkgopt={o}" for o in DPKG_OPTIONS] + hooks + [SUITE, root, *sources])
    _run(cmd, env, f"mmdebstrap (log: {log.name})", log)
    return "cache" if offline else "mirror"


def _index_debs(debs: str, env: dict) -> None:
    """A flat apt repository over the downloaded .debs, so the next build needs no network. Older
    versions of a package are dropped first (apt would pick the newest anyway)."""
    newest: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(debs, "*.deb"))):
        name = os.path.basename(path).split("_")[0]
        prev = newest.get(name)
        if prev is None or _newer(path, prev):
            if prev:
                os.unlink(prev)
            newest[name] = path
        else:
            os.unlink(path)
    out = subprocess.run(["apt-ftparchive", "packages", "."], cwd=debs, env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise OperationFailed(f"apt-ftparchive failed: {out.stderr.strip()}")
    with open(os.path.join(debs, "Packages"), "w") as f:
        f.write(out.stdout)
    # mmdebstrap picks the Essential set by suite/codename: the flat repository must name it.
    rel = subprocess.run(["apt-ftparchive", "-o", f"APT::FTPArchive::Release::Suite={SUITE}",
                          "-o", f"APT::FTPArchive::Release::Codename={SUITE}", "release", "."],
                         cwd=debs, env=env, capture_output=True, text=True)
    if rel.returncode != 0:
        raise OperationFailed(f"apt-ftparchive release failed: {rel.stderr.strip()}")
    with open(os.path.join(debs, "Release"), "w") as f:
        f.write(rel.stdout)
    open(os.path.join(debs, "complete"), "w").close()


def _newer(a: str, b: str) -> bool:
    va, vb = (os.path.basename(p).split("_")[1] for p in (a, b))
    from urllib.parse import unquote
    return subprocess.run(["dpkg", "--compare-versions", unquote(va), "gt", unquote(vb)]).returncode == 0


def _install_wheels(root: str, wheels: str, env: dict) -> None:
    """imgkit's pinned wheels into /opt/imgkit/lib of the root (found by a .pth file). The host's pip
    does it, for Debian 12's Python: the root needs no pip and the build no second download."""
    target = os.path.join(root, "opt", "imgkit", "lib")
    # Debian 12 has glibc 2.36: every manylinux tag up to it fits (pip does not expand an explicit
    # --platform to the older tags by itself).
    platforms = [a for t in ("manylinux_2_36", "manylinux_2_34", "manylinux_2_28", "manylinux_2_17",
                             "manylinux2014") for a in ("--platform", f"{t}_x86_64")]
    common = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, *platforms,
              "--implementation", "cp", "--no-deps"]
    have = {os.path.basename(w).split("-")[0].lower().replace("_", "-") for w in glob.glob(f"{wheels}/*.whl")}
    if any(spec.split("==")[0] not in have for spec in WHEELS):
        _run([sys.executable, "-m", "pip", "download", "-q", "-d", wheels, *common, *WHEELS], env,
             "pip download (imgkit's Python dependencies)")
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels, "--target", target,
          "--no-compile", *common, *WHEELS], env, "pip install (into the rescue root)")
    pth = glob.glob(os.path.join(root, "usr", "lib", "python3", "dist-packages"))
    with open(os.path.join(pth[0], "imgkit-rescue.pth"), "w") as f:
        f.write("/opt/imgkit/lib\n")


def _make_reproducible(root: str) -> None:
    """Drop what differs between two builds of the same packages: logs, caches, and the .pyc files
    Debian's postinsts compile (marshal output is not stable; Python recompiles into the overlay)."""
    for pattern in ("var/log/*", "var/cache/apt/*", "var/lib/apt/lists/*", "var/cache/ldconfig/aux-cache",
                    "var/cache/debconf/*-old", "var/lib/dpkg/*-old", "etc/machine-id", "boot/*",
                    "var/lib/dbus/machine-id"):
        for p in glob.glob(os.path.join(root, pattern)):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
    for dirpath, dirnames, _ in os.walk(root):
        if "__pycache__" in dirnames:
            shutil.rmtree(os.path.join(dirpath, "__pycache__"))
            dirnames.remove("__pycache__")
    open(os.path.join(root, "etc", "machine-id"), "w").close()
    # mmdebstrap writes the sources it used (the mirror, or the file:// cache): always the mirror.
    with open(os.path.join(root, "etc", "apt", "sources.list"), "w") as f:
        f.write("\n".join(MIRRORS) + "\n")


def build_system(out_dir: str, cache: str, epoch: int, say, refresh: bool = False) -> dict:
    """Builds vmlinuz, initrd.gz and system.squashfs into out_dir (a fresh directory)."""
    for prog in ("mmdebstrap", "mksquashfs", "apt-ftparchive"):
        if not shutil.which(prog):
            raise EnvironmentProblem(f"{prog} not found", hint="run scripts/setup.sh (apt-get install "
                                     "mmdebstrap squashfs-tools apt-utils)")
    debs, wheels = os.path.join(cache, "debs"), os.path.join(cache, "wheels")
    os.makedirs(debs, exist_ok=True)
    os.makedirs(wheels, exist_ok=True)
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(epoch), LC_ALL="C.UTF-8", DEBIAN_FRONTEND="noninteractive")
    root = os.path.join(out_dir, "root")
    key = system_key(epoch)
    # The log lives in the cache, not in out_dir: a failed build's work directory goes, its log stays.
    with open(os.path.join(cache, f"build-{key[:16]}.log"), "w") as log:
        say("bootstrapping Debian 12 (mmdebstrap, minbase + kernel + imgkit's tools)")
        origin = _mmdebstrap(root, debs, env, refresh, log)
        say(f"packages came from the {'package cache (offline)' if origin == 'cache' else 'Debian mirror'}")
    if origin == "mirror":
        _index_debs(debs, env)
    say("installing imgkit's Python dependencies (pinned wheels)")
    _install_wheels(root, wheels, env)
    kernels = glob.glob(os.path.join(root, "boot", "vmlinuz-*"))
    if len(kernels) != 1:
        raise OperationFailed(f"expected one kernel in the rescue root, found {len(kernels)}")
    shutil.copyfile(kernels[0], os.path.join(out_dir, "vmlinuz"))
    say("writing the initramfs")
    init = resources.files(__package__).joinpath("files", "init").read_text()
    with open(os.path.join(out_dir, "initrd.gz"), "wb") as f:
        f.write(build_initramfs(root, key[:16], init, epoch))
    with open(os.path.join(out_dir, "packages.txt"), "w") as f:
        f.write(subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f",
                                "${Package} ${Version}\n"], capture_output=True, text=True).stdout)
    _make_reproducible(root)
    say("squashing the system (zstd)")
    _run(["mksquashfs", root, os.path.join(out_dir, "system.squashfs"), *SQUASHFS_OPTIONS], env, "mksquashfs")
    shutil.rmtree(root)
    with open(os.path.join(out_dir, "build-id"), "w") as f:
        f.write(key[:16] + "\n")
    return {"key": key, "origin": origin}
