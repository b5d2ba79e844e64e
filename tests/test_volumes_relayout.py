"""split / join: re-lay an image out without recompressing or re-encrypting (stored chunks move byte
for byte), written atomically, refusing damage; the restored disk stays byte-identical."""
from __future__ import annotations

import json
import os

import pytest

from imgkit.formats.crypto import ImageKeys, Sealer
from imgkit.formats import imgk_layout as L
from imgkit.formats.imgk_reader import ImageReader
from imgkit.formats.imgk_layout import volume_path

from conftest import assert_one_line_error, run_imgkit
from crypto_volumes_support import (OTHER_PASSWORD, PASSWORD, capture_in_process, copy_image, make_source,
                                     xor_byte)

ENV = {"IMGKIT_PASSWORD": PASSWORD.decode()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("relayout")
    src = d / "disk.raw"
    expected = make_source(str(src), chunks=20)
    enc1 = capture_in_process(str(src), str(d / "enc1.imgk"))                 # one volume, encrypted
    plain1 = capture_in_process(str(src), str(d / "plain1.imgk"), password=None)
    encs = capture_in_process(str(src), str(d / "encs.imgk"), split_size=200 << 10)
    return {"dir": d, "expected": expected, "enc1": enc1, "plain1": plain1, "encs": encs}


def _stored_chunks(path: str, password=PASSWORD) -> dict[int, bytes]:
    with ImageReader(path, (lambda: password) if password else None) as r:
        return {i: r.read_stored(i) for i, e in enumerate(r.index) if e.kind == L.KIND_DATA}


def _restore_bytes(path: str, tmp_path) -> bytes:
    out = tmp_path / "restored.raw"
    run_imgkit("restore", path, out, "--yes", env=ENV, check=True)
    data = out.read_bytes()
    out.unlink()
    return data


def _split(*args):
    return run_imgkit("split", *args, "--json", env=ENV)


@pytest.mark.parametrize("kind", ["enc1", "plain1"])
def test_split_single_volume_image(base, tmp_path, kind):
    """A single-volume image (captured without --split-size) splits; chunks move byte for byte."""
    src = base[kind][0]
    password = PASSWORD if kind.startswith("enc") else None
    out = tmp_path / "s.imgk"
    proc = _split(src, "--split-size", "150K", "-o", out)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert len(doc["volumes"]) >= 3 and all(os.path.getsize(v) <= 150 << 10 for v in doc["volumes"])
    assert _stored_chunks(str(out), password) == _stored_chunks(src, password)
    assert _restore_bytes(str(out), tmp_path) == base["expected"]
    with ImageReader(src, (lambda: password) if password else None) as a, \
            ImageReader(str(out), (lambda: password) if password else None) as b:
        assert a.header.image_id == b.header.image_id and a.header.core_digest() == b.header.core_digest()
        assert a.metadata == b.metadata
        assert [(e.kind, e.object, e.digest, e.encoding) for e in a.index] == \
               [(e.kind, e.object, e.digest, e.encoding) for e in b.index]
        # The dedup of the source (chunk 4 = chunk 1) is kept: one stored copy.
        assert (b.index[4].volume, b.index[4].offset) == (b.index[1].volume, b.index[1].offset)


def test_join_split_encrypted_image(base, tmp_path):
    out = tmp_path / "joined.imgk"
    proc = run_imgkit("join", base["encs"][0], "-o", out, "--json", env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["volumes"] == [str(out)] and not os.path.exists(volume_path(str(out), 2))
    h = L.Header.decode(out.read_bytes()[:L.HEADER_SIZE])
    assert h.volume_count == 1 and not h.required_features & L.FEATURE_MULTI_VOLUME
    assert _stored_chunks(str(out)) == _stored_chunks(base["encs"][0])
    assert _restore_bytes(str(out), tmp_path) == base["expected"]
    assert run_imgkit("verify", out, env=ENV).returncode == 0


def test_resealed_sections_use_fresh_nonces(base, tmp_path):
    """split/join seal a new index under the same section key: the nonce must differ (GCM nonce
    reuse would leak the XOR of both indexes and the authentication key)."""
    out = str(tmp_path / "j.imgk")
    run_imgkit("join", base["encs"][0], "-o", out, env=ENV, check=True)
    nonces = []
    for path in (base["encs"][0], out):
        with ImageReader(path, lambda: PASSWORD) as r:
            last = r.volume_paths[-1]
            with open(last, "rb") as f:
                for s in r.sections:
                    f.seek(s.offset)
                    nonces.append(f.read(L.AEAD_NONCE_SIZE))
    assert len(set(nonces)) == len(nonces)
    sealer = Sealer(ImageKeys.from_data_key(bytes(32), bytes(16)), bytes(32))
    a, b = sealer.seal_section(1, 0, b"same"), sealer.seal_section(1, 0, b"same")
    assert a[:12] != b[:12] and sealer.open_section(1, 0, a) == b"same"


def test_split_and_join_in_place(base, tmp_path):
    vols = copy_image(base["plain1"], str(tmp_path / "p.imgk"))
    run_imgkit("split", vols[0], "--split-size", "150K", check=True)
    now = sorted(p for p in os.listdir(tmp_path) if p.startswith("p.imgk"))
    assert len(now) >= 3 and not [p for p in os.listdir(tmp_path) if "partial" in p]
    assert _restore_bytes(vols[0], tmp_path) == base["expected"]
    run_imgkit("split", vols[0], "--split-size", "300K", check=True)  # fewer volumes: stale ones go
    fewer = sorted(p for p in os.listdir(tmp_path) if p.startswith("p.imgk"))
    assert 1 < len(fewer) < len(now)
    run_imgkit("join", vols[0], check=True)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("p.imgk")) == ["p.imgk"]
    assert _restore_bytes(vols[0], tmp_path) == base["expected"]


def test_existing_output_needs_force(base, tmp_path):
    out = tmp_path / "o.imgk"
    run_imgkit("split", base["encs"][0], "--split-size", "150K", "-o", out, env=ENV, check=True)
    many = len([p for p in os.listdir(tmp_path) if p.startswith("o.imgk")])
    assert many >= 3
    proc = run_imgkit("join", base["encs"][0], "-o", out, env=ENV)
    assert_one_line_error(proc, 3, "already exists", "--force")
    run_imgkit("join", base["encs"][0], "-o", out, "--force", env=ENV, check=True)
    assert [p for p in os.listdir(tmp_path) if p.startswith("o.imgk")] == ["o.imgk"]  # stale volumes gone
    assert _restore_bytes(str(out), tmp_path) == base["expected"]


def test_output_onto_a_source_volume_refused(base, tmp_path):
    vols = copy_image(base["encs"], str(tmp_path / "e.imgk"))
    proc = run_imgkit("join", vols[0], "-o", vols[1], "--force", env=ENV)
    assert_one_line_error(proc, 3, "volume of the image being read")
    assert all(os.path.exists(v) for v in vols)


@pytest.mark.parametrize("command", ["split", "join"])
def test_damaged_source_refused_nothing_written(base, tmp_path, command):
    vols = copy_image(base["encs"], str(tmp_path / "e.imgk"))
    with ImageReader(vols[0], lambda: PASSWORD) as r:
        e = r.index[7]
    xor_byte(volume_path(vols[0], e.volume), e.offset + 5, 0x01)
    out = tmp_path / "out.imgk"
    args = ["--split-size", "150K"] if command == "split" else []
    proc = run_imgkit(command, vols[0], *args, "-o", out, env=ENV)
    assert_one_line_error(proc, 3, f"offset {7 * 65536}")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out.imgk") or "partial" in p]


def test_wrong_password_refused(base, tmp_path):
    proc = run_imgkit("join", base["encs"][0], "-o", tmp_path / "x.imgk",
                      env={"IMGKIT_PASSWORD": OTHER_PASSWORD.decode()})
    assert_one_line_error(proc, 3, "wrong password")
    assert os.listdir(tmp_path) == []


def test_split_size_too_small_refused(base, tmp_path):
    proc = run_imgkit("split", base["plain1"][0], "--split-size", "64K", "-o", tmp_path / "x.imgk")
    assert_one_line_error(proc, 3, "too small")
    assert os.listdir(tmp_path) == []


def test_split_keeps_used_maps_and_free_chunks(tmp_path):
    """A filesystem-aware capture (used-block maps, FREE chunks), encrypted: split and join keep the
    maps, the metadata and every chunk's kind; the restored disk matches."""
    import subprocess
    content = tmp_path / "content"
    content.mkdir()
    (content / "notes.txt").write_bytes(b"imgkit split keeps used maps\n" * 20000)
    (content / "blob.bin").write_bytes(os.urandom(2 << 20))
    disk = tmp_path / "fs.raw"
    with open(disk, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(disk)], check=True)
    (tmp_path / "pw").write_bytes(PASSWORD)
    img = tmp_path / "fs.imgk"
    run_imgkit("capture", disk, img, "--encrypt", "--password-file", tmp_path / "pw", "--chunk-size", "64K",
               check=True)
    with ImageReader(str(img), lambda: PASSWORD) as r:
        maps, meta, kinds = r.used_maps, r.metadata, [e.kind for e in r.index]
    assert maps and L.KIND_FREE in kinds, "the capture should have been filesystem-aware"
    out = tmp_path / "split.imgk"
    run_imgkit("split", img, "--split-size", "200K", "-o", out, env=ENV, check=True)
    joined = tmp_path / "joined.imgk"
    run_imgkit("join", out, "-o", joined, env=ENV, check=True)
    for path in (out, joined):
        with ImageReader(str(path), lambda: PASSWORD) as r:
            assert r.used_maps == maps and r.metadata == meta and [e.kind for e in r.index] == kinds
            assert r.header.optional_features & L.OPTIONAL_USED_MAPS
    a, b = _restore_bytes(str(img), tmp_path), _restore_bytes(str(joined), tmp_path)
    assert a == b


