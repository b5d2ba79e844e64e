"""Options shared by several commands, defined once (../shared cli.md: one feel across commands)."""
from __future__ import annotations

import os
import sys

import click

from ..errors import InputError
from ..progress import Progress
from ..units import parse_size, parse_split_size


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")(f)


def progress_option(f):
    return click.option("--progress", "progress_mode", type=click.Choice(["auto", "bar", "json", "none"]),
                        default="auto", show_default=True,
                        help="Progress on stderr: a bar on a terminal, JSON lines, or nothing.")(f)


def base_dir_option(f):
    """--base-dir for every command that opens an image: where the parents of an incremental image
    are, when not next to it. Passed on through IMGKIT_BASE_DIR so that it also reaches the helper
    processes of mount and boot-check (imgk_chain.BASE_DIR_ENV)."""
    def remember(ctx, param, value):
        if value:
            if not os.path.isdir(value):
                raise click.BadParameter(f"{value}: no such directory", ctx, param)
            os.environ["IMGKIT_BASE_DIR"] = os.path.abspath(value)
        return value
    return click.option("--base-dir", type=click.Path(file_okay=False), expose_value=False, callback=remember,
                        is_eager=True, metavar="DIR",
                        help="Where the parents of an incremental image are (default: next to it).")(f)


def password_options(f):
    """--password-file, and --base-dir: every command that opens an image may open a chain."""
    f = base_dir_option(f)
    f = click.option("--password-file", type=click.Path(dir_okay=False),
                     help="Read the password from this file (first line). Also: IMGKIT_PASSWORD.")(f)
    return f


def make_progress(op: str, mode: str, total: int = 0) -> Progress:
    return Progress(op, total, mode)


MAX_PASSWORD_BYTES = 4096  # a password longer than this is a mistake (a wrong file, /dev/zero)


def password_from_env_or_file(password_file: str | None, env_var: str = "IMGKIT_PASSWORD") -> bytes | None:
    if password_file:
        try:
            with open(password_file, "rb") as fh:
                # Only the first line is the password, so never read more than one line's bound:
                # `--password-file /dev/zero` or a huge file fails at once instead of filling memory.
                head = fh.read(MAX_PASSWORD_BYTES + 2)
        except OSError as e:
            raise InputError(f"{password_file}: cannot read the password file ({e.strerror})") from None
        # The first line, without its line end (a file edited on Windows ends in \r\n).
        line, newline, _ = head.partition(b"\n")
        line = line.rstrip(b"\r")
        if len(line) > MAX_PASSWORD_BYTES or (not newline and len(head) > MAX_PASSWORD_BYTES + 1):
            raise InputError(f"{password_file}: the password (its first line) is longer than "
                             f"{MAX_PASSWORD_BYTES} bytes", hint="is this the right file?")
        if not line:
            raise InputError(f"{password_file}: the password file is empty")
        return line
    env = os.environb.get(env_var.encode())  # raw bytes: no decoding error on odd locales
    if env:
        if len(env) > MAX_PASSWORD_BYTES:
            raise InputError(f"{env_var} is longer than {MAX_PASSWORD_BYTES} bytes")
        return env
    return None


def reading_password(password_file: str | None):
    """A provider asked only when the image turns out to be encrypted: file, env, else a prompt.
    The answer is kept, so a command that opens the image twice (plan, then restore) asks once."""
    answer: list[bytes] = []

    def provide() -> bytes:
        if answer:
            return answer[0]
        known = password_from_env_or_file(password_file)
        if known is None:
            if not sys.stdin.isatty():
                raise InputError("the image is encrypted and no password was given",
                                 hint="use --password-file or IMGKIT_PASSWORD, or run on a terminal")
            known = click.prompt("Password", hide_input=True, err=True).encode()
        answer.append(known)
        return known
    return provide


def new_password(password_file: str | None, env_var: str = "IMGKIT_PASSWORD",
                 file_option: str = "--password-file", what: str = "--encrypt") -> bytes:
    """For a new encrypted image (or `passwd`): file, env, else prompt twice."""
    known = password_from_env_or_file(password_file, env_var)
    if known is not None:
        return known
    if not sys.stdin.isatty():
        raise InputError(f"{what} needs a new password", hint=f"use {file_option} or {env_var}, or a terminal")
    pw = click.prompt("New password", hide_input=True, confirmation_prompt="Repeat the password", err=True)
    if not pw:
        raise InputError("an empty password is not allowed")
    return pw.encode()


class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        try:
            return parse_size(value)
        except InputError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()


class SplitSizeType(click.ParamType):
    """A volume size for --split-size: 650M, 4000M, or a preset (fat32, dvd)."""
    name = "SIZE|fat32|dvd"

    def get_metavar(self, param, ctx=None):  # click would upper-case the preset names
        return self.name

    def convert(self, value, param, ctx):
        try:
            return parse_split_size(value)
        except InputError as e:
            self.fail(f"{e} ({e.hint})" if e.hint else str(e), param, ctx)


SPLIT_SIZE = SplitSizeType()
