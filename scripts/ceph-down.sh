#!/usr/bin/env bash
# Stop the cluster scripts/ceph-up.sh started in DIR (only the daemons it recorded) and delete DIR.
# KEEP=1 keeps the directory (logs).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
exec "$here/.venv/bin/python" -m imgkit.testing.ceph_cluster down "${1:-${TMPDIR:-/tmp}/imgkit-ceph}"
