#!/usr/bin/env bash
# Run the test suite: installs into .venv first (idempotent), then pytest.
# Default selection: everything except tests marked `slow` (GPU tests skip cleanly without a GPU).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `bash scripts/test.sh tests/test_config.py`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [[ $# -eq 0 ]]; then
  set -- -m "not slow"
fi
exec "$ROOT/.venv/bin/python" -m pytest "$@"
