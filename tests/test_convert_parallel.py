"""Convert tensor- and pipeline-parallel checkpoints built by fm_train's own parallel stack.

The check is independent of the converter's merge code: the loss the trained parallel engine computes
on a fixed batch must equal the loss of the exported Hugging Face model on that batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import test_checkpoint_support as S
from distributed import run_distributed

pytestmark = pytest.mark.multiproc

LAYOUTS = {
    "tp2-zero1": dict(tp=2, pp=1, zero=1, tie=True),
    "tp2-zero2-untied": dict(tp=2, pp=1, zero=2, tie=False),
    "pp2-zero1": dict(tp=1, pp=2, zero=1, tie=True),
    "pp2-zero1-untied": dict(tp=1, pp=2, zero=1, tie=False),
    # ZeRO-0 pipelines keep their weights in layer_XX-model_TT-model_states.pt files, the optimizer per stage.
    "pp2-zero0": dict(tp=1, pp=2, zero=0, tie=True),
    # 4 processes: tp composed with dp, and full pp x tp.
    "dp2-tp2-zero1": dict(tp=2, pp=1, zero=1, tie=True, world=4),
    "pp2-tp2-zero1-untied": dict(tp=2, pp=2, zero=1, tie=False, world=4),
}


def _raw(layout: dict, tokenizer_root: str) -> dict:
    world = layout.get("world", 2)
    raw = S.tiny_raw(layout["zero"], world, tie=layout["tie"], tokenizer_root=tokenizer_root)
    raw["parallel"].update(tp=layout["tp"], pp=layout["pp"])
    dp = world // (layout["tp"] * layout["pp"])
    raw["train"]["micro_batch"] = S.GLOBAL_BATCH // dp  # each dp replica takes its slice of the global batch
    return raw


def _train_save_eval(raw: dict, run_dir: str) -> float:
    """Train 3 steps with the real parallel stack, save with the checkpoint API, return an eval loss."""
    import deepspeed
    import torch.distributed as dist

    from fm_train.checkpoint import build_manifest, dense_layers, save_checkpoint
    from fm_train.config import build_config
    from fm_train.dist import Topology
    from fm_train.dist.groups import ParallelGroups
    from fm_train.engine.param_groups import weight_decay_groups
    from fm_train.model import args_from_config
    from fm_train.parallel.build import build_train_module
    from fm_train.parallel.deepspeed_config import deepspeed_config
    from fm_train.parallel.pipeline import TIED_KEY
    from fm_train.parallel.tensor_parallel import tp_split_dims

    cfg = build_config(raw)
    topo = Topology(world=cfg.world_size, tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    deepspeed.init_distributed(dist_backend="gloo")
    groups = ParallelGroups(topo)
    module = build_train_module(cfg, groups)
    pipelined = topo.pp > 1
    engine, *_ = deepspeed.initialize(model=module, config=deepspeed_config(cfg), mpu=None if pipelined else groups,
                                      model_parameters=weight_decay_groups(module, cfg.optim.weight_decay))
    for step in range(1, 4):
        batch = S.global_batch(step).chunk(topo.dp)[groups.get_data_parallel_rank()]
        if pipelined:
            engine.train_batch(data_iter=iter([((batch[:, :-1],), batch[:, 1:])]))
        else:
            loss = engine(batch[:, :-1], batch[:, 1:])
            engine.backward(loss)
            engine.step()
    args = args_from_config(cfg.model)
    manifest = build_manifest(cfg, topo, data_state={}, tokens_seen=0,
                              layers=dense_layers(cfg.model.n_layers, tp_split_dims(args)),
                              tied={TIED_KEY: "model.embed_tokens"} if pipelined and cfg.model.tie_embeddings else None)
    save_checkpoint(engine, Path(run_dir), 3, manifest=manifest, keep=1, is_rank0=dist.get_rank() == 0)
    probe = S.global_batch(99)
    with torch.no_grad():
        if pipelined:
            loss = engine.eval_batch(data_iter=iter([((probe[:, :-1],), probe[:, 1:])]))
        else:
            engine.eval()
            loss = engine(probe[:, :-1], probe[:, 1:])
    return float(loss)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_parallel_checkpoint_converts_to_the_same_model(tmp_path: Path, name: str) -> None:
    from transformers import AutoModelForCausalLM

    from fm_train.convert import convert_checkpoint
    from fm_train.model import causal_lm_loss

    S.write_tokenizer(tmp_path / "data")
    losses = run_distributed(_train_save_eval, LAYOUTS[name].get("world", 2), args=(_raw(LAYOUTS[name], str(tmp_path / "data")),
                                                        str(tmp_path / "run")))
    out = convert_checkpoint(tmp_path / "run", tmp_path / "hf", dtype="fp32")
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.float32).eval()
    probe = S.global_batch(99)
    with torch.no_grad():
        hf_loss = causal_lm_loss(hf(input_ids=probe[:, :-1]).logits, probe[:, 1:]).item()
    engine_loss = losses[-1]  # the last rank holds the pipeline's loss; tp ranks agree
    assert abs(hf_loss - engine_loss) <= 1e-5 * abs(engine_loss), (hf_loss, losses)
    # The weights moved away from the seeded init, so equal losses are not two copies of the init.
    from fm_train.config import build_config
    from fm_train.parallel.build import build_dense_model

    fresh = build_dense_model(build_config(_raw(LAYOUTS[name], "data")))
    with torch.no_grad():
        fresh_loss = causal_lm_loss(fresh(probe[:, :-1]), probe[:, 1:]).item()
    assert abs(fresh_loss - engine_loss) > 1e-3, (fresh_loss, engine_loss)
