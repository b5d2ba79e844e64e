"""Incremental images (issue 15) on a real filesystem: a GPT disk whose ext4 the test changes through
a loop mount, captured full and then with --base three times, sector by sector and filesystem-aware.
Every link restores the disk as it was at its time; a missing, swapped, changed or tampered parent is
named before anything is written. Real loop mounts, real restores, e2fsck and debugfs."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

import incremental_disks as D
from tests.conftest import assert_one_line_error, needs_root, run_imgkit

pytestmark = [needs_root, pytest.mark.root]

CHUNK = "256K"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cli(*args, env=None):
    return run_imgkit(*args, "--progress", "none", env=env, check=True) if args[0] in (
        "capture", "restore", "verify") else run_imgkit(*args, env=env, check=True)


def info_json(image, *extra, env=None) -> dict:
    return json.loads(run_imgkit("info", image, "--json", *extra, env=env, check=True).stdout)


# The changes between captures: added, changed (rewritten in place, same size), deleted, grown.
def change(state: int, root: str) -> None:
    if state == 1:
        D.write_file(root, "new/added.bin", 3 * D.MiB, seed=11)
        with open(os.path.join(root, "docs/readme.txt"), "r+b") as f:  # changed in place
            f.seek(100)
            f.write(b"CHANGED" * 100)
        os.unlink(os.path.join(root, "big.bin"))
    elif state == 2:
        D.write_file(root, "new/second.bin", 1 * D.MiB, seed=12)
        with open(os.path.join(root, "new/added.bin"), "ab") as f:
            f.write(os.urandom(300_000))
    elif state == 3:
        os.unlink(os.path.join(root, "new/second.bin"))
        D.write_file(root, "third/t.txt", 200_000, seed=13, compressible=True)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """States 0..3 of the disk (copies and file hashes) and two chains of images of them:
    sector-by-sector (full, inc1, inc2, inc3) and filesystem-aware (fsfull, fsinc1..3)."""
    work = str(tmp_path_factory.mktemp("incremental"))
    disk = os.path.join(work, "disk.raw")
    D.build_disk(disk)
    mnt = os.path.join(work, "mnt")
    with D.Mounted(disk, mnt) as root:
        D.write_file(root, "big.bin", 4 * D.MiB, seed=1)
        D.write_file(root, "docs/readme.txt", 500_000, seed=2, compressible=True)
        D.write_file(root, "bin/tool", 2 * D.MiB, seed=3)
    states, hashes = [], []
    names = ["full", "inc1", "inc2", "inc3"]
    for k in range(4):
        if k:
            with D.Mounted(disk, mnt) as root:
                change(k, root)
        with D.Mounted(disk, mnt) as root:
            hashes.append(D.file_hashes(root))
        states.append(D.snapshot(disk, os.path.join(work, f"state{k}.raw")))
        base = ["--base", os.path.join(work, names[k - 1] + ".imgk")] if k else ["--chunk-size", CHUNK]
        fs_base = ["--base", os.path.join(work, "fs" + names[k - 1] + ".imgk")] if k else ["--chunk-size", CHUNK]
        cli("capture", disk, os.path.join(work, names[k] + ".imgk"), "--sector-by-sector", *base)
        cli("capture", disk, os.path.join(work, "fs" + names[k] + ".imgk"), *fs_base)
    return {"work": work, "states": states, "hashes": hashes,
            "sbs": [os.path.join(work, n + ".imgk") for n in names],
            "fs": [os.path.join(work, "fs" + n + ".imgk") for n in names]}


def copy_chain(chain, where, kind="sbs") -> list[str]:
    os.makedirs(where, exist_ok=True)
    out = []
    for p in chain[kind]:
        out.append(shutil.copy(p, where))
    return out


def test_each_sector_by_sector_link_restores_its_disk_byte_for_byte(chain, tmp_path):
    for k, image in enumerate(chain["sbs"]):
        out = tmp_path / f"r{k}.raw"
        cli("restore", image, out, "--yes")
        assert sha256_file(out) == sha256_file(chain["states"][k]), f"link {k}"
    # ...and the states really differ, so a link restoring its parent's disk would fail above.
    assert len({sha256_file(s) for s in chain["states"]}) == 4


def test_each_filesystem_aware_link_restores_a_clean_ext4_with_every_file(chain, tmp_path):
    for k, image in enumerate(chain["fs"]):
        part = str(tmp_path / f"p{k}.ext4")
        cli("restore", image, part, "--partition", "1", "--yes")
        fsck = D.fsck_clean(part)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert D.ext4_files(part, str(tmp_path)) == chain["hashes"][k], f"link {k}"
    assert chain["hashes"][0] != chain["hashes"][1] != chain["hashes"][2] != chain["hashes"][3]


def test_children_store_only_what_changed_and_info_shows_the_chain(chain):
    full = info_json(chain["sbs"][0])
    doc = info_json(chain["sbs"][3])
    assert [os.path.basename(link["path"]) for link in doc["chain"]] == ["inc3.imgk", "inc2.imgk", "inc1.imgk",
                                                                         "full.imgk"]
    for link, path in zip(doc["chain"], reversed(chain["sbs"])):
        assert link["stored_size"] == os.path.getsize(path)
    assert doc["chain_stored_size"] == sum(os.path.getsize(p) for p in chain["sbs"])
    assert doc["chunks"]["parent"] > 0 and doc["chunk_size"] == 256 << 10  # inherited from the base
    # New data per link: 3 MiB random (+ a changed text), 1.3 MiB random, 0.2 MB of text (compressible).
    for kind in ("sbs", "fs"):
        for child, limit in zip(chain[kind][1:], (4.0, 2.5, 1.0)):
            assert os.path.getsize(child) < limit * D.MiB < full["stored_size"], child
    # inc3 changed ~200 KB of compressible text and freed a file's blocks: a few chunks, not the disk.
    assert doc["chunks"]["data"] <= 12, doc["chunks"]
    text = run_imgkit("info", chain["sbs"][3], check=True).stdout
    assert "chain:        4 links" in text and "inc1.imgk" in text


def test_verify_walks_the_chain_and_shallow_checks_one_link(chain, tmp_path):
    images = copy_chain(chain, tmp_path / "c")
    doc = json.loads(run_imgkit("verify", images[3], "--json", check=True).stdout)
    assert doc["ok"] and doc["data_chunks"] > info_json(images[3])["chunks"]["data"]
    os.unlink(images[1])  # the shallow check needs no parent...
    shallow = json.loads(run_imgkit("verify", images[3], "--shallow", "--json", check=True).stdout)
    assert shallow["ok"] and shallow["data_chunks"] < doc["data_chunks"]
    # ...the deep one names the missing link.
    assert_one_line_error(run_imgkit("verify", images[3]), 3, "inc1.imgk", "missing")


def test_damage_in_a_parent_chunk_is_found_by_verifying_the_child(chain, tmp_path):
    images = copy_chain(chain, tmp_path / "c")
    import imgkit
    with imgkit.open_image(images[0]) as full:
        stored = [i for i, k in enumerate(full.index.kinds()) if k == 1]
        e = full.index[stored[len(stored) // 2]]
    with open(images[0], "r+b") as f:  # XOR, never a fixed value
        f.seek(e.offset + e.stored_length // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    proc = run_imgkit("verify", images[3], "--json")
    assert proc.returncode == 1 and not json.loads(proc.stdout)["ok"]


@pytest.mark.parametrize("how", ["missing", "swapped", "tampered", "changed", "foreign"])
def test_a_broken_parent_is_named_before_anything_is_written(chain, tmp_path, how):
    images = copy_chain(chain, tmp_path / "c")
    parent = images[1]
    if how == "missing":
        os.unlink(parent)
        needles = ["inc1.imgk", "missing"]
    elif how == "swapped":  # another image under the parent's name
        shutil.copy(chain["fs"][1], parent)
        needles = ["inc1.imgk", "replaced"]
    elif how == "foreign":
        with open(parent, "wb") as f:
            f.write(b"\0" * 8192)
        needles = ["inc1.imgk", "replaced", "not an imgk image"]
    elif how == "tampered":  # a flipped byte in the parent's section directory
        size = os.path.getsize(parent)
        with open(parent, "r+b") as f:
            f.seek(size - 128 - 40)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
        needles = ["inc1.imgk", "damaged"]
    else:  # same image id, other contents: rewritten by hand with one chunk's digest altered
        _rewrite_with_other_content(parent)
        needles = ["inc1.imgk", "changed since"]
    target = tmp_path / "target.raw"
    for args in (["restore", images[3], target, "--yes"], ["info", images[3]],
                 ["convert", images[3], tmp_path / "out.qcow2"]):
        assert_one_line_error(run_imgkit(*args), 3, *needles)
    assert not target.exists() and not (tmp_path / "out.qcow2").exists()


def _rewrite_with_other_content(path: str) -> None:
    """The image at `path` written again with the same header (image id) and one chunk changed."""
    from imgkit.formats import imgk_layout as L
    from imgkit.formats.imgk_reader import ImageReader
    from imgkit.formats.imgk_writer import ChunkEncoder, ImageWriter
    src = ImageReader(path)
    tmp = path + ".new"
    w = ImageWriter(tmp, src.size, src.chunk_size, template=src.header)
    enc = ChunkEncoder(3)
    changed = False
    for i, e in enumerate(src.index):
        if e.kind == L.KIND_DATA and not changed:
            data = bytearray(src.read_chunk(i))
            data[0] ^= 0xFF
            w.put(enc.prepare(i, bytes(data), len(data)))
            changed = True
        elif e.kind == L.KIND_DATA:
            w.put(enc.prepare(i, src.read_chunk(i), src.chunk_length(i)))
        elif e.kind != L.KIND_ZERO:
            w.set_entry(i, e)
    w.set_parent(src.parent_ref)
    w.commit(src.metadata)
    src.close()
    os.replace(tmp, path)


def test_parents_found_when_renamed_and_through_base_dir(chain, tmp_path):
    images = copy_chain(chain, tmp_path / "c")
    os.rename(images[2], str(tmp_path / "c" / "tuesday.imgk"))  # renamed: found by its image id
    out = tmp_path / "r.raw"
    cli("restore", images[3], out, "--yes")
    assert sha256_file(out) == sha256_file(chain["states"][3])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    child = shutil.move(images[3], elsewhere)
    assert_one_line_error(run_imgkit("info", child), 3, "missing", "--base-dir")
    doc = info_json(child, "--base-dir", str(tmp_path / "c"))
    assert len(doc["chain"]) == 4


def test_mount_of_a_child_reads_the_disk_of_its_time(chain, tmp_path):
    from tests.mount.helpers import mounted
    mp = str(tmp_path / "m")
    with mounted(chain["sbs"][2], mp):
        assert sha256_file(os.path.join(mp, "disk.raw")) == sha256_file(chain["states"][2])


def test_convert_of_a_child_to_qcow2(chain, tmp_path):
    out = tmp_path / "c.qcow2"
    cli("convert", chain["fs"][3], out)
    raw = tmp_path / "c.raw"
    import subprocess
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(out), str(raw)], check=True)
    restored = tmp_path / "r.raw"
    cli("restore", chain["fs"][3], restored, "--yes")
    assert sha256_file(raw) == sha256_file(restored)


def test_split_and_join_of_a_child_keep_the_chain(chain, tmp_path):
    images = copy_chain(chain, tmp_path / "c")
    cli("split", images[2], "--split-size", "1M")
    assert os.path.exists(images[2] + ".002")
    out = tmp_path / "r.raw"
    cli("restore", images[3], out, "--yes")  # inc3 reads through the split inc2
    assert sha256_file(out) == sha256_file(chain["states"][3])
    cli("join", images[2])
    cli("restore", images[2], out, "--yes")
    assert sha256_file(out) == sha256_file(chain["states"][2])


def test_grown_source_is_accepted_and_said(chain, tmp_path):
    grown = tmp_path / "grown.raw"
    shutil.copy(chain["states"][3], grown)
    with open(grown, "r+b") as f:
        f.truncate(D.DISK_SIZE + 8 * D.MiB)
        f.seek(D.DISK_SIZE + 1 * D.MiB)
        f.write(os.urandom(100_000))
    proc = run_imgkit("capture", grown, tmp_path / "g.imgk", "--base", chain["sbs"][3], "--sector-by-sector",
                      "--progress", "none", check=True)
    assert "grown" in proc.stderr
    out = tmp_path / "r.raw"
    cli("restore", tmp_path / "g.imgk", out, "--yes", "--base-dir", chain["work"])  # the parent is there
    assert sha256_file(out) == sha256_file(grown)
    assert info_json(tmp_path / "g.imgk", "--base-dir", chain["work"])["chunks"]["parent"] > 0


def test_unchanged_disk_gives_a_child_of_parent_entries_only(chain, tmp_path):
    proc = run_imgkit("capture", chain["states"][3], tmp_path / "same.imgk", "--base", chain["fs"][3],
                      "--json", "--progress", "none", check=True)
    doc = json.loads(proc.stdout)
    assert doc["data_chunks"] == 0 and doc["parent_chunks"] > 0
    assert os.path.getsize(tmp_path / "same.imgk") < 64 << 10


def test_bad_base_arguments(chain, tmp_path):
    assert_one_line_error(run_imgkit("capture", chain["states"][0], tmp_path / "x.imgk", "--base",
                                     chain["states"][0]), 3, "--base must be an imgk image")
    assert_one_line_error(run_imgkit("capture", chain["states"][0], tmp_path / "x.imgk", "--base",
                                     chain["sbs"][0], "--chunk-size", "1M"), 3, "chunk size")
    env = {"IMGKIT_PASSWORD": "pw"}
    assert_one_line_error(run_imgkit("capture", chain["states"][0], tmp_path / "x.imgk", "--base",
                                     chain["sbs"][0], "--encrypt", env=env), 3, "not encrypted")
    assert not (tmp_path / "x.imgk").exists()


def test_encrypted_chain_one_password_own_keys_nothing_in_clear(chain, tmp_path):
    env = {"IMGKIT_PASSWORD": "chain password"}
    full, child = tmp_path / "secret-monday.imgk", tmp_path / "tue.imgk"
    run_imgkit("capture", chain["states"][1], full, "--encrypt", "--sector-by-sector", "--progress", "none",
               env=env, check=True)
    run_imgkit("capture", chain["states"][2], child, "--base", full, "--sector-by-sector", "--progress", "none",
               env=env, check=True)
    import imgkit
    with imgkit.open_image(str(child), "chain password") as img:
        assert img.header.encrypted and img.parent is not None
        assert img.data_key != img.parent.data_key  # each image keeps its own data key
        parent_id = img.parent.header.image_id
    raw = child.read_bytes()
    for secret in (parent_id, parent_id.hex().encode(), b"secret-monday"):
        assert secret not in raw, secret
    out = tmp_path / "r.raw"
    run_imgkit("restore", child, out, "--yes", "--progress", "none", env=env, check=True)
    assert sha256_file(out) == sha256_file(chain["states"][2])
    assert_one_line_error(run_imgkit("info", child, env={"IMGKIT_PASSWORD": "wrong"}), 3, "wrong password")
    # A link whose password was changed alone breaks the chain, and the error says which link.
    run_imgkit("passwd", child, env={**env, "IMGKIT_NEW_PASSWORD": "other"}, check=True)
    assert_one_line_error(run_imgkit("info", child, env={"IMGKIT_PASSWORD": "other"}), 3,
                          "not its parent", "secret-monday.imgk")


def test_boot_check_of_a_child(tiny_bios_image, tmp_path):
    """The tiny fixture booted from a child whose boot sector lives in its parent: a chain serves
    the boot like one image."""
    from tests.bootcheck_helpers import boot_check_json
    disk = tmp_path / "tiny.img"
    shutil.copy(tiny_bios_image, disk)
    cli("capture", disk, tmp_path / "full.imgk", "--sector-by-sector", "--chunk-size", "64K")
    with open(disk, "r+b") as f:  # a change far from the boot code: the child stores it
        f.seek(6 * D.MiB)
        f.write(os.urandom(200_000))
    cli("capture", disk, tmp_path / "child.imgk", "--base", tmp_path / "full.imgk", "--sector-by-sector")
    doc_info = info_json(tmp_path / "child.imgk")
    assert doc_info["chunks"]["data"] >= 1 and doc_info["chunks"]["parent"] >= 1
    code, doc, err = boot_check_json(tmp_path / "child.imgk", "--timeout", "60")
    assert code == 0 and doc["passed"] is True, err
    assert doc["matched"] == "IMGKIT-BOOT-OK tiny-bios"


def test_a_chain_that_loops_is_refused(chain, tmp_path):
    """full <- inc1, then full rewritten (same id, same digests, so inc1 still accepts it) as a child of
    inc1: opening either one must end in a clear error, not a recursion."""
    from imgkit.formats import imgk_layout as L
    from imgkit.formats.imgk_chain import parent_ref_for
    from imgkit.formats.imgk_reader import ImageReader
    from imgkit.formats.imgk_writer import ImageWriter
    images = copy_chain(chain, tmp_path / "c")
    os.unlink(images[2])
    os.unlink(images[3])
    src, inc1 = ImageReader(images[0]), ImageReader(images[1])
    w = ImageWriter(images[0] + ".new", src.size, src.chunk_size, template=src.header)
    for i, e in enumerate(src.index):
        if e.kind == L.KIND_DATA:
            volume, offset = w.copy_stored(src.read_stored(i))
            w.set_entry(i, L.IndexEntry(L.KIND_DATA, e.encoding, volume, e.stored_length, offset, e.object, e.digest))
        elif e.kind != L.KIND_ZERO:
            w.set_entry(i, e)
    w.set_parent(parent_ref_for(inc1))
    w.commit(src.metadata)
    src.close()
    inc1.close()
    os.replace(images[0] + ".new", images[0])
    for image in images[:2]:
        assert_one_line_error(run_imgkit("info", image), 3, "loops")