@pytest.mark.slow
def test_kill_during_split_never_leaves_a_complete_looking_bad_image(tmp_path):
    """kill -9 at several points of a split to a new name: the output either does not exist under
    its final name or is complete and verifies; the source is never touched."""
    import hashlib
    import signal
    import subprocess
    import sys
    import time as _time
    src = tmp_path / "big.raw"
    with open(src, "wb") as f:  # 48 MiB, mostly incompressible: the copy takes a noticeable time
        rnd = os.urandom(1 << 20)
        for i in range(48):
            f.write(rnd[i:] + rnd[:i] if i % 3 else bytes(1 << 20))
    paths = capture_in_process(str(src), str(tmp_path / "big.imgk"), chunk_size=1 << 20)
    digest = hashlib.sha256(open(paths[0], "rb").read()).hexdigest()
    env = dict(os.environ, IMGKIT_PASSWORD=PASSWORD.decode())
    outcomes = []
    for delay in (0.05, 0.2, 0.4, 0.7, 1.0, 1.5):
        out = tmp_path / f"out-{delay}.imgk"
        proc = subprocess.Popen([sys.executable, "-m", "imgkit", "split", paths[0], "--split-size", "8M",
                                 "-o", str(out), "--progress", "none"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if os.path.exists(out):
            v = run_imgkit("verify", out, env=ENV)
            assert v.returncode == 0, v.stderr
            outcomes.append("complete")
        else:  # volumes 2.. are renamed before volume 1: orphans, but nothing opens as an image
            outcomes.append("absent")
            assert run_imgkit("info", out, env=ENV).returncode == 3
    assert hashlib.sha256(open(paths[0], "rb").read()).hexdigest() == digest
    print(f"\nkill -9 during split: {outcomes}")
