"""``fm-train convert`` on every kind of damaged checkpoint a real run can leave or a copy can make:
one error line naming the file, exit status 2, and nothing at --out (no partial or temp directory).

The checkpoint is the final step of the session's reference run (a real launch); each case damages a
private copy. The command runs as a subprocess, exactly as a user types it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from chaos_runs import STEPS, RunResult, step_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def _no_manifest(d: Path) -> str:
    (d / "manifest.json").unlink()
    return "has no manifest.json"


def _missing_shard(d: Path) -> str:
    (d / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    return "zero_pp_rank_1_mp_rank_00_optim_states.pt (missing)"


def _truncated_shard(d: Path) -> str:
    path = d / "mp_rank_00_model_states.pt"
    os.truncate(path, path.stat().st_size // 2)
    return "mp_rank_00_model_states.pt ("


def _other_model(d: Path) -> str:
    # A manifest copied from a run of a wider model: right files, wrong shapes.
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["config"]["model"].update(hidden=128, ffn_hidden=344)
    (d / "manifest.json").write_text(json.dumps(manifest))
    return "does not match the model its manifest describes"


def _garbage_pt(d: Path) -> str:
    # Same size, so the manifest's size check passes; the checksum catches it before anything is unpickled.
    path = d / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    path.write_bytes(os.urandom(path.stat().st_size))
    return "is damaged: zero_pp_rank_0_mp_rank_00_optim_states.pt (sha256 differs"


def _garbage_pt_no_checksums(d: Path) -> str:
    # A manifest from before checksums: only loading the file can tell.
    manifest = json.loads((d / "manifest.json").read_text())
    del manifest["checksums"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    path = d / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    path.write_bytes(os.urandom(path.stat().st_size))
    return "zero_pp_rank_0_mp_rank_00_optim_states.pt is damaged: it does not load"


def _flipped_byte(d: Path) -> str:
    # One bit pattern changed in the middle of a rank's RNG file: same size, still a valid zip, maybe.
    path = d / "rng" / "rank_00001.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return "is damaged: rng/rank_00001.pt (sha256 differs"


def _garbage_json(d: Path) -> str:
    (d / "manifest.json").write_text('{"format": "fm-train-checkpoint", "step": ')
    return "is not valid JSON"


DAMAGE: dict[str, Callable[[Path], str]] = {
    "missing manifest": _no_manifest,
    "missing shard file": _missing_shard,
    "truncated shard file": _truncated_shard,
    "manifest from another model": _other_model,
    "garbage in a .pt": _garbage_pt,
    "garbage in a .pt, manifest without checksums": _garbage_pt_no_checksums,
    "flipped byte": _flipped_byte,
    "torn manifest.json": _garbage_json,
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint_is_refused_in_one_line(kind: str, tmp_path: Path,
                                                   reference: Callable[[int], RunResult]) -> None:
    damaged = tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}"
    shutil.copytree(step_dir(reference(11).run_dir, STEPS), damaged)
    expected = DAMAGE[kind](damaged)
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "fm_train.cli", "convert", str(damaged), "--out", str(out),
                           "--no-tokenizer", "--dtype", "fp32"], capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fm-train convert: error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert expected in errors[0] and str(damaged) in errors[0], errors[0]
    assert str(out) not in proc.stdout  # stdout carries the output path only on success
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "something was left next to --out"
