"""platform/qmp.QmpClient against a stand-in monitor on a real Unix socket: what QEMU may send in one
write (a reply and an event together) must not lose the event."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

from imgkit.platform.qmp import QmpClient


def _serve(path, first_reply_extra: bytes):
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def run():
        conn, _ = srv.accept()
        conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        f = conn.makefile("rb")
        f.readline()  # qmp_capabilities
        # the reply and an event in one write, as a guest powering off right then produces
        conn.sendall(json.dumps({"return": {}}).encode() + b"\n" + first_reply_extra)
        f.readline()
        conn.close()
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_an_event_in_the_same_read_as_a_reply_is_queued(tmp_path):
    path = str(tmp_path / "qmp.sock")
    t = _serve(path, b'{"event": "SHUTDOWN", "data": {}}\n')
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        qmp = QmpClient(path, proc)
        assert [e["event"] for e in qmp.events] == ["SHUTDOWN"]
        qmp.close()
    finally:
        proc.kill()
        proc.wait()
    t.join(5)
