"""restore --shrink without the libguestfs appliance (shrink_host.py) and the sandbox its resizers run
in (sandbox.py). The sandbox is checked from the inside with a real confined process: it cannot read
a host file, reach a host TCP listener, write to /usr, or outlive its CPU limit. The host path is
checked end to end: a GPT disk with ext4 and NTFS shrunk onto half, the report says no appliance was
launched, each filesystem passes its own check and every file's sha256 matches."""
import hashlib
import json
import os
import re
import socket
import subprocess

import pytest

from conftest import run_imgkit

from imgkit.errors import OperationFailed
from imgkit.platform.qemu_tools import Limits
from imgkit.platform.sandbox import run_confined

MIB = 1 << 20
PROBE = r"""
import os, socket, sys
secret, port = sys.argv[1], int(sys.argv[2])
try:
    open(secret).read(); print("read-secret")
except OSError:
    print("no-secret")
try:
    socket.create_connection(("127.0.0.1", port), timeout=2); print("connected")
except OSError:
    print("no-network")
try:
    open("/usr/imgkit-probe", "w"); print("wrote-usr")
except OSError:
    print("usr-read-only")
print("etc" if os.path.exists("/etc/passwd") else "no-etc")
with open("/fs/part", "r+b") as f:
    f.write(b"written-inside")
print("part-written")
"""


def sh(*argv, **kw):
    return subprocess.run([str(a) for a in argv], capture_output=True, **kw)


def test_sandbox_sees_only_its_file(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("host data")
    part = tmp_path / "part.raw"
    part.write_bytes(bytes(64))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        port = listener.getsockname()[1]
        out = run_confined(["python3", "-c", PROBE, str(secret), str(port)], {"part": str(part)},
                           Limits(30, 1 << 30, 60), "probe").stdout.split()
    finally:
        listener.close()
    assert out == ["no-secret", "no-network", "usr-read-only", "no-etc", "part-written"]
    assert part.read_bytes().startswith(b"written-inside")  # the one writable file is the real one


def test_sandbox_cpu_limit_and_exit_status(tmp_path):
    with pytest.raises(OperationFailed, match="limit reached"):
        run_confined(["python3", "-c", "while True: pass"], {}, Limits(1, 1 << 30, 60), "spinner")
    with pytest.raises(OperationFailed, match="spinner failed: boom"):
        run_confined(["python3", "-c", "import sys; sys.exit('boom')"], {}, Limits(5, 1 << 30, 60), "spinner")


def _gpt_ext4_ntfs(tmp_path):
    """A 256 MiB GPT disk: ext4 (150 MiB, ~30 MiB of files) and NTFS (the rest, one 12 MiB file)."""
    disk = tmp_path / "disk.raw"
    size = 256 * MIB
    with open(disk, "wb") as f:
        f.truncate(size)
    p1, p2_start = 150 * MIB, 151 * MIB
    p2 = size - p2_start - MIB
    sh("sfdisk", disk, check=True, input=f"label: gpt\nstart=2048, size={p1 // 512}, type=L\n"
       f"start={p2_start // 512}, size={p2 // 512}, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n".encode())
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    truth = {}
    for i, rel in enumerate(["/a.bin", "/sub/b.bin", "/sub/c.txt"]):
        data = os.urandom((10 * MIB if rel.endswith(".bin") else 1000) + i)
        (tree / rel[1:]).write_bytes(data)
        truth[rel] = hashlib.sha256(data).hexdigest()
    ext, ntfs = tmp_path / "ext.raw", tmp_path / "ntfs.raw"
    for path, n in ((ext, p1), (ntfs, p2)):
        with open(path, "wb") as f:
            f.truncate(n)
    sh("mkfs.ext4", "-q", "-d", tree, ext, check=True)
    sh("mkntfs", "-q", "-F", "-f", ntfs, check=True)
    blob = os.urandom(12 * MIB)
    (tmp_path / "blob").write_bytes(blob)
    sh("ntfscp", "-f", ntfs, tmp_path / "blob", "/data.bin", check=True)
    for part, start in ((ext, MIB), (ntfs, p2_start)):
        sh("dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={start // MIB}", "conv=notrunc", "status=none",
           check=True)
        part.unlink()
    return disk, truth, hashlib.sha256(blob).hexdigest()


def test_ext4_ntfs_shrunk_on_host_without_appliance(tmp_path):
    disk, truth, blob_sha = _gpt_ext4_ntfs(tmp_path)
    img = tmp_path / "disk.imgk"
    run_imgkit("capture", disk, img, "--progress", "none", check=True)
    target = tmp_path / "half.raw"
    with open(target, "wb") as f:
        f.truncate(128 * MIB)
    proc = run_imgkit("restore", img, target, "--yes", "--shrink", "--json", "--progress", "none", check=True)
    doc = json.loads(proc.stdout)["shrink"]
    assert doc["engine"] == "host"
    assert all(p["shrinks"] for p in doc["plan"]["partitions"])
    assert set(doc["minimums"]) == {"1", "2"} or set(doc["minimums"]) == {1, 2}  # measured by the real tools
    assert "No problems found" in sh("sgdisk", "-v", target, text=True).stdout
    parts = json.loads(sh("sfdisk", "-J", target, check=True).stdout)["partitiontable"]["partitions"]
    assert len(parts) == 2 and all(p["start"] % 2048 == 0 for p in parts)
    with open(target, "rb") as f:
        for n, p in enumerate(parts, 1):
            f.seek(p["start"] * 512)
            (tmp_path / f"p{n}").write_bytes(f.read(p["size"] * 512))
    p1, p2 = tmp_path / "p1", tmp_path / "p2"
    check = sh("e2fsck", "-f", "-n", p1, text=True)
    assert check.returncode == 0, check.stdout
    dump = tmp_path / "dump"
    dump.mkdir()
    sh("debugfs", "-R", f"rdump / {dump}", p1, check=True)
    got = {rel: hashlib.sha256((dump / rel[1:]).read_bytes()).hexdigest() for rel in truth}
    assert got == truth
    check = sh("ntfsfix", "-n", p2, text=True)
    assert check.returncode == 0, check.stdout
    info = sh("ntfsresize", "--info", "--force", "--no-progress-bar", p2, text=True)
    assert info.returncode == 0, info.stdout
    volume = int(re.search(r"Current volume size: (\d+) bytes", info.stdout).group(1))
    assert volume <= parts[1]["size"] * 512 < 100 * MIB  # ntfsresize really shrank the volume
    data = sh("ntfscat", "-f", p2, "/data.bin", check=True).stdout
    assert hashlib.sha256(data).hexdigest() == blob_sha
    # the source image is unchanged: restoring it whole gives back the captured disk
    same = tmp_path / "same.raw"
    run_imgkit("restore", img, same, "--yes", "--progress", "none", check=True)
    assert sh("cmp", disk, same).returncode == 0


def test_partition_files_failure_leaves_no_mount(tmp_path):
    """qemu-storage-daemon refusing a window (beyond the disk's end) after it exposed another: one
    clear error, and the FUSE mount it left behind is removed (no stale mount over imgkit's files)."""
    from imgkit.views.nbd_export import export_stream
    from imgkit.operations.shrink_host import PartitionFiles
    from imgkit.formats.sources import RawSource
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(4 * MIB))
    overlay = tmp_path / "overlay.qcow2"
    src = RawSource(str(disk))
    try:
        with export_stream(src) as export:
            sh("qemu-img", "create", "-q", "-f", "qcow2", overlay, 4 * MIB, check=True)
            good = [(1, MIB, MIB)]
            with PartitionFiles(str(overlay), export.socket_path, good, str(tmp_path), False) as files:
                assert (tmp_path / "part1.raw").read_bytes() == disk.read_bytes()[MIB:2 * MIB]
                assert files.paths[1] == str(tmp_path / "part1.raw")
            with pytest.raises(OperationFailed, match="could not expose the partitions"):
                with PartitionFiles(str(overlay), export.socket_path, [*good, (2, 3 * MIB, 2 * MIB)],
                                    str(tmp_path), False):
                    pass
    finally:
        src.close()
    with open("/proc/self/mountinfo") as f:
        mounts = f.read()
    assert str(tmp_path) not in mounts


