#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install fm-train into it.
#
# Idempotent: a stamp keyed by the hash of pyproject.toml skips the install when nothing changed.
# Quiet: one line per stage with its elapsed time; pip's full output goes to .venv/install.log,
# whose tail is printed (with its path) when a stage fails.
#
# torch, chosen before fm-train's own dependencies so that pip never picks it on its own:
#   - FM_TRAIN_TORCH set: exactly that requirement, with pip's own index configuration;
#   - an NVIDIA GPU (nvidia-smi on PATH): PyPI's default torch, a CUDA build;
#   - otherwise torch==2.13.0 from PyTorch's CPU wheel index (FM_TRAIN_TORCH_CPU_INDEX overrides
#     https://download.pytorch.org/whl/cpu, e.g. for a mirror), falling back to the default index
#     with a one-line notice when that index cannot be reached.
# A torch already installed in the venv is kept.
#
# `source scripts/bootstrap.sh` defines the stage functions without running them (the tests do).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FM_TRAIN_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.fm-train-install-stamp"
LOG="$VENV/install.log"
TORCH_CPU_VERSION="2.13.0"
CPU_INDEX="${FM_TRAIN_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
PROBE_TIMEOUT_S=5
LOG_TAIL_LINES=40

say() { echo "[bootstrap] $*" >&2; }

pip_install() {
  "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off "$@"
}

# run_stage LABEL CMD...: print "LABEL ... N s" and send the command's output to $LOG.
# Returns the command's status; prints no log tail (the caller decides whether a failure is final).
run_stage() {
  local label="$1" start=$SECONDS rc=0
  shift
  printf '[bootstrap] %s ... ' "$label" >&2
  printf '\n=== %s\n$ %s\n' "$label" "$*" >>"$LOG"
  "$@" >>"$LOG" 2>&1 || rc=$?
  if ((rc == 0)); then
    echo "$((SECONDS - start)) s" >&2
  else
    echo "failed after $((SECONDS - start)) s (exit $rc)" >&2
  fi
  return "$rc"
}

# fail_with_log STATUS: the log's tail and its path, then exit with STATUS.
fail_with_log() {
  say "install failed; last $LOG_TAIL_LINES lines of $LOG:"
  tail -n "$LOG_TAIL_LINES" "$LOG" | sed 's/^/    /' >&2
  say "full log: $LOG"
  exit "$1"
}

# must_stage LABEL CMD...: run_stage, and a failure ends the install.
must_stage() {
  local rc=0
  run_stage "$@" || rc=$?
  ((rc == 0)) || fail_with_log "$rc"
}

has_nvidia_gpu() { command -v nvidia-smi >/dev/null 2>&1; }

# torch==2.13.0 from the CPU index, then its dependencies from the default index. Two steps, because
# in one (--index-url CPU --extra-index-url DEFAULT) pip merges both indexes: when the CPU index lacks
# the version for this Python or platform, pip silently takes the default index's (CUDA) wheel. With
# --no-deps and the CPU index alone, the torch wheel comes from there or the step fails; the second
# step then finds torch satisfied and installs only what it needs (sympy, networkx, jinja2, ...) with
# pip's own index settings. A short timeout keeps a link that drops mid-way from hanging for minutes.
pip_install_torch_from_cpu_index() {
  pip_install --timeout 30 --retries 2 --no-deps --index-url "$CPU_INDEX" "$1" && pip_install "$1"
}

install_torch_cpu() {
  local spec="torch==$TORCH_CPU_VERSION" why
  # The probe asks for the page pip would ask for first.
  if why="$("$VENV/bin/python" "$ROOT/scripts/index_reachable.py" --timeout "$PROBE_TIMEOUT_S" "${CPU_INDEX%/}/torch/" 2>&1)"; then
    if run_stage "torch $TORCH_CPU_VERSION (CPU index)" pip_install_torch_from_cpu_index "$spec"; then
      return 0
    fi
    say "notice: torch from PyTorch's CPU index ($CPU_INDEX) failed (see $LOG); installing $spec from the default index instead"
  else
    say "notice: PyTorch's CPU index ($CPU_INDEX) cannot be reached (${why:-no answer}); installing $spec from the default index instead (on Linux x86_64 PyPI's wheel is the CUDA build, several GB)"
  fi
  must_stage "torch $TORCH_CPU_VERSION (default index)" pip_install "$spec"
}

install_torch() {
  local have
  if have="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null)"; then
    say "torch $have already in the venv, kept"
  elif [[ -n "${FM_TRAIN_TORCH:-}" ]]; then
    must_stage "$FM_TRAIN_TORCH (FM_TRAIN_TORCH, pip's own index settings)" pip_install "$FM_TRAIN_TORCH"
  elif has_nvidia_gpu; then
    must_stage "torch (default index, CUDA build: nvidia-smi found)" pip_install torch
  else
    install_torch_cpu
  fi
}

main() {
  local want
  want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
  if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    exit 0
  fi
  mkdir -p "$VENV"
  : >"$LOG"
  if [[ ! -x "$VENV/bin/python" ]]; then
    must_stage "virtual environment $VENV" "$PY" -m venv "$VENV"
  fi
  say "installing into $VENV (pip's output: $LOG)"
  must_stage "pip" pip_install --upgrade pip
  install_torch
  must_stage "fm-train and its dependencies (first time: about 1-2 minutes)" pip_install -e "$ROOT[test]"
  echo "$want" >"$STAMP"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
