"""Passwords: wrong ones cost one key derivation and say so; hostile KDF parameters are refused
before any derivation; every reading command asks (terminal, --password-file, IMGKIT_PASSWORD) and a
plain image never does; descriptive metadata is not in the clear."""
from __future__ import annotations

import os
import time

import pytest

import imgkit.formats.crypto
from imgkit.cli.main import main as cli_main
from imgkit.errors import BadImage
from imgkit.formats import imgk_layout as L
from imgkit.formats.imgk_reader import ImageReader

from conftest import assert_one_line_error, run_imgkit
from crypto_volumes_support import OTHER_PASSWORD, PASSWORD, make_source, read_all, run_on_tty

TOKEN = "zq-secret-hostname-7731"  # lands in the metadata (source path) only


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("pw")
    src = d / f"disk-{TOKEN}.raw"
    expected = make_source(str(src), chunks=10)
    (d / "pw").write_bytes(PASSWORD + b"\r\n")  # a file edited on Windows still works
    (d / "wrong").write_bytes(OTHER_PASSWORD + b"\n")
    enc, plain = d / "enc.imgk", d / "plain.imgk"
    run_imgkit("capture", src, enc, "--encrypt", "--password-file", d / "pw", "--chunk-size", "64K", check=True)
    run_imgkit("capture", src, plain, "--chunk-size", "64K", check=True)
    return {"dir": d, "src": src, "enc": enc, "plain": plain, "expected": expected,
            "pw": d / "pw", "wrong": d / "wrong"}


@pytest.fixture
def kdf_calls(monkeypatch):
    """Count Argon2id derivations (the expensive step a wrong password must pay only once)."""
    calls = []
    real = imgkit.formats.crypto.derive_kek

    def counting(password, slot):
        calls.append(time.monotonic())
        return real(password, slot)
    monkeypatch.setattr(imgkit.formats.crypto, "derive_kek", counting)
    return calls


def _cli_in_process(*args) -> int:
    with pytest.raises(SystemExit) as e:
        cli_main([str(a) for a in args])
    return e.value.code


def test_encrypted_round_trip_byte_identical(images, tmp_path):
    out = tmp_path / "r.raw"
    run_imgkit("restore", images["enc"], out, "--yes", "--password-file", images["pw"], check=True)
    assert out.read_bytes() == images["expected"]
    info = run_imgkit("info", images["enc"], "--json", "--password-file", images["pw"], check=True)
    assert '"encrypted": true' in info.stdout


@pytest.mark.parametrize("command", ["info", "verify", "restore"])
def test_wrong_password_exit_3_one_kdf(images, tmp_path, kdf_calls, capsys, command):
    args = [command, images["enc"]]
    target = tmp_path / "t.raw"
    if command == "restore":
        args += [target, "--yes"]
    started = time.monotonic()
    code = _cli_in_process(*args, "--password-file", images["wrong"])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 3
    assert err.startswith("imgkit: error: wrong password"), err
    assert "Traceback" not in err and "corrupt" not in err.lower() and "damaged" not in err.lower()
    assert len(kdf_calls) == 1, f"{len(kdf_calls)} key derivations for one wrong password"
    assert not target.exists()
    print(f"\nwrong password ({command}): 1 key derivation, {elapsed:.2f} s")


def test_wrong_password_through_real_cli(images):
    proc = run_imgkit("verify", images["enc"], env={"IMGKIT_PASSWORD": OTHER_PASSWORD.decode()})
    assert_one_line_error(proc, 3, "wrong password")


def _tamper_slot(src, dst, **fields):
    raw = bytearray(open(src, "rb").read())
    import struct
    offsets = {"kdf": (0, "<B"), "t": (4, "<I"), "m": (8, "<I"), "p": (12, "<I")}
    for name, value in fields.items():
        off, fmt = offsets[name]
        struct.pack_into(fmt, raw, L.KEY_SLOT_OFFSET + off, value)
    raw[L.HEADER_CHECKSUM_OFFSET:L.HEADER_SIZE] = L.digest(bytes(raw[:L.HEADER_CHECKSUM_OFFSET]))
    open(dst, "wb").write(raw)


