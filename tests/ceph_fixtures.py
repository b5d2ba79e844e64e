"""One real single-node Ceph cluster (mon, mgr, memstore OSD, radosgw on 127.0.0.1) for the whole
session, started on first use (~4 s) and stopped at the end: see imgkit/testing/ceph_cluster.py.
Test modules import the fixtures: `from ceph_fixtures import bucket, ceph  # noqa: F401`."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid

import pytest

from imgkit.testing import ceph_cluster


@pytest.fixture(scope="session")
def ceph():
    """The running cluster; its endpoint, credentials and CEPH_CONF are in os.environ meanwhile (so
    the CLI run in subprocesses finds them the usual way)."""
    why = ceph_cluster.available()
    if why:
        pytest.fail(f"cannot start the test Ceph cluster: {why}")
    top = tempfile.mkdtemp(prefix="ick-", dir="/tmp")  # short: admin socket paths must stay < 108 bytes
    cluster = ceph_cluster.start(os.path.join(top, "c"))
    saved = {k: os.environ.get(k) for k in cluster.env()}
    os.environ.update(cluster.env())
    from imgkit.remote import s3
    s3.reset_client()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(top, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3.reset_client()


@pytest.fixture
def bucket(ceph):
    """A fresh bucket (names of 3+ characters; path-style addressing)."""
    from imgkit.remote import s3
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name
