"""The smallest QMP (QEMU Machine Protocol) client that does boot-check's job: the capabilities
handshake, queued events, and commands such as screendump. No third-party QMP library needed."""
from __future__ import annotations

import json
import socket
import subprocess
import time


class QmpClient:
    """Connected to QEMU's `-mon chardev=...,mode=control` unix socket; waits for it to appear."""

    def __init__(self, path: str, proc: subprocess.Popen, wait: float = 10.0):
        deadline = time.monotonic() + wait
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.buf = b""
        self.events: list[dict] = []
        self._recv_until(lambda m: "QMP" in m)
        self.command("qmp_capabilities")

    def fileno(self) -> int:
        return self.sock.fileno()

    def _messages(self):
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError:
                    continue

    def pump(self) -> None:
        """Read what is waiting (after select said so) and queue the events."""
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buf += data
        for m in self._messages():
            if "event" in m:
                self.events.append(m)

    def _recv_until(self, done, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            found = None
            # Parse everything already received: an event that came in the same read as the
            # awaited reply must be queued now, since select() will not report it again.
            for m in self._messages():
                if "event" in m:
                    self.events.append(m)
                elif found is None and done(m):
                    found = m
            if found is not None:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("QMP did not answer")
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buf += data

    def command(self, name: str, **arguments) -> dict:
        self.sock.sendall(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
        reply = self._recv_until(lambda m: "return" in m or "error" in m)
        self.sock.settimeout(None)
        if "error" in reply:
            raise RuntimeError(reply["error"].get("desc", "QMP error"))
        return reply["return"]

    def close(self) -> None:
        self.sock.close()
