"""Resume loads no arbitrary pickles: a checkpoint file holding an object whose unpickling runs code is
refused, naming the file, on the same layout (DeepSpeed's load through fm-train's checkpoint engine)
and on a dp change (fm-train's resharding reads every file ``weights_only``); a step directory holding
a symlink is refused naming it; ``checkpoint.trust_pickles`` loads it anyway. The payload only creates
a directory, so the test can see whether it ran."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import test_checkpoint_support as S
from distributed import run_distributed

pytestmark = pytest.mark.multiproc


class Payload:
    """Unpickling this calls ``os.makedirs(marker)``: what a hostile checkpoint would do with worse."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker, 0o777, True)


def _plant(step_dir: Path, rel: str, marker: Path) -> None:
    """Add a payload to ``rel`` and rewrite the manifest's size and checksum to match, as an attacker
    would: the integrity check passes, only the unpickling rule can stop it."""
    path = step_dir / rel
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["extra"] = Payload(marker)
    torch.save(state, path)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"][rel] = path.stat().st_size
    manifest["checksums"]["files"][rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


def _save_once(raw: dict, run_dir: str) -> None:
    S.run_and_save(raw, run_dir, 2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A ZeRO-2 dp2 run with one checkpoint at step 2 (``root/run``, tokenizer in ``root/data``)."""
    root = tmp_path_factory.mktemp("pickles")
    S.write_tokenizer(root / "data")
    run_distributed(_save_once, 2, args=(S.run_raw(root / "data", root / "run"), str(root / "run")))
    return root


def test_the_checkpoint_engine_refuses_a_pickle_that_runs_code(tmp_path: Path) -> None:
    from fm_train.checkpoint import CheckpointError
    from fm_train.deepspeed_adapter.ckpt_engine import GuardedCheckpointEngine

    marker = tmp_path / "ran"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": Payload(marker)}, path)
    guard = GuardedCheckpointEngine(inner=None, trust=False)
    with pytest.raises(CheckpointError, match=f"{path} does not load with weights_only=True .*checkpoint.trust_pickles"):
        guard.load(str(path), map_location="cpu")
    assert not marker.exists()
    trusted = GuardedCheckpointEngine(inner=None, trust=True).load(str(path), map_location="cpu")
    assert marker.is_dir() and torch.equal(trusted["module"]["w"], torch.ones(2))


@pytest.mark.parametrize("rel", ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_resume_refuses_a_planted_pickle_naming_the_file(saved: Path, tmp_path: Path, rel: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(saved / "run", run)
    marker = tmp_path / "payload-ran"
    _plant(run / "checkpoints/step_00000002", rel, marker)
    got = run_distributed(S.resume_auto, 2, args=(S.run_raw(saved / "data", run), str(run), 3))
    errors = [r.get("error", "") for r in got]
    # Each rank refuses the files it loads (rank 1 alone loads its optimizer partition).
    # Checked before DeepSpeed reads anything: every rank refuses alike, none is left in a collective.
    assert all(f"{rel} does not load with weights_only=True" in e for e in errors), got
    assert all("checkpoint.trust_pickles=true" in e for e in errors), got
    assert not marker.exists(), "the payload ran"


def test_a_dp_change_checks_pickles_before_resharding(saved: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(saved / "run", run)
    marker = tmp_path / "payload-ran"
    _plant(run / "checkpoints/step_00000002", "zero_pp_rank_1_mp_rank_00_optim_states.pt", marker)
    got = run_distributed(S.resume_auto, 1, args=(S.run_raw(saved / "data", run, workers=1), str(run), 3))[0]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt does not load with weights_only=True" in got.get("error", ""), got
    assert not marker.exists() and not (run / "checkpoints/step_00000002/universal").exists()


def _crafted_universal(step_dir: Path, where: Path, marker: Path) -> None:
    """What DeepSpeed's universal loader would read for one parameter: ``universal/zero/<name>/fp32.pt``,
    holding a payload, written in ``where`` (outside the step or inside it)."""
    where.mkdir(parents=True)
    torch.save({"param": torch.ones(2), "extra": Payload(marker)}, where / "fp32.pt")


@pytest.mark.parametrize("linked", [True, False], ids=["symlinked-folder", "planted-folder"])
def test_a_cached_universal_folder_is_never_loaded(saved: Path, tmp_path: Path, linked: bool) -> None:
    """Issue 25, finding 1: a dp-size change reused ``step_*/universal/``, which no checksum covers, and
    DeepSpeed unpickled a crafted ``fp32.pt`` in a symlinked folder of it. Now a symlink anywhere in a
    step refuses the step (naming it), and a planted folder is never read: the dp change is resharded
    from the files the manifest vouches for."""
    run = tmp_path / "run"
    shutil.copytree(saved / "run", run)
    marker = tmp_path / "payload-ran"
    step = run / "checkpoints/step_00000002"
    zero = step / "universal/zero"
    zero.mkdir(parents=True)
    if linked:
        _crafted_universal(step, tmp_path / "elsewhere/embed_tokens.weight", marker)
        (zero / "embed_tokens.weight").symlink_to(tmp_path / "elsewhere/embed_tokens.weight", target_is_directory=True)
    else:
        _crafted_universal(step, zero / "embed_tokens.weight", marker)
    got = run_distributed(S.resume_auto, 1, args=(S.run_raw(saved / "data", run, workers=1), str(run), 3))[0]
    assert not marker.exists(), "the payload ran"
    if linked:
        assert "universal/zero/embed_tokens.weight (a symlink" in got.get("error", ""), got
    else:
        assert got.get("step") == 2, got


def test_trust_pickles_loads_it(saved: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(saved / "run", run)
    marker = tmp_path / "payload-ran"
    _plant(run / "checkpoints/step_00000002", "mp_rank_00_model_states.pt", marker)
    got = run_distributed(S.resume_auto, 2, args=(S.run_raw(saved / "data", run, trust_pickles=True), str(run), 3))
    assert all(r.get("step") == 2 for r in got), got
    assert marker.is_dir()


def _resume_counting_guarded_loads(raw: dict, run_dir: str) -> list[str]:
    """Resume, recording the files DeepSpeed loaded through fm-train's guarded checkpoint engine."""
    from fm_train.deepspeed_adapter import ckpt_engine

    loaded: list[str] = []
    real = ckpt_engine.GuardedCheckpointEngine.load

    def load(self, path, map_location=None):
        loaded.append(Path(path).name)
        return real(self, path, map_location)

    ckpt_engine.GuardedCheckpointEngine.load = load
    result = S.resume_auto(raw, run_dir, 2)
    assert result.get("step") == 2, result
    return loaded


def test_deepspeed_loads_every_file_through_the_guarded_engine(saved: Path, tmp_path: Path) -> None:
    """The scan above is a second line: DeepSpeed's own reads go through the weights_only engine."""
    run = tmp_path / "run"
    shutil.copytree(saved / "run", run)
    loaded = run_distributed(_resume_counting_guarded_loads, 2, args=(S.run_raw(saved / "data", run), str(run)))
    assert "mp_rank_00_model_states.pt" in loaded[0] and "mp_rank_00_model_states.pt" in loaded[1]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in loaded[0], loaded
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in loaded[1], loaded
