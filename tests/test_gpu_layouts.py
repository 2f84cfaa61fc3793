"""On NVIDIA GPUs: every layout of the engine's equivalence list trains over NCCL like one GPU does.

Each run goes through the real worker (``run_worker``: nccl process group, ``cuda:LOCAL_RANK``, fused
AdamW, flash attention, the data reader on a real tiny shard directory), one process per GPU. All
runs share one global batch of 4 sequences (micro 2 x grad_accum x dp), so their losses must match
the single-GPU reference run: within 1e-4 relative in fp32 (GPU reductions are not bitwise
reproducible across layouts) and 2e-2 in bf16. A layout that needs more GPUs than the machine has
is skipped with the count in the reason. Without a GPU the whole module is skipped (conftest).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distributed import run_distributed

pytestmark = [pytest.mark.gpu, pytest.mark.multiproc]

VOCAB, SEQ, STEPS, MICRO, GLOBAL = 512, 32, 6, 2, 4
# name -> (dp, tp, pp, zero stage), as in test_engine_equivalence.py and test_engine_layouts.py.
LAYOUTS: dict[str, tuple[int, int, int, int]] = {
    **{f"dp2-zero{s}": (2, 1, 1, s) for s in range(4)},
    "tp2-zero1": (1, 2, 1, 1),
    "pp2-zero1": (1, 1, 2, 1),
    "dp2xtp2-zero1": (2, 2, 1, 1),
    "pp2xtp2-zero0": (1, 2, 2, 0),
}
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}


def gpus_visible() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def raw_config(root: Path, name: str, precision: str, layout: tuple[int, int, int, int]) -> dict[str, Any]:
    dp, tp, pp, zero = layout
    return {
        "run": {"name": name, "dir": str(root / f"{name}-{precision}"), "seed": 5},
        "model": {"n_layers": 4, "hidden": 128, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 344,
                  "vocab_size": VOCAB, "max_seq_len": 64, "tie_embeddings": True},
        "parallel": {"tp": tp, "pp": pp, "zero_stage": zero},
        "precision": precision,
        "data": {"sources": [{"path": str(root / "corpus"), "weight": 1.0}], "seq_len": SEQ, "num_workers": 0},
        "train": {"steps": STEPS, "micro_batch": MICRO, "grad_accum": GLOBAL // (MICRO * dp), "log_every": 1,
                  "eval_every": 0},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "grad_clip": 0.5},
        "checkpoint": {"every": 0, "resume": "none"},
        "logging": {"tensorboard": False},
        "cluster": {"workers": dp * tp * pp, "gpus_per_worker": 1},
    }


def _worker(raw: dict[str, Any]) -> tuple[int, str]:
    """Per rank: the worker's exit code and the process-group backend it trained on."""
    import torch.distributed as dist

    from fm_train.config import build_config
    from fm_train.deepspeed_adapter import comm
    from fm_train.worker import run_worker

    backends: list[str] = []
    init = comm.init_distributed

    def recording_init(env):  # the worker imports init_distributed lazily, from this module
        backends.append(init(env))
        return backends[-1]

    comm.init_distributed = recording_init
    code = run_worker(build_config(raw))
    assert not dist.is_initialized()
    return code, backends[0]


@pytest.fixture(scope="module")
def root(dir_with_corpus) -> Path:
    """A module directory holding the session's small shard directory as corpus/ (vocab 512, seq 32)."""
    return dir_with_corpus("gpu_layouts")


_LOSSES: dict[tuple[str, str], list[float]] = {}


def losses(root: Path, name: str, precision: str, layout: tuple[int, int, int, int]) -> list[float]:
    """Train losses of one run (made once per module); every rank must exit 0 on nccl."""
    key = (name, precision)
    if key not in _LOSSES:
        raw = raw_config(root, name, precision, layout)
        results = run_distributed(_worker, world_size=raw["cluster"]["workers"], args=(raw,), init_process_group=False)
        assert results == [(0, "nccl")] * len(results)
        records = [json.loads(line) for line in (Path(raw["run"]["dir"]) / "metrics.jsonl").read_text().splitlines()]
        _LOSSES[key] = [r["loss"] for r in records if "loss" in r]
    return _LOSSES[key]


@pytest.mark.parametrize("precision", list(TOLERANCE))
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_gpu(root: Path, name: str, precision: str) -> None:
    dp, tp, pp, _ = LAYOUTS[name]
    need = dp * tp * pp
    if gpus_visible() < need:
        pytest.skip(f"{name} needs {need} GPUs, {gpus_visible()} visible")
    ref = losses(root, "gpu1-zero1", precision, (1, 1, 1, 1))
    got = losses(root, name, precision, LAYOUTS[name])
    assert len(got) == len(ref) == STEPS
    assert ref[-1] < ref[0] - 0.1, "the reference must learn, or equal losses prove little"
    for step, (have, want) in enumerate(zip(got, ref), start=1):
        assert abs(have - want) <= TOLERANCE[precision] * abs(want), (name, precision, step, have, want)
