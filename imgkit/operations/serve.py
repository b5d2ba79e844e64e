"""`imgkit serve`: any image imgkit reads as a read-only NBD export for other programs (qemu, libvirt,
Proxmox, nbdcopy, nbd-client), until Ctrl-C or SIGTERM.

The export server is imgkit/views/nbd_export.py (the one convert, boot-check and run use); this module
only decides where it listens and whether that is safe:
- a unix socket by default (a private temp directory, or the path given);
- TCP only when asked; on a loopback address without TLS, on any other address only with TLS, as
  anyone on the network could otherwise read the whole disk.
TLS is x509 (NBD_OPT_STARTTLS, Python's ssl module; a CA given with --tls-ca also makes clients
show a certificate it signed). qemu-nbd also offers TLS-PSK; Python's ssl module gains PSK only in
3.13 and Debian 12 has 3.11 (the libguestfs binding ties imgkit to Debian's interpreter), so PSK is
not offered rather than hand-built on ctypes OpenSSL calls.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
from dataclasses import dataclass

from ..errors import InputError

DEFAULT_PORT = 10809  # IANA's NBD port


@dataclass
class TlsFiles:
    cert: str
    key: str
    ca: str | None = None  # verify client certificates against this CA


def parse_listen(value: str) -> tuple[str, int]:
    """'ADDR:PORT', '[v6]:PORT', 'ADDR' (port 10809) or ':PORT' (127.0.0.1)."""
    host, port = value, str(DEFAULT_PORT)
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise InputError(f"--listen {value!r}: missing ']' after the IPv6 address")
        host, rest = value[1:end], value[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise InputError(f"--listen {value!r}: expected [ADDRESS]:PORT")
            port = rest[1:]
    elif value.count(":") == 1:
        host, port = value.split(":")
    host = host or "127.0.0.1"
    try:
        port_no = int(port)
    except ValueError:
        raise InputError(f"--listen {value!r}: port {port!r} is not a number") from None
    if not 0 <= port_no <= 65535:
        raise InputError(f"--listen {value!r}: port out of range")
    try:
        addr = socket.getaddrinfo(host, port_no, type=socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as e:
        raise InputError(f"--listen {value!r}: cannot resolve {host!r} ({e.strerror})") from None
    return addr, port_no


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def tls_context(files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(files.cert, files.key)
        if files.ca:
            ctx.load_verify_locations(files.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise InputError(f"TLS credentials: {e}") from None
    return ctx


def prepare_socket_path(path: str) -> None:
    """A socket path may be reused only if nothing listens there (a stale socket of a dead server);
    anything else in the way is refused, never removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise InputError(f"{path}: exists and is not a socket", hint="choose another --socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        live = True
    except OSError:
        live = False
    finally:
        probe.close()
    if live:
        raise InputError(f"{path}: another server is listening on this socket")
    os.unlink(path)  # stale: its server is gone


def listen_options(socket_path: str | None, listen: str | None, tls: TlsFiles | None,
                   export_name: str | None) -> dict:
    """The NbdExport keyword arguments for a command line's choices, refusing unsafe ones."""
    if socket_path and listen:
        raise InputError("--socket and --listen exclude each other")
    if export_name is not None and (len(export_name.encode()) > 4096 or "\0" in export_name):
        raise InputError("--export-name: at most 4096 bytes, no NUL")
    opts: dict = {"export_name": export_name}
    if tls is not None:
        opts["tls"] = tls_context(tls)
    if listen:
        host, port = parse_listen(listen)
        if tls is None and not is_loopback(host):
            raise InputError(f"--listen {listen}: {host} is not a loopback address; serving a disk "
                             f"there without TLS would let anyone on the network read it",
                             hint="add --tls-cert and --tls-key (and --tls-ca to check clients), "
                                  "or listen on 127.0.0.1")
        opts["tcp"] = (host, port)
    elif socket_path:
        prepare_socket_path(socket_path)
        opts["socket_path"] = socket_path
    return opts