def _blockdevs(argv: list[str], flag: str = "--blockdev") -> list[dict]:
    return [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == flag]


@pytest.mark.parametrize("writable", [False, True])
def test_partition_files_daemon_nodes_come_from_format_node(tmp_path, writable):
    """shrink's qemu-storage-daemon gets explicit drivers at every level, built by the one node
    builder: NBD export (raw, read-only) -> qcow2 overlay with that backing node -> raw windows."""
    from imgkit.formats.qemu_image import format_node, window_node
    from imgkit.operations.shrink_host import PartitionFiles
    overlay, sock = str(tmp_path / "overlay.qcow2"), str(tmp_path / "nbd.sock")
    parts = [(1, 1 * MIB, 4 * MIB)] if writable else [(1, 1 * MIB, 4 * MIB), (2, 5 * MIB, 2 * MIB)]
    argv = PartitionFiles(overlay, sock, parts, str(tmp_path), writable).argv()
    assert argv[0] == "qemu-storage-daemon"
    nodes = _blockdevs(argv)
    assert nodes[0] == format_node(sock, "raw", protocol="nbd", node_name="base")
    assert nodes[0]["read-only"] is True and nodes[0]["file"]["driver"] == "nbd"
    assert nodes[1] == format_node(overlay, "qcow2", node_name="ov", own=True, writable=writable, backing="base")
    assert nodes[1]["driver"] == "qcow2" and nodes[1]["file"] == {"driver": "file", "filename": overlay,
                                                                   "read-only": not writable}
    assert nodes[1]["backing"] == "base" and nodes[1]["read-only"] is (not writable)
    assert nodes[2:] == [window_node(f"p{n}", "ov", start, size, writable=writable) for n, start, size in parts]
    assert all(n["driver"] for n in nodes)
    exports = [argv[i + 1] for i, a in enumerate(argv) if a == "--export"]
    assert [e.split(",")[2] for e in exports] == [f"node-name=p{n}" for n, _, _ in parts]


def test_shrink_overlay_stream_reads_through_its_descriptor(tmp_path):
    """The read-only overlay stream's daemon: the overlay by the descriptor imgkit opened, its
    backing the NBD node, nothing taken from the overlay's header."""
    from imgkit.operations.shrink_fs import overlay_blockdevs
    base, top = _blockdevs(overlay_blockdevs(str(tmp_path / "s.sock"), str(tmp_path / "o.qcow2"), fd=9,
                                             node_name="fmt0"))
    assert base["node-name"] == "base" and base["driver"] == "raw" and base["file"]["driver"] == "nbd"
    assert top == {"driver": "qcow2", "read-only": True, "node-name": "fmt0", "backing": "base",
                   "file": {"driver": "file", "filename": "/proc/self/fd/9", "read-only": True}}


def test_window_node_refuses_a_non_range():
    from imgkit.formats.qemu_image import window_node
    with pytest.raises(ValueError):
        window_node("p1", "ov", 0, 0)
    with pytest.raises(ValueError):
        window_node("p1", "ov", -512, 512)