@pytest.mark.parametrize("fields", [
    {"t": 17}, {"t": 0xFFFFFFFF}, {"m": (1 << 20) + 1}, {"m": 0xFFFFFFFF}, {"m": 4}, {"p": 17},
    {"p": 0}, {"m": 8, "p": 2}, {"kdf": 2},
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_hostile_kdf_parameters_refused_fast(images, tmp_path, kdf_calls, fields):
    """Parameters beyond the caps (a forger recomputes the header checksum) are refused before any
    derivation, in well under a second."""
    bad = tmp_path / "bad.imgk"
    _tamper_slot(images["enc"], bad, **fields)
    started = time.monotonic()
    with pytest.raises(BadImage) as e:
        ImageReader(str(bad), lambda: PASSWORD)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0 and not kdf_calls
    assert ("beyond the caps" in str(e.value)) or ("unknown key derivation" in str(e.value))
    started = time.monotonic()
    proc = run_imgkit("info", bad, "--password-file", images["pw"])
    cli_elapsed = time.monotonic() - started
    assert_one_line_error(proc, 3)
    assert cli_elapsed < 5.0  # interpreter start-up included; no Argon2id run
    print(f"\n{fields}: refused in {elapsed * 1000:.1f} ms in-process, {cli_elapsed:.2f} s via the CLI")


def test_password_from_environment(images):
    proc = run_imgkit("verify", images["enc"], env={"IMGKIT_PASSWORD": PASSWORD.decode()})
    assert proc.returncode == 0, proc.stderr


def test_no_password_without_terminal_is_refused(images):
    proc = run_imgkit("info", images["enc"], input="")
    assert_one_line_error(proc, 3, "encrypted", "no password")


def test_password_never_an_argument(images):
    proc = run_imgkit("info", images["enc"], "--password", PASSWORD.decode())
    assert proc.returncode == 2  # click usage error: no such option


def test_capture_password_file_without_encrypt_is_refused(images, tmp_path):
    proc = run_imgkit("capture", images["src"], tmp_path / "x.imgk", "--password-file", images["pw"])
    assert proc.returncode == 2 and "--encrypt" in proc.stderr
    assert not (tmp_path / "x.imgk").exists()


def test_prompt_on_terminal(images):
    code, shown = run_on_tty(["info", str(images["enc"])], [PASSWORD.decode()])
    assert code == 0, shown
    assert "Password:" in shown and "encrypted:    yes" in shown
    assert PASSWORD.decode() not in shown  # no echo


def test_wrong_password_on_terminal(images):
    code, shown = run_on_tty(["verify", str(images["enc"])], [OTHER_PASSWORD.decode()])
    assert code == 3 and "wrong password" in shown and shown.count("Password:") == 1


def test_plain_image_never_prompts(images):
    code, shown = run_on_tty(["info", str(images["plain"])], [])
    assert code == 0 and "Password" not in shown and "encrypted:    no" in shown


def test_capture_prompts_twice_on_terminal(images, tmp_path):
    out = tmp_path / "t.imgk"
    code, shown = run_on_tty(["capture", str(images["src"]), str(out), "--encrypt", "--chunk-size", "64K"],
                             ["s3cret-typed", "s3cret-typed"])
    assert code == 0, shown
    assert "New password:" in shown and "Repeat the password:" in shown
    assert read_all(str(out), b"s3cret-typed") == images["expected"]


def test_metadata_and_content_not_in_clear(images):
    enc = b"".join(open(p, "rb").read() for p in [images["enc"]])
    plain = open(images["plain"], "rb").read()
    with ImageReader(str(images["plain"])) as r:
        assert TOKEN in r.metadata["source"]["path"], "the test needs the token in the metadata"
    assert TOKEN.encode() not in enc
    # No zstd frame in the clear: neither chunks nor sections (metadata, index) can be decompressed
    # (a 4-byte magic turns up by chance in ~1 MiB of ciphertext with probability ~0.03%).
    zstd_magic = b"\x28\xb5\x2f\xfd"
    assert plain.count(zstd_magic) > 5 and enc.count(zstd_magic) == 0
    # Chunk 1 is incompressible, so a plain image stores it raw; an encrypted one must not.
    snippet = images["expected"][(64 << 10) + 100:(64 << 10) + 132]
    assert snippet in plain and snippet not in enc
    for needle in (b"imgkit_version", b"partition_table", b'"source"', b"zstd"):
        assert needle not in enc


def test_capture_from_encrypted_image_asks_its_password(images, tmp_path):
    """An encrypted imgk image as the *source* of a capture is opened with the reading password."""
    out = tmp_path / "plain-copy.imgk"
    bad = run_imgkit("capture", images["enc"], out, "--chunk-size", "64K", input="")
    assert_one_line_error(bad, 3, "encrypted")
    run_imgkit("capture", images["enc"], out, "--chunk-size", "64K", env={"IMGKIT_PASSWORD": PASSWORD.decode()},
               check=True)
    assert read_all(str(out), None) == images["expected"]


def test_partition_restore_prompts_once(tmp_path):
    """restore --partition opens the image twice (plan, then restore): one prompt."""
    import subprocess
    disk = tmp_path / "d.raw"
    table = "label: dos\nstart=2048, size=8192, type=83\n"
    for p in (disk, tmp_path / "t.raw"):
        with open(p, "wb") as f:
            f.truncate(8 << 20)
        subprocess.run(["sfdisk", "-q", str(p)], input=table, text=True, check=True)
    with open(disk, "r+b") as f:
        f.seek(1 << 20)
        f.write(os.urandom(3 << 20))
    (tmp_path / "pw").write_bytes(PASSWORD)
    run_imgkit("capture", disk, tmp_path / "e.imgk", "--encrypt", "--password-file", tmp_path / "pw",
               "--chunk-size", "64K", check=True)
    code, shown = run_on_tty(["restore", str(tmp_path / "e.imgk"), str(tmp_path / "t.raw"), "--partition", "1",
                              "--yes"], [PASSWORD.decode()])
    assert code == 0, shown
    assert shown.count("Password:") == 1
    with open(disk, "rb") as a, open(tmp_path / "t.raw", "rb") as b:
        a.seek(1 << 20)
        b.seek(1 << 20)
        assert a.read(4 << 20) == b.read(4 << 20)
