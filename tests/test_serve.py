"""`imgkit serve` as its users meet it: a real `imgkit serve` process, read by qemu-img, nbdcopy and
libnbd over a unix socket and TCP (plain on loopback, TLS with a test-made CA), every image kind
compared byte for byte with its source, refusals of unsafe listening, clean stops, and a damaged
chunk reported to the client as EIO and logged with its offset."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from imgkit import api
from imgkit.stream import DATA
from tests.conftest import assert_one_line_error, pattern_bytes, run_imgkit
from tests.convert_helpers import MiB

pytestmark = pytest.mark.qemu
nbd = pytest.importorskip("nbd", reason="python3-libnbd (scripts/setup.sh installs it)")

SIZE = 32 * MiB
LAYOUT = [(1 * MiB, 3 * MiB), (20 * MiB, 2 * MiB), (31 * MiB, 1 * MiB)]
PASSWORD = "serve test password"


def sh(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    raw = d / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        for i, (off, n) in enumerate(LAYOUT):
            f.seek(off)
            f.write(pattern_bytes(n, seed=10 + i))
    return d, str(raw)


class Server:
    """A running `imgkit serve --json`; its JSON document is read before the test goes on."""

    def __init__(self, image, *args, env=None):
        full_env = dict(os.environ)
        full_env.pop("IMGKIT_PASSWORD", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "imgkit", "serve", str(image), "--json", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
        lines = []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"serve exited {self.proc.wait()}: {self.proc.stderr.read()}")
            lines.append(line)
            if line.startswith("}"):
                break
        self.info = json.loads("".join(lines))
        self.uri = self.info["uri"]

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.stop()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("kind", ["imgk", "encrypted", "split", "chain", "qcow2", "raw"])
def test_each_image_kind_serves_exactly_its_source(disk, kind):
    d, raw = disk
    env = {}
    if kind == "chain":  # an incremental image over a base: the export is the newer disk
        base = d / "base.imgk"
        zeros = d / "zeros.raw"
        with open(zeros, "wb") as f:
            f.truncate(SIZE)
        run_imgkit("capture", "--sector-by-sector", zeros, base, check=True)
        image = d / "chain.imgk"
        run_imgkit("capture", "--sector-by-sector", raw, image, "--base", base, check=True)
    elif kind == "raw":
        image = raw
    elif kind == "qcow2":
        image = d / "disk.qcow2"
        if not image.exists():
            sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", raw, image)
    else:
        image = d / f"{kind}.imgk"
        extra = {"imgk": [], "encrypted": ["--encrypt"], "split": ["--split-size", "5M"]}[kind]
        if kind == "encrypted":
            env = {"IMGKIT_PASSWORD": PASSWORD}
        if not image.exists():
            run_imgkit("capture", "--sector-by-sector", raw, image, *extra, env=env, check=True)
    with Server(image, env=env) as srv:
        assert srv.info["size"] == SIZE and srv.info["read_only"]
        assert srv.uri.startswith("nbd+unix:///?socket=")
        out = sh("qemu-img", "compare", "-f", "raw", "-F", "raw", raw, srv.uri)
        assert "identical" in out.stdout
        code, err = srv.stop()
    assert code == 0, err
    assert "stopped" in err and not os.path.exists(srv.info["socket"])


def test_nbdcopy_multi_conn_copy_is_exact_and_sparse(disk, tmp_path):
    d, raw = disk
    image = d / "nbdcopy.imgk"
    run_imgkit("capture", "--sector-by-sector", raw, image, check=True)
    sock = tmp_path / "b.sock"
    with Server(image, "--socket", sock) as srv:
        assert srv.info["socket"] == str(sock)
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.connect_uri(srv.uri)
        assert h.can_multi_conn() and h.is_read_only() and h.get_size() == SIZE
        assert h.can_meta_context("base:allocation")
        h.shutdown()
        out = tmp_path / "copy.raw"
        sh("nbdcopy", "--connections=4", srv.uri, out)
        assert out.read_bytes() == open(raw, "rb").read()
        # The holes were reported and skipped: only the data (6 MiB, at chunk granularity) is allocated.
        assert os.stat(out).st_blocks * 512 <= 8 * MiB
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", srv.uri, tmp_path / "copy.qcow2")
        assert "identical" in sh("qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, tmp_path / "copy.qcow2").stdout
        assert srv.info["socket"] == str(sock)
        code, err = srv.stop(signal.SIGINT)  # Ctrl-C
    assert code == 0, err
    assert not sock.exists()


def test_tcp_on_loopback_with_export_name(disk):
    d, raw = disk
    port = _free_port()
    with Server(raw, "--listen", f"127.0.0.1:{port}", "--export-name", "backup") as srv:
        assert srv.uri == f"nbd://127.0.0.1:{port}/backup"
        assert "identical" in sh("qemu-img", "compare", "-f", "raw", "-F", "raw", raw, srv.uri).stdout
        h = nbd.NBD()
        h.set_export_name("other")
        with pytest.raises(nbd.Error):
            h.connect_tcp("127.0.0.1", str(port))
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 4096, 0)  # read-only
        assert h.pread(4096, LAYOUT[1][0]) == open(raw, "rb").read()[LAYOUT[1][0]:LAYOUT[1][0] + 4096]


def test_non_loopback_without_tls_is_refused(disk):
    d, raw = disk
    proc = run_imgkit("serve", raw, "--listen", f"0.0.0.0:{_free_port()}", timeout=30)
    assert_one_line_error(proc, 3, "not a loopback address", "TLS")
    proc = run_imgkit("serve", raw, "--listen", "127.0.0.1:1", "--socket", "/tmp/x.sock", timeout=30)
    assert_one_line_error(proc, 3, "exclude")


def test_socket_path_in_use_or_not_a_socket_is_refused(disk, tmp_path):
    d, raw = disk
    plain = tmp_path / "file"
    plain.write_text("keep me")
    assert_one_line_error(run_imgkit("serve", raw, "--socket", plain, timeout=30), 3, "not a socket")
    assert plain.read_text() == "keep me"
    sock = tmp_path / "live.sock"
    with Server(raw, "--socket", sock):
        assert_one_line_error(run_imgkit("serve", raw, "--socket", sock, timeout=30), 3, "listening")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as qemu and
    libnbd expect them in one directory (ca-cert.pem, client-cert.pem, client-key.pem)."""
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args):
        sh("openssl", *args, cwd=d)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=imgkit test CA",
            "-keyout", "ca-key.pem", "-out", "ca-cert.pem")
    for who, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}", "-keyout", f"{who}-key.pem",
                "-out", f"{who}.csr")
        (d / f"{who}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
                "-CAcreateserial", "-days", "2", "-extfile", f"{who}.ext", "-out", f"{who}-cert.pem")
    return d


