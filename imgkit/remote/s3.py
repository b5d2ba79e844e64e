"""Images in S3 object storage (Ceph's radosgw or any S3-compatible service), through botocore
(boto3's core: the same client, without boto3's and s3transfer's import time).

A location is `s3://bucket/key`; a split image's volume n > 1 is the object `key.NNN`, as on disk.
The endpoint and credentials come from the SDK's usual places (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/config and credentials); the CLI's
--endpoint-url sets AWS_ENDPOINT_URL_S3 for the process.

Reading (S3Object): ranged GETs of whole stored chunks (at least MIN_GET bytes), or, for a pass in
order (restore, verify, convert), of large windows fetched ahead of the reads; each GET carries
If-Match on the ETag seen at open, so an object replaced while it is read fails instead of mixing two
images. Writing (MultipartSink): a multipart upload with parts uploaded in parallel from a bounded
queue, each with the signed SHA-256 of its body (the service checks it before storing the part); the
object exists only after CompleteMultipartUpload, and any failure or Ctrl-C aborts the upload.

Why PyPI's botocore and not the Debian package: boto3's transfer defaults are the peer the benchmark
compares with, and the version from PyPI has request_checksum_calculation, which must be
"when_required" for radosgw 16 (Pacific), which rejects the CRC trailers newer SDKs send by default.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from ..errors import BadImage, EnvironmentProblem, InputError
from .locations import S3_PREFIX as PREFIX

MiB = 1 << 20
MIN_PART = 5 * MiB           # S3's minimum size of every part but the last
PART_SIZE = 8 * MiB          # 1 GiB -> 128 parts; 10,000 parts -> 78 GiB per object (see part_size_for)
MAX_PARTS = 10_000
UPLOAD_WORKERS = 8           # parts in flight; memory bound = (workers + 2) * part size
WINDOW = 8 * MiB             # sequential readers: one GET per window of consecutive stored chunks,
AHEAD = 4                    # this many windows fetched ahead of the furthest read,
MAX_WINDOWS = AHEAD + 4      # and at most this many held (64 MiB)
# A GET is never smaller than this: radosgw (beast) sends a response of less than 64 KiB so that the
# client's delayed ACK holds it ~44 ms (measured on loopback: 1-32 KiB GETs 44-50 ms, 64 KiB 3-5 ms).
# A shorter read is served from such a block; the last SMALL_BLOCKS are kept (256 KiB).
MIN_GET = 64 << 10
SMALL_BLOCKS = 4
RETRIES = 8                  # botocore's standard mode: exponential backoff with jitter


def part_size_for(expected_size: int) -> int:
    """A part size that fits an object of about `expected_size` bytes in MAX_PARTS parts."""
    need = -(-expected_size * 11 // 10 // (MAX_PARTS - 100))  # 10% slack for incompressible data
    return max(PART_SIZE, -(-need // MiB) * MiB)


def split_url(url: str) -> tuple[str, str]:
    """(bucket, key) of s3://bucket/key, checked."""
    rest = url[len(PREFIX):]
    bucket, _, key = rest.partition("/")
    if not (3 <= len(bucket) <= 63) or not all(c.isalnum() or c in "-." for c in bucket):
        raise InputError(f"{url}: bad bucket name {bucket!r}",
                         hint="bucket names are 3-63 lower-case letters, digits, '-' and '.'")
    if not key or key.endswith("/"):
        raise InputError(f"{url}: no object key", hint="name the image: s3://bucket/path/name.imgk")
    return bucket, key


_client = None
_client_lock = threading.Lock()


def client():
    """One S3 client for the process (clients are thread-safe; sessions are not)."""
    global _client
    with _client_lock:
        if _client is None:
            _client = new_client()
        return _client


