#!/usr/bin/env bash
# Run the main job: installs into .venv first (idempotent), then `fm-train launch` with the given
# arguments (none: cluster_configs/local.yaml, a complete small job on a private local Ray instance).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/fm-train" launch "$@"
