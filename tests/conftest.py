"""Shared fixtures: gpu tests skip cleanly, offline Hugging Face, the DeepSpeed op cache, a tiny config,
one small real shard directory.

Ray tests start their own real instances per module (launcher tests: ray.cluster_utils.Cluster).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/distributed.py importable as `distributed`

from fm_train.dist.env import ensure_extension_cache  # noqa: E402

ensure_extension_cache()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_config_dict() -> dict:
    """A tiny, valid run config as a raw mapping (hidden 64, 2 layers, vocab 512)."""
    return {
        "run": {"name": "t", "dir": "runs/t", "seed": 7},
        "model": {"n_layers": 2, "hidden": 64, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 172,
                  "vocab_size": 512, "max_seq_len": 64, "tie_embeddings": True},
        "parallel": {"tp": 1, "pp": 1, "zero_stage": 2},
        "precision": "fp32",
        "data": {"sources": [{"path": "data/stdlib", "weight": 1.0, "default_corpus": True}], "seq_len": 32},
        "train": {"steps": 10, "micro_batch": 2, "grad_accum": 1, "eval_every": 0, "log_every": 1},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2},
        "cluster": {"workers": 2},
    }


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default-corpus shards (vocab 512, seq_len 32) of ~300 KB of the standard library, built once per
    session (about 4,300 samples of 33 tokens); tests that damage shards copy it first."""
    from data_shards import build_default_corpus

    return build_default_corpus(tmp_path_factory.mktemp("corpus") / "stdlib", vocab_size=512, seq_len=32,
                                max_bytes=300_000)


@pytest.fixture(scope="session")
def dir_with_corpus(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Callable[[str], Path]:
    """``dir_with_corpus(name)``: a fresh directory whose ``corpus/`` is the session's shards (a symlink)."""

    def make(name: str) -> Path:
        path = tmp_path_factory.mktemp(name)
        (path / "corpus").symlink_to(corpus, target_is_directory=True)
        return path

    return make
