"""Split volumes: capture --split-size writes IMAGE, IMAGE.002, ... each within the size, and every
reading command names a missing, foreign, reordered, duplicated or truncated volume before anything
is written."""
from __future__ import annotations

import os
import shutil

import pytest

from imgkit.formats import imgk_layout as L
from imgkit.formats.imgk_reader import ImageReader
from imgkit.formats.imgk_layout import volume_path

from conftest import assert_one_line_error, run_imgkit
from crypto_volumes_support import PASSWORD, capture_in_process, copy_image, make_source

SPLIT = 200 << 10
ENV = {"IMGKIT_PASSWORD": PASSWORD.decode()}


@pytest.fixture(scope="module")
def split_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("split")
    src = d / "disk.raw"
    expected = make_source(str(src), chunks=20)
    (d / "pw").write_bytes(PASSWORD)
    out = {"dir": d, "src": src, "expected": expected}
    for name, extra in (("plain", []), ("enc", ["--encrypt", "--password-file", d / "pw"]),
                        ("enc2", ["--encrypt", "--password-file", d / "pw"]), ("plain2", [])):
        path = d / f"{name}.imgk"
        proc = run_imgkit("capture", src, path, "--chunk-size", "64K", "--split-size", "200K", "--json",
                          *extra, check=True)
        import json
        out[name] = [str(p) for p in json.loads(proc.stdout)["volumes"]]
    return out


@pytest.mark.parametrize("kind", ["plain", "enc"])
def test_split_capture_layout_and_round_trip(split_images, tmp_path, kind):
    vols = split_images[kind]
    assert len(vols) >= 3
    assert vols[0].endswith(".imgk") and [v[-4:] for v in vols[1:]] == [f".{n:03d}" for n in range(2, len(vols) + 1)]
    ids = set()
    for n, v in enumerate(vols, start=1):
        assert os.path.getsize(v) <= SPLIT
        h = L.Header.decode(open(v, "rb").read(L.HEADER_SIZE))
        assert (h.volume_number, h.volume_count) == (n, len(vols))
        assert h.required_features & L.FEATURE_MULTI_VOLUME
        ids.add(h.image_id)
    assert len(ids) == 1
    target = tmp_path / "restored.raw"
    run_imgkit("restore", vols[0], target, "--yes", env=ENV, check=True)
    assert target.read_bytes() == split_images["expected"]
    assert run_imgkit("verify", vols[0], env=ENV).returncode == 0


@pytest.mark.parametrize("split_kib", [136, 150, 333, 1024])
def test_every_volume_within_split_size(tmp_path, split_kib):
    src = tmp_path / "d.raw"
    expected = make_source(str(src), chunks=12, seed=split_kib)
    paths = capture_in_process(str(src), str(tmp_path / "x.imgk"), split_size=split_kib << 10)
    assert all(os.path.getsize(p) <= split_kib << 10 for p in paths)
    with ImageReader(paths[0], lambda: PASSWORD) as r:
        assert r.read(0, r.size) == expected


def _damage(vols: list[str], other: list[str], how: str) -> tuple[int, str]:
    """Apply one mix-up; return (volume number the error must name, its path)."""
    if how == "missing":
        os.unlink(vols[1])
        return 2, vols[1]
    if how == "last missing":
        os.unlink(vols[-1])
        return len(vols), vols[-1]
    if how == "foreign":  # the same-numbered volume of another image (same content, same size)
        assert os.path.getsize(other[1]) == os.path.getsize(vols[1])
        shutil.copyfile(other[1], vols[1])
        return 2, vols[1]
    if how == "out of order":
        tmp = vols[1] + ".tmp"
        os.rename(vols[1], tmp)
        os.rename(vols[2], vols[1])
        os.rename(tmp, vols[2])
        return 2, vols[1]
    if how == "duplicated":
        shutil.copyfile(vols[1], vols[2])
        return 3, vols[2]
    if how == "truncated":
        os.truncate(vols[1], os.path.getsize(vols[1]) - 100)
        return 2, vols[1]
    if how == "last truncated":
        os.truncate(vols[-1], os.path.getsize(vols[-1]) - 1)
        return len(vols), vols[-1]
    if how == "grown":
        with open(vols[1], "ab") as f:
            f.write(b"\0" * 10)
        return 2, vols[1]
    if how == "header of volume 2 damaged":
        with open(vols[1], "r+b") as f:
            f.seek(200)
            b = f.read(1)
            f.seek(200)
            f.write(bytes([b[0] ^ 0xFF]))
        return 2, vols[1]
    raise AssertionError(how)


HOW = ["missing", "last missing", "foreign", "out of order", "duplicated", "truncated", "last truncated",
       "grown", "header of volume 2 damaged"]


@pytest.mark.parametrize("kind", ["plain", "enc"])
@pytest.mark.parametrize("how", HOW)
def test_volume_mixups_named_before_writing(split_images, tmp_path, kind, how):
    vols = copy_image(split_images[kind], str(tmp_path / "img.imgk"))
    other = split_images["enc2" if kind == "enc" else "plain2"]
    number, path = _damage(vols, other, how)
    target = tmp_path / "target.raw"
    proc = run_imgkit("restore", vols[0], target, "--yes", env=ENV)
    assert_one_line_error(proc, 3, os.path.basename(path))
    assert f"volume {number}" in proc.stderr or f"{os.path.basename(path)}:" in proc.stderr, proc.stderr
    assert not target.exists()
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]
    print(f"\n{kind} / {how}: {proc.stderr.strip().splitlines()[0]}")


def test_info_and_verify_name_the_volume_too(split_images, tmp_path):
    vols = copy_image(split_images["plain"], str(tmp_path / "img.imgk"))
    os.unlink(vols[2])
    for cmd in ("info", "verify"):
        proc = run_imgkit(cmd, vols[0])
        assert proc.returncode in (1, 3) and "volume 3" in proc.stderr and "img.imgk.003" in proc.stderr


def test_opening_a_later_volume_says_so(split_images):
    proc = run_imgkit("info", split_images["plain"][1])
    assert_one_line_error(proc, 3, "volume 2", "not its first volume")


def test_extra_volume_reported_by_info(split_images, tmp_path):
    """A file named like one volume too many (an extra copy, a leftover) does not stop reading,
    but info points at it."""
    vols = copy_image(split_images["plain"], str(tmp_path / "img.imgk"))
    extra = volume_path(vols[0], len(vols) + 1)
    shutil.copyfile(vols[-1], extra)
    proc = run_imgkit("info", vols[0], check=True)
    assert "warning" in proc.stdout and os.path.basename(extra) in proc.stdout
    import json
    doc = json.loads(run_imgkit("info", vols[0], "--json", check=True).stdout)
    assert doc["stray_volume"] == extra
