#!/usr/bin/env bash
# Start a throw-away single-node Ceph cluster (mon, mgr, memstore OSD, radosgw on 127.0.0.1) without
# systemd, for trying imgkit's s3:// and rbd: locations and for bench/bench_ceph.py. The tests start
# their own (tests/ceph_fixtures.py). Prints the environment a client needs; `eval` it:
#   eval "$(./scripts/ceph-up.sh /tmp/ceph)"; imgkit capture disk.raw s3://bucket/disk.imgk
# Stop it with ./scripts/ceph-down.sh /tmp/ceph (keep the path short: Ceph's admin sockets live in it).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-${TMPDIR:-/tmp}/imgkit-ceph}
"$here/.venv/bin/python" -m imgkit.testing.ceph_cluster up "$dir" | sed 's/^/export /'
