"""Shared helpers of the checkpoint and convert tests (no tests here; imported by ``test_checkpoint_*``
and ``test_convert_*`` and by their spawned gloo ranks).

A tiny DeepSpeed loop stands in for the real training loop: one fixed batch sequence that does not
depend on the dp size (step ``s`` uses the same global batch whatever the layout), so a dp2 run and a
dp1 run over the same steps see the same data, and a resumed run sees what the uninterrupted one did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fm_train.config import FmConfig, build_config

VOCAB = 512
SEQ = 16
GLOBAL_BATCH = 4


def tiny_raw(zero_stage: int, workers: int, *, precision: str = "fp32", tokenizer_root: str | None = None,
             tie: bool = True, n_layers: int = 2) -> dict[str, Any]:
    """The tiny test config (hidden 64, vocab 512) as a raw mapping, for ``build_config``."""
    return {
        "run": {"name": "ckpt-test", "dir": "runs/t", "seed": 7},
        "model": {"n_layers": n_layers, "hidden": 64, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 172,
                  "vocab_size": VOCAB, "max_seq_len": 64, "tie_embeddings": tie},
        "parallel": {"tp": 1, "pp": 1, "zero_stage": zero_stage},
        "precision": precision,
        "data": {"sources": [{"path": tokenizer_root or "data/none", "weight": 1.0}], "seq_len": SEQ},
        "train": {"steps": 10, "micro_batch": GLOBAL_BATCH // workers, "grad_accum": 1, "eval_every": 0},
        "optim": {"lr": 1e-2, "min_lr": 1e-4, "warmup_steps": 2},
        "cluster": {"workers": workers},
    }


def ds_config(cfg: FmConfig) -> dict[str, Any]:
    """DeepSpeed JSON for the tiny loop (torch Adam: no fused op to compile on CPU)."""
    out: dict[str, Any] = {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.optim.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 0.1, "torch_adam": True}},
        # A schedule with state, so that a resume that forgot the scheduler shows in the losses.
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": cfg.optim.lr,
                                                     "warmup_num_steps": 4, "warmup_type": "linear"}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        out["bf16"] = {"enabled": True}
    return out


def global_batch(step: int, vocab: int = VOCAB) -> torch.Tensor:
    """The global batch of ``step`` (GLOBAL_BATCH x (SEQ + 1) tokens below ``vocab``), independent of the layout."""
    # Random starts, then a fixed rule (next = 5 * cur + 3 mod vocab): learnable, so losses fall fast.
    gen = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, vocab, (GLOBAL_BATCH, 1), generator=gen)
    out = [start]
    for _ in range(SEQ):
        out.append((out[-1] * 5 + 3) % vocab)
    return torch.cat(out, dim=1)


def build_engine(cfg: FmConfig):
    """A DeepSpeed engine around the dense tiny model (the other engineers' builder stands in later)."""
    import deepspeed

    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of

    module = build_train_module(cfg, family_of(cfg.model))
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                           config=ds_config(cfg))
    return engine


def train_steps(engine, first: int, last: int) -> list[float]:
    """Run steps ``first..last`` (inclusive); return the dp-mean loss of each step."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    dp = engine.dp_world_size
    losses = []
    for step in range(first, last + 1):
        batch = global_batch(step)
        per = GLOBAL_BATCH // dp
        local = batch[rank * per:(rank + 1) * per]
        loss = engine(local[:, :-1], local[:, 1:])
        engine.backward(loss)
        engine.step()
        value = loss.detach().float().clone()
        if dist.is_initialized() and dp > 1:
            dist.all_reduce(value)
            value /= dp
        losses.append(value.item())
    return losses


def tokenizer_hash_for(cfg: FmConfig) -> str:
    """The hash the loop records: of ``data.sources[0].path/tokenizer`` when there is one (the converter
    checks it), else a stand-in for runs that never convert."""
    from data_shards.tokenizer import tokenizer_file_hash

    path = Path(cfg.data.sources[0].path) / "tokenizer" / "tokenizer.json"
    return tokenizer_file_hash(path) if path.is_file() else "tok-test"


def make_manifest(cfg: FmConfig, step: int) -> dict[str, Any]:
    """A manifest as the loop would build it for the tiny dense model."""
    from fm_train.checkpoint import build_manifest
    from fm_train.dist import Topology

    topo = Topology(world=cfg.world_size, tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    return build_manifest(cfg, topo, data_state={"version": 1, "next_index": step * GLOBAL_BATCH},
                          tokens_seen=step * GLOBAL_BATCH * SEQ, tokenizer_hash=tokenizer_hash_for(cfg))


def write_tokenizer(root: Path) -> Path:
    """A tiny BPE tokenizer under ``root/tokenizer`` that AutoTokenizer loads offline (vocab <= 512)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(["def f(x): return x + 1", "import os, sys", "hello world"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    out = root / "tokenizer"
    fast.save_pretrained(str(out))
    return out


def run_and_save(raw: dict[str, Any], run_dir: str, steps: int, keep: int = 3) -> list[float]:
    """Per rank: build, train ``steps`` steps, save at the end with the checkpoint API; return losses."""
    from fm_train.checkpoint import save_checkpoint

    cfg = build_config(raw)
    engine = build_engine(cfg)
    losses = train_steps(engine, 1, steps)
    save_checkpoint(engine, Path(run_dir), steps, manifest=make_manifest(cfg, steps), keep=keep,
                    is_rank0=dist.get_rank() == 0)
    return losses


def dump(path: Path, obj: Any) -> None:
    """Write JSON (for a test to read what a rank saw)."""
    path.write_text(json.dumps(obj))


def run_raw(tokenizer_root: Path, run: Path, workers: int = 2, **checkpoint: Any) -> dict[str, Any]:
    """The tiny ZeRO-2 config for ``workers`` ranks with its run dir at ``run``, ``checkpoint.resume: auto``
    and the given ``checkpoint`` fields."""
    raw = tiny_raw(2, workers, tokenizer_root=str(tokenizer_root))
    raw["run"]["dir"] = str(run)
    raw["checkpoint"] = {"resume": "auto", **checkpoint}
    return raw


def resume_auto(raw: dict[str, Any], run_dir: str, last: int) -> dict[str, Any]:
    """Per rank: resume as the worker does (``resume_point``, build, ``load_checkpoint``), train to ``last``.

    Returns ``{"step", "path", "losses"}``, ``{"fresh": True}`` when there was nothing to resume, or
    ``{"error": message}`` for a :class:`CheckpointError` (what makes the worker exit 2).
    """
    from fm_train.checkpoint import CheckpointError, load_checkpoint
    from fm_train.dist import Topology
    from fm_train.engine.checkpointing import current_layout, resume_point
    from fm_train.families import family_of

    cfg = build_config(raw)
    try:
        path = resume_point(cfg, Topology(world=cfg.world_size))
        if path is None:
            return {"fresh": True}
        engine = build_engine(cfg)
        step = load_checkpoint(engine, path, config=cfg, tokenizer_hash=tokenizer_hash_for(cfg),
                               layout=current_layout(cfg, family_of(cfg.model)))["step"]
    except CheckpointError as exc:
        return {"error": str(exc)}
    return {"step": step, "path": str(path), "losses": train_steps(engine, step + 1, last)}