def test_tls_on_all_interfaces_serves_only_tls_clients(disk, pki, tmp_path):
    d, raw = disk
    port = _free_port()
    with Server(raw, "--listen", f"0.0.0.0:{port}", "--tls-cert", pki / "server-cert.pem",
                "--tls-key", pki / "server-key.pem", "--tls-ca", pki / "ca-cert.pem") as srv:
        assert srv.info["tls"] and srv.uri.startswith("nbds://")
        plain = nbd.NBD()
        with pytest.raises(nbd.Error):
            plain.connect_tcp("127.0.0.1", str(port))  # no STARTTLS: refused
        client = nbd.NBD()
        client.set_tls(nbd.TLS_REQUIRE)
        client.set_tls_certificates(str(pki))
        client.add_meta_context("base:allocation")
        client.connect_tcp("127.0.0.1", str(port))
        want = open(raw, "rb").read()
        assert client.pread(3 * MiB, LAYOUT[0][0]) == want[LAYOUT[0][0]:LAYOUT[0][0] + 3 * MiB]
        client.shutdown()
        # qemu-img as a TLS client with the client certificate
        out = tmp_path / "tls.raw"
        sh("qemu-img", "convert", "--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=client",
           "--image-opts", f"driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={port},file.tls-creds=tls0",
           "-O", "raw", out)
        assert out.read_bytes() == want


def test_damaged_chunk_is_eio_logged_with_its_offset(disk, tmp_path):
    d, raw = disk
    bad = tmp_path / "bad.imgk"
    api.capture(raw, str(bad), level=0, sector_by_sector=True, chunk_size=MiB)
    with api.open_image(str(bad)) as img:
        first = next(r for r in img.runs() if r.kind == DATA)
    with open(bad, "r+b") as f:  # chunk data starts after the 4096-byte header
        f.seek(4096 + 1000)
        byte = f.read(1)
        f.seek(4096 + 1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with Server(bad) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        with pytest.raises(nbd.Error) as e:
            h.pread(4096, first.offset)
        assert e.value.errno == "EIO"
        assert h.pread(4096, LAYOUT[1][0]) == open(raw, "rb").read()[LAYOUT[1][0]:LAYOUT[1][0] + 4096]
        h.shutdown()
        time.sleep(0.2)
        code, err = srv.stop()
    assert code == 0
    assert f"at offset {first.offset}" in err and "1 read error" in err, err


def test_a_socket_or_address_it_cannot_listen_on_is_one_line_naming_it(disk, tmp_path):
    _, raw = disk
    proc = run_imgkit("serve", raw, "--socket", tmp_path / "missing" / "s.sock", timeout=60)
    assert_one_line_error(proc, 3, str(tmp_path / "missing" / "s.sock"), "cannot listen there", "no such file")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        proc = run_imgkit("serve", raw, "--listen", f"127.0.0.1:{port}", timeout=60)
    finally:
        taken.close()
    assert_one_line_error(proc, 3, f"127.0.0.1:{port}: cannot listen there", "in use")
