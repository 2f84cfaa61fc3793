"""Resume for real with DeepSpeed on gloo: same layout bit-identical, dp2 -> dp1 resharded by fm-train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist

import test_checkpoint_support as S
from distributed import run_distributed

pytestmark = pytest.mark.multiproc


def _train_save_continue(raw: dict, run_dir: str, save_at: int, last: int) -> list[float]:
    """Uninterrupted run 1..last that also saves at ``save_at`` (saving does not touch the state)."""
    from fm_train.checkpoint import save_checkpoint
    from fm_train.config import build_config

    cfg = build_config(raw)
    engine = S.build_engine(cfg)
    losses = S.train_steps(engine, 1, save_at)
    save_checkpoint(engine, Path(run_dir), save_at, manifest=S.make_manifest(cfg, save_at), keep=2,
                    is_rank0=dist.get_rank() == 0)
    return losses + S.train_steps(engine, save_at + 1, last)


def _resume_and_train(raw: dict, run_dir: str, last: int) -> dict:
    """A fresh process group: find the resume point, convert if needed, load, train to ``last``."""
    from fm_train.checkpoint import find_resume_point, load_checkpoint
    from fm_train.config import build_config
    from fm_train.engine.checkpointing import current_layout
    from fm_train.families import family_of

    cfg = build_config(raw)
    step_dir = find_resume_point(Path(run_dir), "auto")
    engine = S.build_engine(cfg)
    manifest = load_checkpoint(engine, step_dir, config=cfg, tokenizer_hash=S.tokenizer_hash_for(cfg),
                               layout=current_layout(cfg, family_of(cfg.model)))
    step = manifest["step"]
    return {"step": step, "path": str(step_dir), "tokens": manifest["tokens_seen"],
            "losses": S.train_steps(engine, step + 1, last)}


# bf16 ZeRO-1 runs DeepSpeed's BF16_Optimizer (fp32 gradient accumulation, its own checkpoint layout).
@pytest.mark.parametrize("zero_stage,precision", [(1, "fp32"), (3, "fp32"), (1, "bf16")])
def test_same_layout_resume_is_bit_identical(tmp_path: Path, zero_stage: int, precision: str) -> None:
    raw = S.tiny_raw(zero_stage, 2, precision=precision)
    full = run_distributed(_train_save_continue, 2, args=(raw, str(tmp_path), 5, 10))[0]
    resumed = run_distributed(_resume_and_train, 2, args=(raw, str(tmp_path), 10))[0]
    assert resumed["step"] == 5
    assert resumed["tokens"] == 5 * S.GLOBAL_BATCH * S.SEQ
    assert resumed["losses"] == full[5:]  # bit-identical, not approximately equal
    assert full[9] < full[0]  # it did train


@pytest.mark.parametrize("zero_stage,precision", [(2, "fp32"), (1, "bf16")])
def test_resume_dp2_to_dp1_resharded(tmp_path: Path, zero_stage: int, precision: str) -> None:
    full = run_distributed(_train_save_continue, 2, args=(S.tiny_raw(zero_stage, 2, precision=precision), str(tmp_path),
                                                          4, 8))[0]
    resumed = run_distributed(_resume_and_train, 1, args=(S.tiny_raw(zero_stage, 1, precision=precision), str(tmp_path),
                                                          8))[0]
    tol = 1e-4 if precision == "fp32" else 2e-2  # bf16: one rank sums the micro-batches in another order
    assert resumed["path"].endswith("step_00000004")
    assert not (tmp_path / "checkpoints/step_00000004/universal").exists()  # no DeepSpeed universal conversion
    assert len(resumed["losses"]) == 4
    for got, want in zip(resumed["losses"], full[4:]):
        assert abs(got - want) <= tol * abs(want), (resumed["losses"], full[4:])
    # A from-scratch run would start near ln(512) = 6.24; the resumed one starts where dp2 left off.
    assert resumed["losses"][0] < full[0] - 0.05
    manifest = json.loads((tmp_path / "checkpoints/step_00000004/manifest.json").read_text())
    assert manifest["topology"]["dp"] == 2
