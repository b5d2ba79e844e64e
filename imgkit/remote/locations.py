"""Which locations name remote images: `s3://bucket/key` (an imgk image in an object store) and
`rbd:pool/image[@snap]` (a Ceph block image). Plain string tests, apart from s3.py and rbd_image.py so
that every command can ask them without loading either client."""
from __future__ import annotations

S3_PREFIX = "s3://"
RBD_PREFIX = "rbd:"


def is_s3(location) -> bool:
    return isinstance(location, str) and location.startswith(S3_PREFIX)


def is_rbd(location) -> bool:
    return isinstance(location, str) and location.startswith(RBD_PREFIX)
