"""S3Object's window bookkeeping across passes (imgkit/remote/s3.py), against a stand-in for the S3
client (head_object and ranged get_object over bytes in memory), because the case it checks needs
a GET held back on demand: a window fetch of one pass finishing after the next pass began. Real
passes over real radosgw are in tests/test_s3.py."""
from __future__ import annotations

import datetime
import io
import threading
import time

import pytest

from imgkit.remote import s3

WINDOW = 64 << 10
DATA = bytes(range(256)) * (10 * WINDOW // 256)


class StandInClient:
    def __init__(self):
        self.gets: list[tuple[int, int]] = []
        self.hold: threading.Event | None = None   # GETs wait on it while it is set up
        self.held = threading.Event()

    def head_object(self, Bucket, Key):
        return {"ContentLength": len(DATA), "ETag": '"e"', "LastModified": datetime.datetime.now(datetime.timezone.utc)}

    def get_object(self, Bucket, Key, Range, IfMatch):
        lo, hi = map(int, Range.removeprefix("bytes=").split("-"))
        self.gets.append((lo, hi))
        if self.hold is not None and lo >= WINDOW:  # the read-ahead of window 1 on
            self.held.set()
            self.hold.wait(10)
        body = DATA[lo:hi + 1]
        return {"ContentLength": len(body), "Body": io.BytesIO(body)}


@pytest.fixture
def obj(monkeypatch):
    fake = StandInClient()
    monkeypatch.setattr(s3, "client", lambda: fake)
    monkeypatch.setattr(s3, "WINDOW", WINDOW)
    monkeypatch.setattr(s3, "AHEAD", 2)
    o = s3.S3Object("s3://bucket/image.imgk")
    yield o, fake
    o.close()


def test_a_new_pass_starts_from_nothing_and_reads_the_right_bytes(obj):
    o, fake = obj
    o.read_sequentially(0)
    assert o.pread(WINDOW // 2, 0) == DATA[:WINDOW // 2]   # window 0 half read: held, counted
    o.read_sequentially(4096)                              # another pass, beginning elsewhere
    assert o._windows == {} and o._served == {} and o._done == set()
    got = b"".join(o.pread(WINDOW // 4, off) for off in range(4096, len(DATA), WINDOW // 4))
    assert got == DATA[4096:]
    assert len(o._windows) <= 1


def test_a_fetch_of_an_earlier_pass_is_not_kept(obj):
    o, fake = obj
    fake.hold = threading.Event()
    o.read_sequentially(0)
    assert o.pread(100, 0) == DATA[:100]   # starts the read-ahead of windows 1 and 2: held back
    assert fake.held.wait(10)
    o.read_sequentially(WINDOW + 10)       # the next pass begins inside window 1
    fake.hold.set()                        # the old pass's fetches of windows 1 and 2 finish now
    deadline = time.monotonic() + 10
    while o.windows_fetched < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert o.windows_fetched == 3  # window 0 (the read) and the two fetched ahead
    assert not [w for w, d in o._windows.items() if isinstance(d, tuple)]  # nothing of the old pass kept
    fake.hold = None
    got = b"".join(o.pread(WINDOW // 4, off) for off in range(WINDOW + 10, len(DATA), WINDOW // 4))
    assert got == DATA[WINDOW + 10:]
