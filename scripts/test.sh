#!/usr/bin/env bash
# Run the test suite: installs into .venv first (idempotent), then pytest.
# Default selection: the linter (ruff), then everything except tests marked `slow` (GPU tests skip cleanly
# without a GPU).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `bash scripts/test.sh tests/test_config.py`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [[ $# -eq 0 ]]; then
  # The whole default selection (what CI runs) starts with the linter: a few seconds, and an undefined
  # name or a stray import fails here instead of in a rank's traceback. Rules: pyproject.toml [tool.ruff].
  echo "[test] ruff check" >&2
  "$ROOT/.venv/bin/python" -m ruff check "$ROOT"
  set -- -m "not slow"
fi
exec "$ROOT/.venv/bin/python" -m pytest "$@"
