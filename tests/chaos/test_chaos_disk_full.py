"""The disk fills up while a checkpoint is being saved: the save fails with an error that says so, the
previous checkpoint stays complete and convertible, and the launcher (whose logs share the full disk)
reports the failure instead of crashing.

The run directory lives on a 5 MiB tmpfs: room for the shards of two tiny checkpoints (2 MiB each),
not three. Mounting needs root (CAP_SYS_ADMIN); elsewhere the test is skipped and says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from chaos_runs import failures, figure, latest_step, run_launch, step_dir, tiny_config, write_config

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.timeout(600)]

SIZE = "5m"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 5 MiB tmpfs mounted at tmp_path/small, unmounted afterwards."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine: cannot make a size-limited directory")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a {SIZE} tmpfs here (needs root/CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_disk_full_during_a_save(small_disk: Path, tmp_path: Path, corpus: Path) -> None:
    run = small_disk / "run"
    # keep=5: retention frees nothing, so the third save (step 18) runs out of room.
    config = write_config(tmp_path / "config.yaml", tiny_config(run, corpus, seed=11, keep=5, max_restarts=0))
    result = run_launch(config, run)
    assert result.code == 1
    [record] = failures(run)
    assert record["kind"] == "failed" and record["exit_code"] == 2
    # The worker reports a CheckpointError as one line (`fm-train worker: rank 0: saving ...`) and exits 2.
    error = next((line for line in record["last_lines"] if "fm-train worker: rank" in line), None)
    assert error is not None, record["last_lines"]
    assert "saving step_00000018" in error and "the previous checkpoint" in error and "step_00000012" in error
    assert "MiB free" in error and "free disk space or lower checkpoint.keep" in error
    # The previous checkpoint is complete, named by latest, and loads in the converter.
    assert latest_step(run) == 12
    assert not step_dir(run, 18).exists(), "the torn step directory should have been removed to give space back"
    from fm_train.convert import convert_checkpoint

    out = convert_checkpoint(run, tmp_path / "hf", dtype="fp32", no_tokenizer=True)
    assert "| steps | 12 |" in (out / "README.md").read_text()
    used = shutil.disk_usage(small_disk)
    figure(f"disk full ({SIZE} tmpfs) while saving step 18: one-line CheckpointError naming the step, free space and"
           f" the intact step 12; launch returns 1 in {result.seconds:.0f}s; step 12 converts"
           f" ({used.used / 2**20:.1f} MiB used at the end)")
    assert os.path.ismount(small_disk)
