#!/usr/bin/env bash
# Run the whole test suite (installs what it needs first). Extra arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh"
cd "$here"
# No working KVM on the CI machines: libguestfs and QEMU use TCG (imgkit detects KVM for real users).
export PATH="$here/.venv/bin:$PATH"
export LIBGUESTFS_BACKEND=${LIBGUESTFS_BACKEND:-direct}
export LIBGUESTFS_BACKEND_SETTINGS=${LIBGUESTFS_BACKEND_SETTINGS:-force_tcg}
exec "$here/.venv/bin/python" -m pytest -q -rs "$@"
