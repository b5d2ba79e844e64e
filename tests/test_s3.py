"""Images in S3 (radosgw of a real single-node Ceph): capture by multipart upload, reads by ranged
GET of whole chunks, and the failure cases: an interrupted upload, a damaged object."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from ceph_fixtures import bucket, ceph  # noqa: F401 (fixtures)
from conftest import assert_one_line_error, pattern_bytes, run_imgkit

import imgkit
from imgkit.errors import Interrupted
from imgkit.formats import imgk_layout as L
from imgkit.formats.imgk_reader import ImageReader
from imgkit.remote import s3
from imgkit.formats.sources import RawSource

MiB = 1 << 20


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    """A 40 MiB disk: patterned data, a zero stretch, incompressible data at the end."""
    d = tmp_path_factory.mktemp("s3disk")
    data = bytearray(pattern_bytes(40 * MiB, seed=19))
    data[12 * MiB:20 * MiB] = bytes(8 * MiB)
    data[-5 * MiB:] = os.urandom(5 * MiB)
    path = d / "disk.raw"
    path.write_bytes(bytes(data))
    return path


def objects(bucket: str) -> list[str]:
    return [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


def uploads(bucket: str) -> list[str]:
    return [u["Key"] for u in s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


@pytest.mark.parametrize("split", [None, "9M"])
def test_capture_to_s3_and_restore_byte_identical(disk, bucket, tmp_path, split):
    url = f"s3://{bucket}/web1/mon.imgk"
    args = ["capture", disk, url, "--sector-by-sector", "--json"] + (["--split-size", split] if split else [])
    doc = json.loads(run_imgkit(*args, check=True).stdout)
    want = [url] if not split else [url] + [f"{url}.{n:03d}" for n in range(2, len(doc["volumes"]) + 1)]
    assert doc["volumes"] == want and (len(want) > 1) == bool(split)
    assert sorted(objects(bucket)) == sorted(k.split("/", 3)[3] for k in want)
    assert uploads(bucket) == []
    info = json.loads(run_imgkit("info", url, "--json", check=True).stdout)
    assert info["format"] == "imgk" and info["virtual_size"] == disk.stat().st_size
    assert [v["path"] for v in info["volumes"]] == want
    run_imgkit("verify", url, check=True)
    out = tmp_path / "restored.raw"
    out.write_bytes(b"an older file, replaced")
    run_imgkit("restore", url, out, "--yes", "--verify", check=True)  # --verify: a second pass in order
    assert out.read_bytes() == disk.read_bytes()


def test_encrypted_image_in_s3(disk, bucket, tmp_path):
    url = f"s3://{bucket}/enc.imgk"
    pw = tmp_path / "pw"
    pw.write_text("correct horse\n")
    run_imgkit("capture", disk, url, "--sector-by-sector", "--encrypt", "--password-file", pw, check=True)
    out = tmp_path / "r.raw"
    run_imgkit("restore", url, out, "--yes", "--password-file", pw, check=True)
    assert out.read_bytes() == disk.read_bytes()


def test_existing_object_not_replaced_without_force(disk, bucket):
    url = f"s3://{bucket}/x.imgk"
    run_imgkit("capture", disk, url, "--sector-by-sector", check=True)
    etag = s3.client().head_object(Bucket=bucket, Key="x.imgk")["ETag"]
    proc = run_imgkit("capture", disk, url, "--sector-by-sector")
    assert_one_line_error(proc, 3, "already exists", "--force")
    assert s3.client().head_object(Bucket=bucket, Key="x.imgk")["ETag"] == etag
    run_imgkit("capture", disk, url, "--sector-by-sector", "--force", check=True)
    assert s3.client().head_object(Bucket=bucket, Key="x.imgk")["ETag"] != etag


class FailingSource(RawSource):
    """The disk file, until `after` bytes have been read: then the failure (a dying disk, Ctrl-C)."""

    def __init__(self, path, after: int, error: BaseException):
        super().__init__(path)
        self.after, self.error, self.seen = after, error, 0

    def read(self, offset, length):
        self.seen += length
        if self.seen > self.after:
            raise self.error
        return super().read(offset, length)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(5, "Input/output error")])
def test_interrupted_upload_leaves_no_object(disk, bucket, error):
    from imgkit.operations.capture import capture_stream
    url = f"s3://{bucket}/cut.imgk"
    src = FailingSource(str(disk), 30 * MiB, error)  # after several 8 MiB parts went up
    with pytest.raises(Interrupted if isinstance(error, KeyboardInterrupt) else OSError):
        capture_stream(src, url, source_info={"path": str(disk)}, level=1, workers=2)
    src.close()
    assert objects(bucket) == []
    assert uploads(bucket) == []  # aborted: the parts already stored are freed too


def test_part_damaged_in_transit_is_refused_by_the_service(disk, bucket, monkeypatch):
    """The service's checksum of every part is the signed SHA-256 of its body (s3.new_client): a
    body changed after it was signed, as by a fault on the way, is refused by radosgw itself, the
    capture fails and the upload is aborted, so nothing is stored."""
    from imgkit.errors import ImgkitError
    from imgkit.operations.capture import capture_stream
    damaged = []

    def damage(request, **kwargs):
        if not damaged:
            body = request.body.getvalue()
            request.body = io.BytesIO(bytes([body[0] ^ 1]) + body[1:])
            damaged.append(len(body))

    client = s3.new_client()
    client.meta.events.register_first("before-send.s3.UploadPart", damage)
    monkeypatch.setattr(s3, "_client", client)
    url = f"s3://{bucket}/damaged-in-transit.imgk"
    with pytest.raises(ImgkitError, match="XAmzContentSHA256Mismatch"):
        capture_stream(RawSource(str(disk)), url, source_info={"path": str(disk)}, level=1, workers=2)
    assert damaged  # the fault happened, and was caught by the service, not by imgkit
    assert objects(bucket) == [] and uploads(bucket) == []


def test_killed_upload_is_no_object_and_is_cleaned(bucket):
    """A capture killed outright cannot abort its upload: still no object, and the leftover upload
    is listed and aborted by abort_incomplete_uploads (`imgkit s3-cleanup`)."""
    code = (f"import os, sys; from imgkit.remote import s3\n"
            f"sink = s3.MultipartSink('s3://{bucket}/killed.imgk')\n"
            f"sink.write(os.urandom(20 << 20))\n"
            f"[f.result() for f in sink._futures]\n"
            f"os._exit(9)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert objects(bucket) == []
    assert uploads(bucket) == ["killed.imgk"]
    cleaned = run_imgkit("s3-cleanup", f"s3://{bucket}/", "--json", check=True)
    assert json.loads(cleaned.stdout)["aborted"] == ["killed.imgk"]
    assert uploads(bucket) == []


def test_damaged_object_named_by_chunk(disk, bucket, tmp_path):
    url = f"s3://{bucket}/dmg.imgk"
    run_imgkit("capture", disk, url, "--sector-by-sector", check=True)
    with ImageReader(url) as img:
        i = 15  # a patterned data chunk (MiB 30-31)
        e = img.index[i]
        assert e.kind == L.KIND_DATA
        where, size = e.offset + e.stored_length // 2, img.chunk_size
    raw = bytearray(s3.client().get_object(Bucket=bucket, Key="dmg.imgk")["Body"].read())
    raw[where] ^= 0x40
    s3.client().put_object(Bucket=bucket, Key="dmg.imgk", Body=bytes(raw))
    proc = run_imgkit("verify", url, "--json")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert [b["offset"] for b in report["bad"]] == [i * size]
    proc = run_imgkit("restore", url, tmp_path / "r.raw", "--yes")
    assert_one_line_error(proc, 3, f"offset {i * size}")
    assert not (tmp_path / "r.raw").exists()


def test_reads_only_the_chunks_needed(disk, bucket):
    """Opening reads header, trailer, directory and sections in two GETs (one block at each end of
    the object); a read then GETs only its chunk, and a whole-image read GETs each stored chunk
    once, in whole-chunk ranges of at least MIN_GET bytes (a chunk inside an earlier block: none)."""
    url = f"s3://{bucket}/ranged.imgk"
    imgkit.capture(str(disk), url, sector_by_sector=True)
    with ImageReader(url) as img:
        src = img._fds[0]
        opened, opened_bytes = src.requests, src.bytes_read
        assert opened == 2 and opened_bytes == 2 * s3.MIN_GET
        data = img.read(33 * MiB + 5, 100)
        assert data == disk.read_bytes()[33 * MiB + 5:33 * MiB + 105]
        assert src.requests == opened + 1
        assert src.bytes_read - opened_bytes < img.chunk_size  # one stored chunk (compressed)
        data = [e for e in img.index if e.kind == L.KIND_DATA]
        before, before_bytes = src.requests, src.bytes_read
        whole = b"".join(img.read(off, img.chunk_size) for off in range(0, img.size, img.chunk_size))
        assert whole == disk.read_bytes()
        assert 0 < src.requests - before <= len(data)  # zero chunks cost no request
        assert src.bytes_read - before_bytes <= sum(max(e.stored_length, s3.MIN_GET) for e in data)


def test_sequential_pass_fetches_each_byte_once_in_windows(disk, bucket, monkeypatch):
    """After read_sequentially (restore, verify, convert) the object is fetched in windows ahead of
    the reads: one GET a window, no byte twice, and a window read through is dropped at once, so
    memory stays bounded. A reader that did not ask (a mount) still GETs only its chunks (above)."""
    monkeypatch.setattr(s3, "WINDOW", 1 * MiB)  # many windows from a small image
    monkeypatch.setattr(s3, "AHEAD", 2)
    monkeypatch.setattr(s3, "MAX_WINDOWS", 4)
    url = f"s3://{bucket}/windows.imgk"
    imgkit.capture(str(disk), url, sector_by_sector=True)
    with ImageReader(url) as img:
        src = img._fds[0]
        opened, opened_bytes = src.requests, src.bytes_read
        img.read_sequentially()
        held = []
        parts = []
        for off in range(0, img.size, img.chunk_size):
            parts.append(img.read(off, img.chunk_size))
            held.append(sum(isinstance(d, tuple) for d in src._windows.values()))
        assert b"".join(parts) == disk.read_bytes()
        windows = -(-src.size // s3.WINDOW)
        assert windows >= 6 and src.windows_fetched == src.requests - opened
        assert src.requests - opened <= windows and src.bytes_read - opened_bytes <= src.size
        assert max(held) <= s3.MAX_WINDOWS and src.peak_windows <= s3.MAX_WINDOWS
        # Read through and dropped: the windows begin after the header (read at open, not in the
        # pass), so the first is read through too; only the last is left (it holds the directory).
        assert len(src._windows) <= 1
        # A second pass (restore --verify) fetches ahead again, each window once more at most.
        before = src.requests
        img.read_sequentially()
        again = b"".join(img.read(off, img.chunk_size) for off in range(0, img.size, img.chunk_size))
        assert again == disk.read_bytes() and 0 < src.requests - before <= windows


def test_sequential_pass_over_split_volumes_keeps_no_windows_behind(disk, bucket, monkeypatch):
    """A pass over a split image reads each volume object in turn: a volume it has left holds no
    window any more (its windows begin after its header and are read through), so memory does not
    grow with the number of volumes."""
    monkeypatch.setattr(s3, "WINDOW", 1 * MiB)
    url = f"s3://{bucket}/split-windows.imgk"
    imgkit.capture(str(disk), url, sector_by_sector=True, split_size=6 * MiB)
    with ImageReader(url) as img:
        assert len(img._fds) >= 3
        img.read_sequentially()
        whole = b"".join(img.read(off, img.chunk_size) for off in range(0, img.size, img.chunk_size))
        assert whole == disk.read_bytes()
        assert [len(v._windows) for v in img._fds[:-1]] == [0] * (len(img._fds) - 1)
        assert len(img._fds[-1]._windows) <= 1  # the last window of the last volume: the directory


def test_ranged_get_answered_with_other_bytes_is_refused(disk, bucket, monkeypatch):
    """A service (or proxy) that ignores Range sends the whole object: the reader refuses the answer
    by its length before reading its body, instead of holding the object in memory or handing out
    bytes from the wrong offset. radosgw honours Range, so the request is sent without it."""
    from imgkit.errors import BadImage
    url = f"s3://{bucket}/no-range.imgk"
    imgkit.capture(str(disk), url, sector_by_sector=True)
    client = s3.new_client()
    client.meta.events.register("before-parameter-build.s3.GetObject",
                                lambda params, **kwargs: params.pop("Range", None))
    monkeypatch.setattr(s3, "_client", client)
    with pytest.raises(BadImage, match=r"answered a GET of \d+ bytes .* with \d+ bytes"):
        ImageReader(url)


def test_missing_object_and_bad_url_are_one_line_errors(ceph, bucket):
    assert_one_line_error(run_imgkit("info", f"s3://{bucket}/nothing.imgk"), 3, "no such")
    assert_one_line_error(run_imgkit("info", "s3://ab/x.imgk"), 3, "bucket name")
    assert_one_line_error(run_imgkit("info", f"s3://{bucket}/"), 3, "no object key")
    proc = run_imgkit("info", f"s3://{bucket}/x.imgk", env={"AWS_SECRET_ACCESS_KEY": "wrong"})
    assert_one_line_error(proc, 3, "access denied")


@pytest.mark.fuse
def test_mount_from_s3(disk, bucket, tmp_path):
    url = f"s3://{bucket}/m.imgk"
    run_imgkit("capture", disk, url, "--sector-by-sector", "--split-size", "12M", check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_imgkit("mount", url, mnt, check=True)
    try:
        assert (mnt / "disk.raw").read_bytes() == disk.read_bytes()
        assert json.loads((mnt / "info.json").read_text())["path"] == url
    finally:
        run_imgkit("umount", mnt, check=True)


@pytest.mark.qemu
def test_boot_check_from_s3(tiny_bios_image, bucket):
    url = f"s3://{bucket}/tiny.imgk"
    run_imgkit("capture", tiny_bios_image, url, check=True)
    proc = run_imgkit("boot-check", url, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["passed"] is True


def test_many_parts_in_flight_arrive_in_order(bucket):
    """Parts finish out of order with 8 uploaders: the object must still be the bytes written, in
    order (small writes, as the image writer makes them)."""
    data = os.urandom(3 * MiB) * 20 + os.urandom(777)  # 60 MiB: 12 parts of 5 MiB
    sink = s3.MultipartSink(f"s3://{bucket}/parts.bin", part_size=5 * MiB)
    for pos in range(0, len(data), 300_000):
        sink.write(data[pos:pos + 300_000])
    sink.pwrite_head(b"HEAD", 0)
    sink.complete()
    got = s3.client().get_object(Bucket=bucket, Key="parts.bin")["Body"].read()
    assert got == b"HEAD" + data[4:]


def test_incremental_chain_across_objects(disk, bucket, tmp_path):
    """capture --base s3://.../mon.imgk: the child in S3 stores only what changed, and reads (restore)
    resolve its parent as the object beside it."""
    mon = f"s3://{bucket}/web1/mon.imgk"
    tue = f"s3://{bucket}/web1/tue.imgk"
    run_imgkit("capture", disk, mon, "--sector-by-sector", check=True)
    changed = bytearray(disk.read_bytes())
    changed[3 * MiB:3 * MiB + 4096] = os.urandom(4096)
    disk2 = tmp_path / "tue.raw"
    disk2.write_bytes(bytes(changed))
    doc = json.loads(run_imgkit("capture", disk2, tue, "--sector-by-sector", "--base", mon, "--json",
                                check=True).stdout)
    assert doc["stored_size"] < 3 * MiB  # one changed chunk, not the whole disk
    out = tmp_path / "r.raw"
    run_imgkit("restore", tue, out, "--yes", check=True)
    assert out.read_bytes() == bytes(changed)
    s3.client().delete_object(Bucket=bucket, Key="web1/mon.imgk")
    assert_one_line_error(run_imgkit("info", tue), 3, "parent", "missing")


def test_endpoint_url_option_overrides_the_environment(ceph, disk, bucket):
    url = f"s3://{bucket}/ep.imgk"
    run_imgkit("capture", disk, url, "--sector-by-sector", check=True)
    wrong = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}  # nothing listens there
    assert_one_line_error(run_imgkit("info", url, env=wrong), 3, "cannot reach")
    proc = run_imgkit("--endpoint-url", ceph.s3_endpoint, "info", url, "--json", env=wrong, check=True)
    assert json.loads(proc.stdout)["path"] == url
