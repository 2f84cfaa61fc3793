#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install fm-train into it.
# Idempotent: a stamp keyed by the hash of pyproject.toml skips the install when nothing changed.
# On a machine without an NVIDIA GPU the CPU wheel of torch is installed first, so that pip never
# pulls a multi-GB CUDA build. GPU users: set FM_TRAIN_TORCH="torch==<version>" (a CUDA build) or
# pre-install torch in the venv; see README.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FM_TRAIN_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.fm-train-install-stamp"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[bootstrap] creating virtual environment at $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  exit 0
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
"${PIP[@]}" --quiet --upgrade pip >&2
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [[ -n "${FM_TRAIN_TORCH:-}" ]]; then
    TORCH_SPEC="$FM_TRAIN_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    TORCH_SPEC="torch"          # a CUDA build from PyPI
  else
    TORCH_SPEC="torch==2.13.0"  # the CPU wheel
  fi
  echo "[bootstrap] installing $TORCH_SPEC" >&2
  "${PIP[@]}" "$TORCH_SPEC" >&2
fi
echo "[bootstrap] installing fm-train and its dependencies (first time: about 2 minutes)" >&2
"${PIP[@]}" -e "$ROOT[test]" >&2
echo "$WANT" > "$STAMP"
