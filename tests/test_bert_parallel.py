"""The encoder under tensor and pipeline parallelism: its tp plan and sharded init, tp2 against the
dense model (logits, loss, every gradient, the loss over logits and the fused head's), the equivalence list (tp2, pp2, dp2 x tp2, pp2 x tp2,
through the real engine and loop) against one process loss for loss, and checkpoints of those
layouts converted to ``BertForMaskedLM`` and verified against the engine's own logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import test_bert as B
from distributed import run_distributed

SEED = 7


def _args(vocab: int = B.VOCAB, multiple: int = 1, n_layers: int = 2):
    from fm_train.config import ModelConfig
    from fm_train.families import FAMILIES

    fields = B._tiny_bert(vocab_size=vocab, vocab_multiple=multiple, n_layers=n_layers)
    return FAMILIES["bert"].modules().args(ModelConfig(**fields))


def _dense(args):
    model = args.build()
    model.init_weights(SEED)
    return model


def _merged(parts: list[torch.Tensor], dim: int | None) -> torch.Tensor:
    return parts[0] if dim is None else torch.cat(parts, dim=dim)


# ---- the plan ---------------------------------------------------------------------------------------
@pytest.mark.unit
def test_split_dims_follow_the_megatron_plan_for_bert() -> None:
    from fm_train.families import FAMILIES
    from fm_train.families.spec import split_dims

    dims = split_dims(FAMILIES["bert"], _args())
    layer = "bert.encoder.layer.1."
    expected = {
        "bert.embeddings.word_embeddings.weight": 0, "cls.predictions.decoder.weight": 0, "cls.predictions.bias": 0,
        "bert.embeddings.position_embeddings.weight": None, "bert.embeddings.LayerNorm.weight": None,
        layer + "attention.self.query.weight": 0, layer + "attention.self.query.bias": 0,
        layer + "attention.self.value.bias": 0, layer + "attention.output.dense.weight": 1,
        layer + "attention.output.dense.bias": None, layer + "attention.output.LayerNorm.weight": None,
        layer + "intermediate.dense.weight": 0, layer + "intermediate.dense.bias": 0,
        layer + "output.dense.weight": 1, layer + "output.dense.bias": None,
        "cls.predictions.transform.dense.weight": None, "cls.predictions.transform.LayerNorm.bias": None,
    }
    assert {k: dims[k] for k in expected} == expected


@pytest.mark.unit
@pytest.mark.parametrize("tp_size", [2, 4])
def test_bert_sharded_init_equals_slices_of_the_dense_init(tp_size: int) -> None:
    from fm_train.families import FAMILIES
    from fm_train.families.spec import split_dims
    from fm_train.engine.train_module import build_tp_model
    from fm_train.parallel.tensor_parallel import TPGroup

    family, args = FAMILIES["bert"], _args()
    dense = _dense(args).state_dict()
    shards = [build_tp_model(family, args, TPGroup(None, r, tp_size), SEED) for r in range(tp_size)]
    dims = split_dims(family, args)
    assert set(dims) == set(dense)
    for name, value in dense.items():
        assert torch.equal(_merged([s.state_dict()[name] for s in shards], dims[name]), value), name
    for shard in shards:
        assert shard.cls.predictions.decoder.weight is shard.bert.embeddings.word_embeddings.weight


@pytest.mark.unit
def test_the_pipeline_layer_table_holds_every_parameter_once() -> None:
    from fm_train.families import FAMILIES
    from fm_train.families.bert.pipeline import layer_param_counts, stage_bounds
    from fm_train.families.spec import layout_errors, manifest_layers, manifest_tied

    family = FAMILIES["bert"]
    cfg = B.make_config("unused", workers=2, zero=1, micro=4, accum=2, pp=2)
    table = manifest_layers(family, cfg)
    held = [f"{e['module']}.{local}" for e in table for local in e["tp_split_dims"]]
    args = family.modules().args(cfg.model)
    names = {n for n, _ in _dense(args).named_parameters(remove_duplicate=False)}
    assert sorted(held) == sorted(names)  # each name in exactly one layer (the tied decoder in its own)
    assert manifest_tied(family, cfg) == {"embed": "bert.embeddings.word_embeddings"}
    counts = layer_param_counts(args)
    assert counts[0] == counts[-2] == args.padded_vocab_size * args.hidden  # the tied decoder's stage holds a copy
    assert stage_bounds(args, 2)[1] in range(3, args.n_layers + 3)  # each stage gets an encoder block
    # The planner's largest stage is at least what the balanced partition puts on one stage.
    bounds = stage_bounds(args, 2)
    held_per_stage = [sum(counts[bounds[i]:bounds[i + 1]]) for i in range(2)]
    assert max(held_per_stage) <= family.sizes.stage_params(cfg) <= max(held_per_stage) + counts[2]
    errors = layout_errors(family, _args(vocab=65536, n_layers=3), 1, 3)
    assert any("gets no encoder block" in e for e in errors), errors
    assert any("parallel.tp=3 does not divide model.n_heads=2" in e for e in layout_errors(family, args, 3, 1))


# ---- tp2 against the dense model --------------------------------------------------------------------
def _tp2_against_dense(vocab: int, multiple: int, fused: bool) -> dict[str, float]:
    """tp2 against the dense model's logits and loss over them; ``fused``: the tp2 loss is the training one,
    the vocab-parallel fused head on the masked rows (``model(inputs, labels=labels)``)."""
    from test_parallel_tp import gradient_diffs

    from fm_train.dist.groups import ParallelGroups
    from fm_train.dist.topology import Topology
    from fm_train.families import FAMILIES
    from fm_train.families.bert.model import masked_lm_loss
    from fm_train.engine.train_module import build_tp_model
    from fm_train.model.loss import token_mean
    from fm_train.parallel.tensor_parallel import TPGroup, gather_from_tp, vocab_parallel_cross_entropy

    args = _args(vocab, multiple)
    tp = TPGroup.from_groups(ParallelGroups(Topology(world=2, tp=2)))
    model, dense = build_tp_model(FAMILIES["bert"], args, tp, SEED), _dense(args)
    inputs, labels = B.global_batch(0)
    ref_logits = dense(inputs)
    ref_loss = masked_lm_loss(ref_logits, labels, vocab_size=args.vocab_size)
    ref_loss.backward()
    diffs = {}
    if fused:
        loss = token_mean(model(inputs, labels=labels), labels)
    else:
        local = model(inputs)
        assert local.shape[-1] == args.padded_vocab_size // 2
        loss = vocab_parallel_cross_entropy(local, labels, tp, vocab_size=args.vocab_size)
        diffs["logits"] = (gather_from_tp(local.detach(), tp) - ref_logits.detach()).abs().max().item()
    loss.backward()
    diffs["loss"] = abs(loss.item() - ref_loss.item())
    # A floor under the reference: the key bias's gradient is zero in exact arithmetic (a softmax does
    # not change when every score of a query shifts), so only rounding noise is compared there.
    return {**diffs, **gradient_diffs(model, dense, tp, floor=1e-4)}


def _tp2_cases() -> dict[tuple[int, bool], dict[str, float]]:
    # 1001 tokens padded to 1024: tp rank 1's shard of the decoder and its bias ends in 23 padding columns.
    return {(vocab, fused): _tp2_against_dense(vocab, multiple, fused)
            for vocab, multiple in ((B.VOCAB, 1), (1001, 128)) for fused in (False, True)}


@pytest.mark.multiproc
def test_tp2_encoder_logits_loss_and_gradients_equal_the_dense_model() -> None:
    for rank, cases in enumerate(run_distributed(_tp2_cases, world_size=2)):
        for (vocab, fused), diffs in cases.items():
            bad = {k: v for k, v in diffs.items() if not v < 1e-5}
            assert not bad, f"rank {rank}, vocab {vocab}, fused head {fused}: {bad}"


# ---- the equivalence list through the engine ---------------------------------------------------------
# name -> make_config fields; world = dp x tp x pp with the global batch of 8 split over dp.
LAYOUTS: dict[str, dict[str, Any]] = {
    "tp2-zero1": {"tp": 2, "zero": 1, "micro": 4, "accum": 2},
    "pp2-zero1-accum2": {"pp": 2, "zero": 1, "micro": 4, "accum": 2},
    "pp2-zero0-actckpt": {"pp": 2, "zero": 0, "micro": 2, "accum": 4, "actckpt": True},
    "dp2xtp2-zero1": {"tp": 2, "zero": 1, "micro": 2, "accum": 2},
    "pp2xtp2-zero1-vocab1001": {"tp": 2, "pp": 2, "zero": 1, "micro": 4, "accum": 2, "vocab": 1001, "multiple": 128},
}


def _world(case: dict[str, Any]) -> int:
    dp = B.GLOBAL_BATCH // (case["micro"] * case["accum"])
    return dp * case.get("tp", 1) * case.get("pp", 1)


def _train_layouts(root: str, names: list[str]) -> dict[str, list[float] | None]:
    return {name: B.train_case(Path(root) / name, LAYOUTS[name]) for name in names}


_RUNS: dict[str, Any] = {}


@pytest.fixture
def trained(tmp_path_factory) -> tuple[Path, dict[str, list[float]]]:
    """Every layout trained once per session: one set of processes per world size."""
    if "losses" not in _RUNS:
        root, losses = tmp_path_factory.mktemp("bert_layouts"), {}
        for world in sorted({_world(c) for c in LAYOUTS.values()}):
            names = [n for n, c in LAYOUTS.items() if _world(c) == world]
            losses.update(run_distributed(_train_layouts, world_size=world, args=(str(root), names))[0])
        _RUNS.update(root=root, losses=losses)
    return _RUNS["root"], _RUNS["losses"]


@pytest.mark.multiproc
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_encoder_layout_matches_a_single_process_loss_for_loss(trained, name: str) -> None:
    torch.set_num_threads(1)
    case = LAYOUTS[name]
    key = (case.get("vocab", B.VOCAB), case.get("multiple", 1))
    if key not in _RUNS:
        _RUNS[key] = B.reference_losses(*key)
    reference, losses = _RUNS[key], trained[1][name]
    assert len(losses) == B.STEPS
    for step, (got, want) in enumerate(zip(losses, reference)):
        assert got == pytest.approx(want, rel=1e-5), f"{name}: step {step + 1} loss {got} != single-process {want}"
    assert reference[-1] < reference[0] - 0.5


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["tp2-zero1", "pp2-zero1-accum2", "dp2xtp2-zero1", "pp2xtp2-zero1-vocab1001"])
def test_a_parallel_encoder_checkpoint_converts_to_bert_for_masked_lm(trained, name: str, tmp_path: Path) -> None:
    """The converter merges the tp shards and pipeline layers into ``BertForMaskedLM`` and checks the
    result against the logits the engine itself produced at save time (fp32, 1e-5)."""
    from transformers import AutoModelForMaskedLM, BertForMaskedLM

    from fm_train.convert import convert_checkpoint

    lines: list[str] = []
    out = convert_checkpoint(trained[0] / name, tmp_path / "hf", no_tokenizer=True, dtype="fp32", progress=lines.append)
    assert any("verified against the engine's probe" in line for line in lines), lines
    hf = AutoModelForMaskedLM.from_pretrained(str(out), local_files_only=True)
    assert isinstance(hf, BertForMaskedLM)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == LAYOUTS[name].get("vocab", B.VOCAB)



@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["tp2-zero1", "pp2-zero0-actckpt", "pp2xtp2-zero1-vocab1001"])
def test_a_checkpoint_in_storage_reads_in_place_like_a_local_one(trained, name: str) -> None:
    B.assert_reads_in_place_like_local(trained[0] / name / "checkpoints" / f"step_{B.STEPS:08d}")
