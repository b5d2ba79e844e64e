"""The rescue ISO's imgkit layer: this checkout's imgkit package, its console and init files, and the
job runner, as a small squashfs stacked over the system layer. It changes with every commit of
imgkit, so it is kept apart from the system layer and costs seconds to rebuild.

Paths go under usr/ (Debian 12 is merged-/usr: a top-level bin/ or sbin/ here would hide the
system's bin -> usr/bin symlink in the overlay)."""
from __future__ import annotations

import hashlib
import os
import shutil
from importlib import metadata, resources

import imgkit

RESCUE_FILES = "/usr/lib/imgkit-rescue"
SCRIPTS = ("sysinit", "console", "banner", "run-job", "shutdown")
BUSYBOX_LINKS = ("init", "poweroff", "reboot", "halt")
JOB_DOC = """imgkit rescue: unattended jobs
==============================

At boot, the rescue system looks for a filesystem labelled IMGKIT (FAT, exFAT, ext4, NTFS...). If it
has a file imgkit-job.conf at its root, the job runs; otherwise nothing is mounted or written.
Kernel parameters imgkit.KEY=VALUE set or override the same keys; imgkit.nojob disables jobs.

    # imgkit-job.conf
    action = capture          # capture | restore
    source = /dev/sda         # capture: the disk to read ("auto": the only disk that is neither
                              #   the IMGKIT disk nor the boot medium)
    target = /dev/sda         # restore: the disk to overwrite ("auto" as above)
    image  = images/pc1.imgk  # on the IMGKIT filesystem
    level  = 3                # capture: zstd level (optional)
    overwrite = no            # capture: replace an existing image (default no)
    verify = no               # verify the image after capture / the disk after restore
    after  = poweroff         # poweroff | reboot | shell (after success)
    on_error = shell          # poweroff | reboot | shell (after a failure: stay to show it)

The log goes next to the image: IMAGE.capture.log or IMAGE.restore.log. imgkit's own safety rules
apply (a mounted source or target is refused); the IMGKIT disk and the boot medium are never a source
or target.
"""


def imgkit_version() -> str:
    try:
        return metadata.version("imgkit")
    except metadata.PackageNotFoundError:
        return "unknown"


def _copy_package(dst: str) -> None:
    src = os.path.dirname(os.path.abspath(imgkit.__file__))
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "testing"))


def layer_digest() -> str:
    """A hash of everything the layer is made of (the test cache's key part for imgkit)."""
    h = hashlib.sha256(imgkit_version().encode())
    src = os.path.dirname(os.path.abspath(imgkit.__file__))
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "testing"))
        for name in sorted(filenames):
            if name.endswith(".pyc"):
                continue
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                h.update(os.path.relpath(full, src).encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()


def build_layer_tree(root: str, build_id: str) -> None:
    """Fills `root` (an empty directory) with the layer's files."""
    version = imgkit_version()
    lib = os.path.join(root, "opt", "imgkit", "lib")
    os.makedirs(lib)
    _copy_package(os.path.join(lib, "imgkit"))
    info = os.path.join(lib, f"imgkit-{version}.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: imgkit\nVersion: {version}\n")
    with open(os.path.join(info, "entry_points.txt"), "w") as f:
        f.write("[console_scripts]\nimgkit = imgkit.cli.main:main\n")
    files = resources.files(__package__).joinpath("files")
    rescue = os.path.join(root, RESCUE_FILES.lstrip("/"))
    os.makedirs(rescue)
    for name in SCRIPTS:
        _write(os.path.join(rescue, name), files.joinpath(name).read_text(), 0o755)
    _write(os.path.join(root, "etc", "inittab"), files.joinpath("inittab").read_text())
    _write(os.path.join(root, "etc", "hostname"), "imgkit-rescue\n")
    _write(os.path.join(root, "etc", "imgkit-rescue-release"),
           f"IMGKIT_VERSION={version}\nIMGKIT_RESCUE_BUILD_ID={build_id}\n")
    _write(os.path.join(root, "usr", "local", "bin", "imgkit"),
           "#!/usr/bin/python3\nimport sys\nfrom imgkit.cli.main import main\nsys.exit(main())\n", 0o755)
    _write(os.path.join(root, "usr", "share", "doc", "imgkit-rescue", "README"), JOB_DOC)
    sbin = os.path.join(root, "usr", "sbin")
    os.makedirs(sbin, exist_ok=True)
    for name in BUSYBOX_LINKS:
        os.symlink("/bin/busybox", os.path.join(sbin, name))
    _write(os.path.join(root, "root", ".bashrc"),
           "PS1='imgkit-rescue:\\w# '\nalias ll='ls -l'\n", 0o644)
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                os.chmod(full, 0o755 if os.stat(full).st_mode & 0o100 else 0o644)
    os.chmod(os.path.join(root, "root"), 0o700)


def _write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