def new_client():
    """A new S3 client with imgkit's settings."""
    # botocore imports urllib3.contrib.pyopenssl only to get back the stdlib SSLContext that pyOpenSSL
    # would replace (nothing here injects pyOpenSSL); where pyOpenSSL is installed (Debian's
    # python3-openssl) that import loads OpenSSL and cryptography's bindings. Blocked, botocore takes
    # the same class from urllib3.util.ssl_: measured, the import and the client take 0.15 s instead
    # of 0.24 s (medians of 10), of a restore's 0.5 s.
    sys.modules.setdefault("urllib3.contrib.pyopenssl", None)
    try:
        import botocore.session
        from botocore.config import Config
    except ImportError:
        raise EnvironmentProblem("botocore is not installed", hint="run ./scripts/setup.sh") from None
    config = Config(
        s3={"addressing_style": "path",  # radosgw and most S3-compatible services; no DNS per bucket
            # The service's checksum of every part: the SHA-256 of its body, signed, which the service
            # checks before it stores the part (radosgw: XAmzContentSHA256Mismatch). botocore sends it
            # over http anyway; this sends it over https too. It replaced Content-MD5: MD5 runs at
            # 235-600 MiB/s here, SHA-256 at 1.7 GB/s (SHA-NI), and over http both were computed.
            "payload_signing_enabled": True},
        retries={"max_attempts": RETRIES, "mode": "standard"},
        max_pool_connections=max(UPLOAD_WORKERS, AHEAD) * 2,
        connect_timeout=10, read_timeout=120,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    # botocore's own session, not boto3's: the same client, without importing boto3 and its
    # s3transfer (measured: 0.2 s of a 0.5 s restore's start).
    return botocore.session.Session().create_client("s3", config=config)


def reset_client() -> None:
    """Forget the client (after the endpoint or credentials in the environment changed)."""
    global _client, _client_lock
    _client_lock = threading.Lock()
    _client = None


# A forked child (the mount's daemon) must not share the parent's pooled connections.
os.register_at_fork(after_in_child=reset_client)


def describe_error(e: BaseException, url: str) -> InputError:
    """A one-line error for a failed S3 request."""
    from botocore.exceptions import (BotoCoreError, ClientError, EndpointConnectionError,
                                     NoCredentialsError)
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "404", "NotFound"):
            return InputError(f"{url}: no such object")
        if code == "NoSuchBucket":
            return InputError(f"{url}: no such bucket")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return InputError(f"{url}: access denied ({code})", hint="check AWS_ACCESS_KEY_ID / AWS_PROFILE")
        if code in ("PreconditionFailed", "412"):
            return BadImage(f"{url} changed while it was being read")
        return InputError(f"{url}: S3 request failed ({code or status})")
    if isinstance(e, NoCredentialsError):
        return InputError(f"{url}: no S3 credentials",
                          hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(e, EndpointConnectionError):
        return InputError(f"{url}: cannot reach the S3 endpoint ({e.kwargs.get('endpoint_url')})",
                          hint="set --endpoint-url or AWS_ENDPOINT_URL_S3")
    if isinstance(e, BotoCoreError):
        return InputError(f"{url}: S3 request failed ({e})")
    raise e


def _s3_errors(url: str):
    """except-clause helper: the botocore exception classes."""
    from botocore.exceptions import BotoCoreError, ClientError
    return (BotoCoreError, ClientError)


def exists(url: str) -> bool:
    bucket, key = split_url(url)
    try:
        client().head_object(Bucket=bucket, Key=key)
        return True
    except _s3_errors(url) as e:
        err = describe_error(e, url)
        if "no such object" in str(err):
            return False
        raise err from None


def delete(url: str) -> None:
    bucket, key = split_url(url)
    try:
        client().delete_object(Bucket=bucket, Key=key)
    except _s3_errors(url) as e:
        raise describe_error(e, url) from None


class S3Object:
    """A byte source over one object: pread by ranged GET (thread-safe).

    Two ways to read. By default every pread is one GET of the bytes asked (at least MIN_GET): a
    mount reads only the chunks it needs. After read_sequentially() (restore, verify, convert: a
    pass over the image in order), the object is fetched in WINDOW-sized GETs, AHEAD of them in
    flight ahead of the furthest read, and preads are served from them; a window is dropped once
    every byte of it was read (a pass reads each byte once), and at most MAX_WINDOWS are held."""

    def __init__(self, url: str):
        self.url = url
        self.bucket, self.key = split_url(url)
        try:
            head = client().head_object(Bucket=self.bucket, Key=self.key)
        except _s3_errors(url) as e:
            raise describe_error(e, url) from None
        self.size = head["ContentLength"]
        self.etag = head["ETag"]
        self.mtime_ns = int(head["LastModified"].timestamp() * 1e9)
        self.requests = 0
        self.bytes_read = 0
        self._count_lock = threading.Lock()
        self._sequential = False
        self._win_lock = threading.Lock()
        self._windows: dict[int, object] = {}  # window number -> (offset, bytes), or an Event while fetched
        self._pass_start = 0  # windows hold no byte below this (read_sequentially)
        self._pass = 0  # read_sequentially's count: a fetch begun in an earlier pass is not kept
        self._served: dict[int, int] = {}  # window number -> bytes of it handed out so far
        self._done: set[int] = set()  # windows read through in this pass: not fetched ahead again
        self._last_use: dict[int, int] = {}  # window number -> tick of its last fill or read
        self._tick = 0
        self._ahead = None  # ThreadPoolExecutor for read-ahead, made by read_sequentially()
        self._small_blocks: deque[tuple[int, bytes]] = deque(maxlen=SMALL_BLOCKS)
        self._small_lock = threading.Lock()
        self.windows_fetched = 0
        self.peak_windows = 0

    def read_sequentially(self, start: int = 0) -> None:
        """The consumer will read (nearly) all of the object from `start` on, once, in order
        (restore, verify, convert: what follows an imgk volume's header): fetch it in large windows
        ahead of the reads, none of them below `start`, so that the first window too is read
        through and dropped. A new pass (a verify after a restore) starts from nothing: what the
        last one held or was fetching is dropped (its windows may begin elsewhere, and their
        bookkeeping counts the old pass's reads), so every window held belongs to this pass."""
        with self._win_lock:
            self._sequential = True
            self._pass += 1
            self._pass_start = start
            self._windows.clear()  # an old pass's fetch still running wakes its own waiters, keeps nothing
            self._served.clear()
            self._last_use.clear()
            self._done.clear()
            if self._ahead is None:
                self._ahead = ThreadPoolExecutor(max_workers=AHEAD, thread_name_prefix="imgkit-s3-ahead")

    def pread(self, length: int, offset: int) -> bytes:
        if length <= 0 or offset >= self.size:
            return b""
        end = min(self.size, offset + length)
        if not self._sequential or offset < self._pass_start:
            if end - offset < MIN_GET:
                return self._small_read(offset, end)
            return self._get(offset, end - 1)
        first, last = offset // WINDOW, (end - 1) // WINDOW
        self._fetch_ahead(last)
        parts = []
        for w in range(first, last + 1):
            base, data = self._window(w)
            lo, hi = max(offset, w * WINDOW), min(end, base + len(data))
            parts.append(data[lo - base:hi - base])
            self._served_bytes(w, hi - lo, len(data))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _small_read(self, offset: int, end: int) -> bytes:
        """[offset, end), shorter than MIN_GET, from a MIN_GET block: one already fetched if it holds
        the range (opening reads header, trailer, directory and sections: 2 GETs instead of 7), else
        a new one, extended backwards at the object's end (the trailer is read first, then what
        precedes it)."""
        with self._small_lock:
            for start, data in self._small_blocks:
                if start <= offset and end <= start + len(data):
                    return data[offset - start:end - start]
        bend = min(self.size, offset + MIN_GET)
        bstart = max(0, bend - MIN_GET)
        data = self._get(bstart, bend - 1)
        with self._small_lock:
            self._small_blocks.append((bstart, data))
        return data[offset - bstart:end - bstart]

    def _fetch_ahead(self, last: int) -> None:
        """Start fetching the AHEAD windows after window `last` that are neither held, nor being
        fetched, nor already read through."""
        count = -(-self.size // WINDOW)
        with self._win_lock:
            pool = self._ahead
            todo = [w for w in range(last + 1, min(last + 1 + AHEAD, count))
                    if w not in self._windows and w not in self._done]
            events = {w: threading.Event() for w in todo}
            self._windows.update(events)
        for w, event in events.items():
            try:
                pool.submit(self._fill, w)
            except (RuntimeError, AttributeError):  # closed meanwhile
                self._fill_failed(w, event)

    def _span(self, w: int) -> tuple[int, int]:
        """The bytes window w holds: [w*WINDOW, (w+1)*WINDOW), none before the pass's start."""
        return max(w * WINDOW, self._pass_start), min(self.size, (w + 1) * WINDOW)

    def _fill(self, w: int) -> tuple[int, bytes]:
        """Fetch window w, whose Event the caller placed, and wake its waiters; (its first byte's
        offset, its bytes). On an error the waiters fetch for themselves (and report it). A window
        whose pass ended meanwhile is returned to this reader but not kept."""
        with self._win_lock:
            event, this_pass = self._windows.get(w), self._pass
            lo, hi = self._span(w)
        try:
            data = (lo, self._get(lo, hi - 1))
        except BaseException:
            self._fill_failed(w, event)
            raise
        with self._win_lock:
            self.windows_fetched += 1
            if self._pass == this_pass:
                self._windows[w] = data
                self._used(w)
                self._evict()
        if isinstance(event, threading.Event):
            event.set()
        return data

    def _fill_failed(self, w: int, event) -> None:
        with self._win_lock:
            if self._windows.get(w) is event:  # not a newer pass's window
                del self._windows[w]
        if isinstance(event, threading.Event):
            event.set()

    def _evict(self) -> None:
        """Past MAX_WINDOWS (a pass that reads only part of each window, such as a restore of one
        partition, never reads a window through), drop the windows held that were used least
        recently (not the lowest: the window a pass reads now is lower than those fetched ahead, and
        a window left over from an earlier pass is lower or higher)."""
        held = sorted((self._last_use.get(w, 0), w) for w, d in self._windows.items() if isinstance(d, tuple))
        for _, w in held[:max(0, len(self._windows) - MAX_WINDOWS)]:  # least recently used first
            del self._windows[w]
            self._served.pop(w, None)
            self._last_use.pop(w, None)
        self.peak_windows = max(self.peak_windows, sum(1 for d in self._windows.values() if isinstance(d, tuple)))

    def _window(self, w: int) -> tuple[int, bytes]:
        """Window w: held, or being fetched (waited for), or fetched now by this reader while the
        others asking for it wait (the first window: every decoder starts there at once)."""
        with self._win_lock:
            got = self._windows.get(w)
            if got is None:
                self._windows[w] = threading.Event()
        if got is None:
            try:
                return self._fill(w)
            except Exception:
                pass  # fetched once more below, where the error is reported
        elif isinstance(got, threading.Event):
            got.wait()
            with self._win_lock:
                got = self._windows.get(w)
        if isinstance(got, tuple):
            return got
        # Dropped meanwhile, or its fetch failed: fetch it for this read alone.
        lo, hi = self._span(w)
        return lo, self._get(lo, hi - 1)

    def _used(self, w: int) -> None:
        self._tick += 1
        self._last_use[w] = self._tick

    def _served_bytes(self, w: int, n: int, window_length: int) -> None:
        with self._win_lock:
            served = self._served.get(w, 0) + n
            if served >= window_length:  # read through: nobody in this pass needs it again
                self._windows.pop(w, None)
                self._served.pop(w, None)
                self._last_use.pop(w, None)
                self._done.add(w)
            else:
                self._served[w] = served
                self._used(w)

    def _get(self, offset: int, end: int) -> bytes:
        try:
            resp = client().get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={offset}-{end}",
                                       IfMatch=self.etag)
            want = end - offset + 1
            if resp["ContentLength"] != want:
                # A service or proxy that ignores Range answers with the whole object: refused before
                # its body is read, so memory stays bounded by the windows, and no misplaced bytes.
                resp["Body"].close()
                raise BadImage(f"{self.url}: the service answered a GET of {want} bytes (range "
                               f"{offset}-{end}) with {resp['ContentLength']} bytes")
            data = resp["Body"].read()
        except _s3_errors(self.url) as e:
            raise describe_error(e, self.url) from None
        with self._count_lock:
            self.requests += 1
            self.bytes_read += len(data)
        return data

    def will_need(self, offset: int, length: int) -> None:
        pass  # sequential passes fetch windows ahead (read_sequentially); a mount reads what it needs

    def close(self) -> None:
        with self._win_lock:
            pool, self._ahead = self._ahead, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._win_lock:
            events = [d for d in self._windows.values() if isinstance(d, threading.Event)]
            self._windows.clear()
            self._served.clear()
            self._last_use.clear()
        for e in events:  # a cancelled fetch: its waiters fetch for themselves
            e.set()


class MultipartSink:
    """An object written front to back by a multipart upload, visible only after complete().

    write() appends; parts of PART_SIZE go to a pool of UPLOAD_WORKERS uploaders, and write() blocks
    while UPLOAD_WORKERS parts are in flight (bounded memory). The first part is kept until complete()
    because a writer patches its first bytes last (the imgk header learns the volume count at commit):
    pwrite_head() does that. abort() (on any failure) aborts the upload: no object appears, and the
    parts already stored are freed by the service."""

    def __init__(self, url: str, part_size: int = PART_SIZE, workers: int = UPLOAD_WORKERS):
        self.url = url
        self.bucket, self.key = split_url(url)
        self.part_size = max(part_size, MIN_PART)
        self.size = 0
        self._buf = bytearray()
        self._head: bytes | None = None  # part 1, uploaded at complete()
        self._parts: dict[int, str] = {}
        self._next_part = 2  # part 1 is the held-back head
        self._futures = []
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgkit-s3")
        self._slots = threading.BoundedSemaphore(workers)
        self._done = False
        self.seconds_blocked = 0.0
        try:
            self.upload_id = client().create_multipart_upload(Bucket=self.bucket, Key=self.key)["UploadId"]
        except _s3_errors(url) as e:
            self._pool.shutdown()
            raise describe_error(e, url) from None

    def write(self, data) -> int:
        offset = self.size
        self._buf += data
        self.size += len(data)
        while len(self._buf) >= self.part_size:
            if self._head is None:  # part 1 is kept back until complete()
                self._head = bytes(self._buf[:self.part_size])
                del self._buf[:self.part_size]
                continue
            part = bytes(self._buf[:self.part_size])
            del self._buf[:self.part_size]
            self._submit(part)
        return offset

    def pwrite_head(self, data: bytes, offset: int) -> None:
        """Overwrite bytes [offset, offset+len) that still lie in the held-back first part."""
        if self._head is not None:
            if offset + len(data) > len(self._head):
                raise ValueError("pwrite_head beyond the first part")
            self._head = self._head[:offset] + data + self._head[offset + len(data):]
        else:
            if offset + len(data) > len(self._buf):
                raise ValueError("pwrite_head beyond the buffered bytes")
            self._buf[offset:offset + len(data)] = data

    def _check_failures(self) -> None:
        for f in [f for f in self._futures if f.done()]:
            f.result()  # raises the upload's error
            self._futures.remove(f)

    def _submit(self, data: bytes, number: int | None = None) -> None:
        if number is None:
            number = self._next_part
            self._next_part += 1
        if number > MAX_PARTS:
            raise InputError(f"{self.url}: object too large for {MAX_PARTS} parts of {self.part_size} bytes")
        started = time.monotonic()
        self._slots.acquire()
        self.seconds_blocked += time.monotonic() - started
        self._check_failures()
        self._futures.append(self._pool.submit(self._upload, number, data))

    def _upload(self, number: int, data: bytes) -> None:
        try:
            # The body's signed SHA-256 goes with it (new_client): a part that arrives damaged is
            # refused, and the capture fails (the upload is aborted) instead of storing it.
            resp = client().upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                        PartNumber=number, Body=data)
            self._parts[number] = resp["ETag"]
        except _s3_errors(self.url) as e:
            raise describe_error(e, self.url) from None
        finally:
            self._slots.release()

    def complete(self) -> None:
        """Upload what is left and complete the upload: the object appears now, whole."""
        head = self._head if self._head is not None else bytes(self._buf)
        tail = bytes(self._buf) if self._head is not None else b""
        if tail:
            self._submit(tail)
        self._submit(head, 1)
        for f in self._futures:
            f.result()
        self._futures.clear()
        parts = [{"PartNumber": n, "ETag": e} for n, e in sorted(self._parts.items())]
        try:
            client().complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                               MultipartUpload={"Parts": parts})
            self._done = True
            self._pool.shutdown()
            stored = client().head_object(Bucket=self.bucket, Key=self.key)["ContentLength"]
        except _s3_errors(self.url) as e:
            raise describe_error(e, self.url) from None
        if stored != self.size:  # never trust a completed object blindly: it is what users will restore
            try:
                client().delete_object(Bucket=self.bucket, Key=self.key)
            except Exception:
                pass
            raise BadImage(f"{self.url}: the service stored {stored} bytes, {self.size} were written")

    def sync(self) -> None:
        pass  # durability is the service's: the object exists only once complete() returned

    def publish(self) -> None:
        self.complete()

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        for f in self._futures:
            f.cancel()
        self._pool.shutdown(wait=True)
        try:
            client().abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
        except Exception:
            pass  # best effort; `imgkit s3-cleanup` lists and aborts leftovers


def abort_incomplete_uploads(url_prefix: str, older_than: float = 0.0) -> list[str]:
    """Abort the incomplete multipart uploads under s3://bucket/prefix started more than
    `older_than` seconds ago (a killed capture cannot abort its own); the keys aborted."""
    bucket, _, prefix = url_prefix[len(PREFIX):].partition("/")
    if len(bucket) < 3:
        raise InputError(f"{url_prefix}: bad bucket name")
    aborted = []
    now = time.time()
    try:
        pages = client().get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for u in page.get("Uploads", []):
                if now - u["Initiated"].timestamp() < older_than:
                    continue
                client().abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
                aborted.append(u["Key"])
    except _s3_errors(url_prefix) as e:
        raise describe_error(e, url_prefix) from None
    return aborted
