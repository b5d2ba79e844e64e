"""The serve command: an image as a read-only NBD export until Ctrl-C or SIGTERM."""
from __future__ import annotations

import signal
import sys
import threading
import time

import click

from ..formats.detect import FORMATS
from ..units import format_size
from .main import cli
from .options import json_option, password_options, reading_password
from .output import emit_json


def _terminate(signum, frame):
    raise KeyboardInterrupt


@cli.command()
@click.argument("image", type=click.Path())
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), metavar="PATH",
              help="Unix socket to listen on (default: a new one in a private temp directory).")
@click.option("--listen", metavar="ADDR:PORT",
              help="Listen on TCP instead (port 10809 if omitted). A non-loopback address needs TLS.")
@click.option("--export-name", metavar="NAME", help="The export's name (default: \"\", the default export).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="Server certificate (PEM): enables TLS.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="Its private key (PEM).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False),
              help="CA (PEM) that must have signed the clients' certificates.")
@click.option("--format", "image_format", type=click.Choice(FORMATS),
              help="Format of IMAGE (default: read from its header).")
@password_options
@json_option
def serve(image, socket_path, listen, export_name, tls_cert, tls_key, tls_ca, image_format, password_file, as_json):
    """Serve IMAGE read-only over NBD until Ctrl-C or SIGTERM.

    Any image imgkit reads (imgk plain, encrypted or split; raw, iso, qcow2, vhd, vhdx, vmdk).
    Structured replies, block status (holes and zeros, so copies stay sparse), several connections
    at once. A unix socket by default; TCP with --listen, where a non-loopback address is refused
    without TLS (x509: --tls-cert/--tls-key, and --tls-ca to require client certificates).
    Writes are refused; a damaged chunk is an I/O error for the client, logged here with its offset.
    --json prints {"uri": ..., ...} once listening.

    Examples: imgkit serve backup.imgk --socket /run/b.sock;
    qemu-img convert -f raw nbd+unix:///?socket=/run/b.sock disk.raw;
    imgkit serve backup.imgk --listen 0.0.0.0:10809 --tls-cert srv.pem --tls-key srv.key
    """
    from .. import api
    from ..errors import InputError
    from ..views.nbd_export import export_stream
    from ..operations.serve import TlsFiles, listen_options

    if bool(tls_cert) != bool(tls_key):
        raise InputError("--tls-cert and --tls-key go together")
    if tls_ca and not tls_cert:
        raise InputError("--tls-ca needs --tls-cert and --tls-key")
    tls = TlsFiles(tls_cert, tls_key, tls_ca) if tls_cert else None
    opts = listen_options(socket_path, listen, tls, export_name)
    signal.signal(signal.SIGTERM, _terminate)

    def log_error(message: str) -> None:
        click.echo(f"imgkit: serve: {message}", err=True)

    stream = api.open_image(image, reading_password(password_file), fmt=image_format, serving=True)
    try:
        with export_stream(stream, on_error=log_error, **opts) as export:
            info = {"uri": export.uri, "image": image, "size": export.size,
                    "export_name": export_name or "", "socket": export.socket_path,
                    "address": list(export.tcp_address) if export.tcp_address else None,
                    "tls": tls is not None, "read_only": True, "pid": __import__("os").getpid()}
            if as_json:
                emit_json(info)
            else:
                click.echo(f"serving {image} ({format_size(export.size)}, read-only) at {export.uri}")
                click.echo("stop with Ctrl-C", err=True)
            sys.stdout.flush()
            started = time.monotonic()
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                pass
            click.echo(f"imgkit: serve: stopped after {time.monotonic() - started:.0f} s, "
                       f"{export.connections} connection(s), {format_size(export.bytes_read)} sent, "
                       f"{len(export.errors)} read error(s)", err=True)
    finally:
        stream.close()
