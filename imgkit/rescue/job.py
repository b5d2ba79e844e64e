"""The rescue system's unattended job (runs inside the booted ISO, from busybox init, once).

A job comes from imgkit-job.conf at the root of a filesystem labelled IMGKIT and/or from kernel
parameters imgkit.KEY=VALUE (see layer.JOB_DOC). Without one, nothing is mounted or written: the
IMGKIT filesystem is looked at read-only and unmounted again. With one, imgkit capture or restore
runs with its usual safety rules plus two of its own (the IMGKIT disk and the boot medium are never a
source or target), the log goes next to the image, and the machine powers off (or stays on to show
a failure). The console shows "IMGKIT-JOB-DONE rc=N" at the end, which tests wait for."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

LABEL = "IMGKIT"
JOB_FILE = "imgkit-job.conf"
MOUNT = "/run/imgkit/disk"
STATE = "/run/imgkit/job.state"
MAX_JOB_FILE = 64 << 10
KEYS = {"action", "source", "target", "image", "level", "overwrite", "verify", "after", "on_error"}
ACTIONS = {"capture", "restore"}
AFTER = {"poweroff", "reboot", "shell"}
FIND_SECONDS = 8          # USB sticks announce themselves late


class JobError(Exception):
    pass


def say(text: str) -> None:
    line = f"imgkit-job: {text}\n"
    sys.stdout.write(line)
    sys.stdout.flush()
    try:
        with open("/dev/tty1", "w") as tty:
            tty.write(line)
    except OSError:
        pass


def parse_job(text: str) -> dict[str, str]:
    """KEY = VALUE lines; '#' starts a comment. Unknown keys are an error (a typo must not turn a
    restore into something else)."""
    job = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or key not in KEYS:
            raise JobError(f"{JOB_FILE} line {n}: expected one of {', '.join(sorted(KEYS))} = value")
        job[key] = value
    return job


def cmdline_job(cmdline: str) -> tuple[dict[str, str], bool]:
    """imgkit.KEY=VALUE parameters, and whether imgkit.nojob was given."""
    job, nojob = {}, False
    for word in shlex.split(cmdline):
        if word == "imgkit.nojob":
            nojob = True
        elif word.startswith("imgkit.") and "=" in word:
            key, value = word[len("imgkit."):].split("=", 1)
            if key not in KEYS:
                raise JobError(f"kernel parameter imgkit.{key}: unknown key")
            job[key] = value
    return job, nojob


def _blkid(*args: str) -> list[str]:
    out = subprocess.run(["blkid", *args], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def find_imgkit_device(wait: float) -> str | None:
    deadline = time.monotonic() + wait
    while True:
        devs = _blkid("-t", f"LABEL={LABEL}", "-o", "device")
        if len(devs) > 1:
            raise JobError(f"several filesystems are labelled {LABEL} ({', '.join(devs)}): refusing to guess")
        if devs or time.monotonic() >= deadline:
            return devs[0] if devs else None
        time.sleep(1)


def disk_of(dev: str) -> str:
    """The whole disk a block device belongs to (/dev/sdb1 -> sdb, /dev/sdb -> sdb)."""
    name = os.path.basename(os.path.realpath(dev))
    if os.path.exists(f"/sys/class/block/{name}/partition"):
        return os.path.basename(os.path.dirname(os.path.realpath(f"/sys/class/block/{name}")))
    return name


def boot_medium_disk() -> str | None:
    try:
        with open("/run/live/medium-device") as f:
            return disk_of("/dev/" + f.read().strip())
    except OSError:
        return None


def internal_disks(excluded: set[str]) -> list[str]:
    disks = []
    for name in sorted(os.listdir("/sys/block")):
        if name.startswith(("loop", "ram", "sr", "zram", "fd")) or name in excluded:
            continue
        try:
            with open(f"/sys/block/{name}/size") as f:
                if int(f.read()) == 0:
                    continue
        except OSError:
            continue
        disks.append(name)
    return disks


def resolve_disk(value: str, role: str, excluded: set[str]) -> str:
    if value == "auto":
        disks = internal_disks(excluded)
        if len(disks) != 1:
            raise JobError(f"{role} = auto needs exactly one other disk, found {len(disks)}: "
                           f"{', '.join(disks) or 'none'}; name it (e.g. {role} = /dev/sda)")
        return "/dev/" + disks[0]
    if not value.startswith("/dev/") or not os.path.exists(value):
        raise JobError(f"{role} {value!r} is not a device of this machine")
    if disk_of(value) in excluded:
        raise JobError(f"{role} {value} is the IMGKIT disk or the boot medium: refused")
    return value


def image_path(value: str) -> str:
    rel = os.path.normpath(value.lstrip("/"))
    if not value or rel.startswith("..") or rel == ".":
        raise JobError(f"image {value!r} must be a path inside the IMGKIT filesystem")
    return os.path.join(MOUNT, rel)


def _check_inside(image: str) -> None:
    """The image's directory, symlinks resolved, must still be on the IMGKIT filesystem (an ext4
    stick could carry images -> /dev)."""
    parent = os.path.dirname(image)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    real = os.path.realpath(parent)
    if real != MOUNT and not real.startswith(MOUNT + "/"):
        raise JobError(f"the image's directory leads out of the {LABEL} filesystem (to {real}): refused")


def plan(job: dict[str, str], imgkit_dev: str) -> tuple[list[list[str]], str, str]:
    """The imgkit commands of a job, the log path and the image path."""
    action = job.get("action", "")
    if action not in ACTIONS:
        raise JobError(f"action {action!r}: expected capture or restore")
    excluded = {disk_of(imgkit_dev)} | ({boot_medium_disk()} - {None})
    image = image_path(job.get("image", ""))
    verify = job.get("verify", "no").lower() in ("yes", "true", "1")
    if action == "capture":
        source = resolve_disk(job.get("source", ""), "source", excluded)
        cmd = ["imgkit", "capture", source, image, "--progress", "none"]
        if job.get("level"):
            cmd += ["--level", str(int(job["level"]))]
        if job.get("overwrite", "no").lower() in ("yes", "true", "1"):
            cmd.append("--force")
        cmds = [cmd] + ([["imgkit", "verify", image, "--progress", "none"]] if verify else [])
    else:
        target = resolve_disk(job.get("target", ""), "target", excluded)
        if not os.path.isfile(image):
            raise JobError(f"image {job['image']} not found on the IMGKIT disk")
        cmds = [["imgkit", "restore", image, target, "--yes", "--progress", "none"]
                + (["--verify"] if verify else [])]
    return cmds, f"{image}.{action}.log", image


def _finish(what: str) -> None:
    if what == "shell":
        return
    subprocess.run(["sync"])
    os.execv("/bin/busybox", ["busybox", what])


def _state(text: str) -> None:
    os.makedirs(os.path.dirname(STATE), exist_ok=True)
    with open(STATE, "w") as f:
        f.write(text + "\n")


def run() -> int:
    with open("/proc/cmdline") as f:
        kjob, nojob = cmdline_job(f.read())
    if nojob:
        say("imgkit.nojob: jobs disabled")
        return 0
    dev = find_imgkit_device(FIND_SECONDS)
    if dev is None:
        if kjob:
            raise JobError(f"kernel parameters ask for a job but no filesystem is labelled {LABEL}")
        say(f"no filesystem labelled {LABEL}: no job, nothing mounted")
        return 0
    os.makedirs(MOUNT, exist_ok=True)
    if subprocess.run(["mount", "-o", "ro", dev, MOUNT]).returncode != 0:
        raise JobError(f"cannot mount {dev} (the {LABEL} filesystem)")
    try:
        path = os.path.join(MOUNT, JOB_FILE)
        job = {}
        if os.path.isfile(path):
            if os.path.getsize(path) > MAX_JOB_FILE:
                raise JobError(f"{JOB_FILE} is larger than {MAX_JOB_FILE >> 10} KiB")
            with open(path, encoding="utf-8", errors="replace") as f:
                job = parse_job(f.read())
        job.update(kjob)
        if not job:
            say(f"{dev} is labelled {LABEL} but has no {JOB_FILE}: no job")
            return 0
        _state(f"running {job.get('action')} ({dev})")
        cmds, log_path, image = plan(job, dev)
        for value, allowed in ((job.get("after", "poweroff"), AFTER), (job.get("on_error", "shell"), AFTER)):
            if value not in allowed:
                raise JobError(f"after/on_error {value!r}: expected poweroff, reboot or shell")
        if subprocess.run(["mount", "-o", "remount,rw", dev, MOUNT]).returncode != 0:
            raise JobError(f"cannot mount {dev} read-write")
        _check_inside(image)
        os.makedirs(os.path.dirname(image), exist_ok=True)
        rc = _run_logged(cmds, log_path, dev)
    finally:
        subprocess.run(["sync"])
        subprocess.run(["umount", MOUNT])
    _state(f"{job.get('action')} {'succeeded' if rc == 0 else f'FAILED (exit {rc})'}; log next to the image")
    say(f"IMGKIT-JOB-DONE rc={rc}")
    _finish(job.get("after", "poweroff") if rc == 0 else job.get("on_error", "shell"))
    return rc


def _run_logged(cmds: list[list[str]], log_path: str, dev: str) -> int:
    with open(log_path, "a") as log:
        def both(text: str) -> None:
            log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {text}\n")
            log.flush()
            say(text)
        both(f"imgkit rescue job on {os.uname().nodename}, {LABEL} disk {dev}")
        for cmd in cmds:
            both("$ " + " ".join(shlex.quote(c) for c in cmd))
            started = time.monotonic()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                both(line.rstrip("\n"))
            rc = proc.wait()
            both(f"exit {rc} after {time.monotonic() - started:.1f} s")
            if rc != 0:
                return rc
        os.fsync(log.fileno())
    return 0


def main() -> int:
    try:
        return run()
    except JobError as e:
        _state(f"refused: {e}")
        say(f"error: {e}")
        say("IMGKIT-JOB-DONE rc=3")
        return 3


if __name__ == "__main__":
    sys.exit(main())
