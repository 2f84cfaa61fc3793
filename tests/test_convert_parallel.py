"""Convert tensor- and pipeline-parallel checkpoints built by fm_train's own parallel stack.

The check is independent of the converter's merge code: the loss the trained parallel engine computes
on a fixed batch must equal the loss of the exported Hugging Face model on that batch, and the
converter itself verifies against the probe logits the engine stored at save time. Swapping two tp
ranks' files or two pipeline layers' files (checksums recomputed, so every name, shape and digest
check passes) must then fail the conversion, which the old self-comparison did not catch.
"""

from __future__ import annotations

import json
import shutil
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
    # 1001 tokens (no tp size divides them): trained on 1024 padded rows, exported with 1001.
    "tp2-zero1-vocab1001": dict(tp=2, pp=1, zero=1, tie=True, vocab=1001),
    "pp2-tp2-zero1-untied-vocab1001": dict(tp=2, pp=2, zero=1, tie=False, world=4, vocab=1001),
}


def _raw(layout: dict, tokenizer_root: str) -> dict:
    world = layout.get("world", 2)
    raw = S.tiny_raw(layout["zero"], world, tie=layout["tie"], tokenizer_root=tokenizer_root)
    raw["parallel"].update(tp=layout["tp"], pp=layout["pp"])
    raw["model"]["vocab_size"] = layout.get("vocab", S.VOCAB)
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
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of
    from fm_train.families.llama.model import args_from_config
    from fm_train.families.spec import split_dims
    from fm_train.parallel.deepspeed_config import deepspeed_config
    from fm_train.parallel.pipeline import TIED_KEY

    cfg = build_config(raw)
    topo = Topology(world=cfg.world_size, tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    deepspeed.init_distributed(dist_backend="gloo")
    groups = ParallelGroups(topo)
    module = build_train_module(cfg, family_of(cfg.model), groups)
    pipelined = topo.pp > 1
    engine, *_ = deepspeed.initialize(model=module, config=deepspeed_config(cfg), mpu=None if pipelined else groups,
                                      model_parameters=weight_decay_groups(module, cfg.optim.weight_decay))
    vocab = cfg.model.vocab_size
    for step in range(1, 4):
        batch = S.global_batch(step, vocab).chunk(topo.dp)[groups.get_data_parallel_rank()]
        if pipelined:
            engine.train_batch(data_iter=iter([((batch[:, :-1],), batch[:, 1:])]))
        else:
            loss = engine(batch[:, :-1], batch[:, 1:])
            engine.backward(loss)
            engine.step()
    args = args_from_config(cfg.model)
    manifest = build_manifest(cfg, topo, data_state={}, tokens_seen=0,
                              layers=dense_layers(cfg.model.n_layers, split_dims(family_of(cfg.model), args)),
                              tied={TIED_KEY: "model.embed_tokens"} if pipelined and cfg.model.tie_embeddings else None)
    save_checkpoint(engine, Path(run_dir), 3, manifest=manifest, keep=1, is_rank0=dist.get_rank() == 0)
    probe = S.global_batch(99, vocab)
    with torch.no_grad():
        if pipelined:
            loss = engine.eval_batch(data_iter=iter([((probe[:, :-1],), probe[:, 1:])]))
        else:
            engine.eval()
            loss = engine(probe[:, :-1], probe[:, 1:])
    return float(loss)


_TRAINED: dict[str, tuple[Path, list[float]]] = {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """``trained(name)``: the run dir of layout ``name`` (trained and saved once per module) and its losses."""

    def get(name: str) -> tuple[Path, list[float]]:
        if name not in _TRAINED:
            root = tmp_path_factory.mktemp(name)
            S.write_tokenizer(root / "data")
            losses = run_distributed(_train_save_eval, LAYOUTS[name].get("world", 2),
                                     args=(_raw(LAYOUTS[name], str(root / "data")), str(root / "run")))
            _TRAINED[name] = (root / "run", losses)
        return _TRAINED[name]

    return get


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_parallel_checkpoint_converts_to_the_same_model(tmp_path: Path, name: str, trained) -> None:
    from transformers import AutoModelForCausalLM

    from fm_train.convert import convert_checkpoint
    from fm_train.families.llama.model import causal_lm_loss

    run_dir, losses = trained(name)
    said: list[str] = []
    out = convert_checkpoint(run_dir, tmp_path / "hf", dtype="fp32", progress=said.append)
    assert any(m.startswith("verified against the engine's probe") for m in said), said
    assert "match the training engine's own logits" in (out / "README.md").read_text()
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.float32).eval()
    vocab = LAYOUTS[name].get("vocab", S.VOCAB)
    assert hf.config.vocab_size == vocab and hf.get_input_embeddings().weight.shape[0] == vocab  # no padding rows
    probe = S.global_batch(99, vocab)
    with torch.no_grad():
        hf_loss = causal_lm_loss(hf(input_ids=probe[:, :-1]).logits, probe[:, 1:]).item()
    engine_loss = losses[-1]  # the last rank holds the pipeline's loss; tp ranks agree
    assert abs(hf_loss - engine_loss) <= 1e-5 * abs(engine_loss), (hf_loss, losses)
    if "vocab" in LAYOUTS[name]:  # the tokenizer copied next to the unpadded model loads and generates
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
        ids = tok("def f(x):", return_tensors="pt").input_ids
        with torch.no_grad():
            new = hf.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
        assert new.shape[1] == ids.shape[1] + 5 and int(new.max()) < vocab
    # The weights moved away from the seeded init, so equal losses are not two copies of the init.
    from fm_train.config import build_config
    from fm_train.engine.train_module import build_dense_model
    from fm_train.families import family_of

    fresh_cfg = build_config(_raw(LAYOUTS[name], "data"))
    fresh = build_dense_model(fresh_cfg, family_of(fresh_cfg.model))
    with torch.no_grad():  # logits, not the mean loss, which training may move less than its noise
        moved = (fresh(probe[:, :-1])[..., :vocab] - hf(input_ids=probe[:, :-1]).logits).abs().max().item()
    assert moved > 1e-2, moved


def _swap_files(step_dir: Path, a: str, b: str) -> None:
    """Exchange two files of a step dir and record their new sizes and digests in the manifest, so that
    the integrity check passes and only what the tensors compute can tell."""
    from fm_train.checkpoint.integrity import file_digest

    pa, pb, spare = step_dir / a, step_dir / b, step_dir / (a + ".swap")
    pa.rename(spare)
    pb.rename(pa)
    spare.rename(pb)
    path = step_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    for rel in (a, b):
        manifest["checksums"]["files"][rel] = file_digest(step_dir / rel)
        if rel in manifest["files"]:
            manifest["files"][rel] = (step_dir / rel).stat().st_size
    path.write_text(json.dumps(manifest, indent=2))


SWAPS = {
    # tp2 ZeRO-1: the weights come from the optimizer partitions; swap each tp rank's files whole.
    "tp2-zero1": [("mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"),
                  ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_01_optim_states.pt")],
    # pp2 ZeRO-0: decoder blocks 0 and 1 (layers 1 and 2, the same shapes) exchanged.
    "pp2-zero0": [("layer_01-model_00-model_states.pt", "layer_02-model_00-model_states.pt")],
}


@pytest.mark.parametrize("name", list(SWAPS))
def test_swapped_files_fail_the_probe_although_names_and_shapes_match(tmp_path: Path, name: str, trained) -> None:
    from fm_train.checkpoint import read_manifest
    from fm_train.deepspeed_adapter.ckpt_reader import DeepSpeedWeights
    from fm_train.convert import ConvertError, convert_checkpoint
    from fm_train.convert.keymap import fm_param_shapes
    from fm_train.families import family_of

    run_dir, _ = trained(name)
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    step_dir = run / "checkpoints" / "step_00000003"
    for a, b in SWAPS[name]:
        assert (step_dir / a).is_file() and (step_dir / b).is_file(), sorted(p.name for p in step_dir.iterdir())
        _swap_files(step_dir, a, b)
    manifest = read_manifest(step_dir)
    # Every name and shape check passes: the reader merges the swapped files into the full shapes.
    model_fields = manifest["config"]["model"]
    family = family_of(model_fields)
    weights = DeepSpeedWeights(step_dir, manifest, tied=family.tied_params(model_fields))
    assert weights.shapes() == fm_param_shapes(family, model_fields)

    with pytest.raises(ConvertError) as err:
        convert_checkpoint(run, tmp_path / "hf", dtype="fp32")
    message = str(err.value)
    assert "do not match the training engine's" in message and "max abs diff" in message, message
    assert not (tmp_path / "hf").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".hf")]

    # The self-comparison (Hugging Face against fm_train's model from the same merged tensors), all a
    # checkpoint without a probe gets, passes the same swapped files.
    del manifest["probe"]
    (step_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    said: list[str] = []
    convert_checkpoint(run, tmp_path / "hf-old", dtype="fp32", progress=said.append)
    assert any("has no probe" in m for m in said), said


def test_a_converted_decoder_pads_with_eos_and_fine_tunes_on_padded_batches(tmp_path: Path, trained) -> None:
    """The export says what padding uses (its EOS token, on the right) in tokenizer_config.json and
    generation_config.json, so ``padding="max_length"`` works as it is, and ``transformers.Trainer``
    fine-tunes the model on padded batches (labels -100 at the pads) with a finite, falling loss."""
    import math

    from transformers import AutoTokenizer

    from fm_train.convert import convert_checkpoint
    from fine_tune import fine_tune_padded

    run_dir, _ = trained("tp2-zero1-vocab1001")
    out = convert_checkpoint(run_dir, tmp_path / "hf", dtype="fp32")
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.pad_token == tok.eos_token == "</s>" and tok.padding_side == "right"
    assert json.loads((out / "tokenizer_config.json").read_text())["pad_token"] == "</s>"
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == tok.eos_token_id
    # Not the embedding's padding_idx: EOS is a token the model predicts, its row must keep training.
    assert json.loads((out / "config.json").read_text()).get("pad_token_id") is None
    assert "with the EOS token '</s>'" in (out / "README.md").read_text()
    losses = fine_tune_padded(out, tmp_path)
    assert len(losses) >= 4 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
