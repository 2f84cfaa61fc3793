"""The BERT family: the pure encoder computes what ``transformers``' ``BertForMaskedLM`` computes,
the masking is deterministic per sample and follows BERT's recipe, dp2 with ZeRO 0-3 trains loss for
loss like one process, and a checkpoint converts to a ``BertForMaskedLM`` directory verified
against the engine's own logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from distributed import run_distributed

STEPS = 8
GLOBAL_BATCH = 8
SEQ = 32
VOCAB = 512
DP = 2
CLS, SEP, MASK, EOS = VOCAB - 3, VOCAB - 2, VOCAB - 1, 0


def _objective(seed: int = 7):
    from data_shards.masking import MaskedLM

    return MaskedLM(cls_id=CLS, sep_id=SEP, mask_id=MASK, vocab_size=VOCAB, seed=seed, eos_id=EOS)


def _tiny_bert(**fields: Any) -> dict[str, Any]:
    """A small encoder's model fields (ModelConfig takes no preset on its own: the loader applies them)."""
    return {"family": "bert", "n_layers": 2, "hidden": 64, "n_heads": 2, "n_kv_heads": 2, "ffn_hidden": 128,
            "vocab_size": VOCAB, "max_seq_len": 64, "norm_eps": 1e-12, **fields}


# ---- the pure model against transformers ------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("vocab, multiple", [(VOCAB, 1), (1001, 128)], ids=["vocab512", "vocab1001-padded"])
def test_the_encoder_computes_what_bert_for_masked_lm_computes(vocab: int, multiple: int) -> None:
    import transformers

    from fm_train.config import ModelConfig
    from fm_train.convert.keymap import without_padding
    from fm_train.families import family_of
    from fm_train.model.base import real_logits

    model_cfg = ModelConfig(**_tiny_bert(vocab_size=vocab, vocab_multiple=multiple))
    family = family_of(model_cfg)
    args = family.modules().args(model_cfg)
    ours = args.build()
    ours.init_weights(11)
    assert ours.bert.embeddings.word_embeddings.weight.shape[0] == args.padded_vocab_size
    hf = transformers.BertForMaskedLM(family.hf.config(model_cfg.model_dump(), dtype="fp32", bos=None, eos=None)).eval()
    state = {n: without_padding(family, n, t, vocab) for n, t in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert unexpected == [] and missing == ["cls.predictions.decoder.bias"]  # tied to cls.predictions.bias
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = real_logits(ours.eval()(ids), vocab)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.unit
@pytest.mark.parametrize("preset", ["bert-tiny", "bert-base", "bert-large"])
def test_parameter_count_is_bert_for_masked_lm_s(preset: str) -> None:
    import transformers

    from fm_train.config import build_config
    from fm_train.families import family_of

    cfg = build_config({"model": {"preset": preset, "vocab_multiple": 1}, "parallel": {"zero_stage": 1},
                        "data": {"seq_len": 128}})
    family = family_of(cfg.model)
    with torch.device("meta"):
        hf = transformers.BertForMaskedLM(family.hf.config(cfg.model.model_dump(), dtype="fp32", bos=None, eos=None))
    assert family.sizes.parameter_count(cfg.model) == hf.num_parameters()


@pytest.mark.unit
def test_the_padding_rows_start_at_zero_and_the_decoder_is_the_embedding() -> None:
    from fm_train.config import ModelConfig
    from fm_train.families import family_of

    cfg = ModelConfig(**_tiny_bert(vocab_size=1001, vocab_multiple=128))
    family = family_of(cfg)
    model = family.modules().args(cfg).build()
    model.init_weights(3)
    assert family.sizes.parameter_count(cfg) == sum(p.numel() for p in model.parameters())
    assert not model.bert.embeddings.word_embeddings.weight[1001:].any() and not model.cls.predictions.bias.any()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


# ---- masking ------------------------------------------------------------------------------------
@pytest.mark.unit
def test_masking_follows_the_recipe_and_depends_on_the_sample_alone() -> None:
    from data_shards.masking import IGNORE_INDEX

    gen = np.random.default_rng(0)
    tokens = gen.integers(1, CLS, size=(64, SEQ + 1))
    tokens[:, 5] = EOS  # a document boundary inside every window
    ids = np.arange(1000, 1064)
    inputs, labels = _objective().apply(tokens, ids)
    assert inputs.shape == labels.shape == (64, SEQ)
    assert (inputs[:, 0] == CLS).all() and (inputs[:, -1] == SEP).all() and (inputs[:, 6] == SEP).all()
    chosen = labels != IGNORE_INDEX
    assert (chosen.sum(axis=1) == round(0.15 * (SEQ - 2))).all()  # a fixed count per sample
    assert not chosen[:, [0, 6, SEQ - 1]].any()  # [CLS], the boundary and [SEP] are never predicted
    window = np.concatenate([np.full((64, 1), CLS), tokens[:, :SEQ - 2], np.full((64, 1), SEP)], axis=1)
    window[:, 6] = SEP
    assert (labels[chosen] == window[chosen]).all() and (inputs[~chosen] == window[~chosen]).all()
    kinds = np.where(inputs[chosen] == MASK, "mask", np.where(inputs[chosen] == window[chosen], "kept", "random"))
    share = {k: float((kinds == k).mean()) for k in ("mask", "random", "kept")}
    assert 0.75 < share["mask"] < 0.85 and 0.05 < share["random"] < 0.15 and 0.05 < share["kept"] < 0.15
    assert not np.isin(inputs[chosen][kinds == "random"], [CLS, SEP, MASK, EOS]).any()
    # The same sample masks the same way in another batch, at another row, with another seed it does not.
    again, again_labels = _objective().apply(tokens[[7, 3]], ids[[7, 3]])
    assert (again == inputs[[7, 3]]).all() and (again_labels == labels[[7, 3]]).all()
    assert not (_objective(seed=8).apply(tokens[:4], ids[:4])[1] == labels[:4]).all()


# ---- dp2 with ZeRO 0-3 against one process -------------------------------------------------------------
CASES: dict[str, dict[str, Any]] = {
    **{f"zero{s}": {"zero": s, "micro": 4, "accum": 1} for s in range(4)},
    "zero2-micro2x2": {"zero": 2, "micro": 2, "accum": 2},
}


def make_config(run_dir: str, *, workers: int, zero: int, micro: int, accum: int, tp: int = 1, pp: int = 1,
                actckpt: bool = False, vocab: int = VOCAB, multiple: int = 1):
    from fm_train.config import build_config

    return build_config({"model": _tiny_bert(vocab_size=vocab, vocab_multiple=multiple)}, [
        f"run.dir={run_dir}", f"cluster.workers={workers}", f"parallel.zero_stage={zero}", "precision=fp32",
        f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.activation_checkpointing={str(actckpt).lower()}",
        f"train.steps={STEPS}", f"train.micro_batch={micro}", f"train.grad_accum={accum}", "train.log_every=1",
        "train.eval_every=0", "optim.warmup_steps=2", "optim.lr=3e-3", "optim.min_lr=3e-4",
        "optim.weight_decay=0.1", "optim.grad_clip=1.0", f"data.seq_len={SEQ}", "logging.tensorboard=false",
    ])


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two global batches in turn (learnt within the few steps), each window two ordinary ids alternating,
    masked by sample id."""
    step %= 2
    gen = torch.Generator().manual_seed(1000 + step)
    pair = torch.randint(1, CLS, (GLOBAL_BATCH, 2), generator=gen)
    tokens = pair[:, torch.arange(SEQ + 1) % 2]
    inputs, labels = _objective().apply(tokens.numpy(), np.arange(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH))
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def rank_batches(dp_rank: int, dp: int, micro: int, accum: int) -> Iterator[dict[str, Any]]:
    """Data-parallel rank ``dp_rank``'s micro-batches of the global batches (its tp/pp peers get the same)."""
    step = 0
    while True:
        inputs, labels = global_batch(step)
        for j in range(accum):
            rows = slice((j * dp + dp_rank) * micro, (j * dp + dp_rank + 1) * micro)
            yield {"input_ids": inputs[rows], "labels": labels[rows], "state": {"step": step}, "receipt": f"r{step}"}
        step += 1


def train_case(run_dir: Path, case: dict[str, Any]) -> list[float] | None:
    """Train one layout (``make_config`` fields) with the real engine and loop on every rank of the world,
    save its checkpoint at the last step; rank 0 returns the logged losses."""
    import torch.distributed as dist

    from fm_train.checkpoint import build_manifest, save_checkpoint
    from fm_train.dist import Topology
    from fm_train.dist.groups import ParallelGroups
    from fm_train.engine import MetricsSink, TrainState, build_engine, train
    from fm_train.engine.meter import ThroughputSpec
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of
    from fm_train.families.spec import manifest_layers, manifest_tied

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = make_config(str(run_dir), workers=world, **case)
    topo = Topology(world=world, tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    groups = ParallelGroups(topo) if topo.tp > 1 or topo.pp > 1 else None
    family = family_of(cfg.model)
    engine, scheduler = build_engine(cfg, build_train_module(cfg, family, groups),
                                     blocks=family.modules().block_types,
                                     mpu=groups if cfg.parallel.pp == 1 else None)
    state = TrainState(lr_scheduler=scheduler)
    sink = MetricsSink(run_dir, enabled=rank == 0, tensorboard=False)
    batches = rank_batches(topo.coord(rank).dp, topo.dp, case["micro"], case["accum"])
    train(engine, batches, state, cfg, sink=sink, spec=ThroughputSpec(cfg.tokens_per_step, world, 1.0, 1.0))
    sink.close()
    manifest = build_manifest(cfg, topo, data_state={}, tokens_seen=state.tokens_seen,
                              layers=manifest_layers(family, cfg), tied=manifest_tied(family, cfg))
    save_checkpoint(engine, run_dir, STEPS, manifest=manifest, keep=1, is_rank0=rank == 0)
    engine.destroy()
    dist.barrier()
    if rank != 0:
        return None
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _train_cases(root: str) -> dict[str, list[float] | None]:
    return {name: train_case(Path(root) / name, case) for name, case in CASES.items()}


def reference_losses(vocab: int = VOCAB, multiple: int = 1) -> list[float]:
    """The losses of one process (plain torch AdamW) on whole global batches."""
    from fm_train.engine import build_lr_scheduler, weight_decay_groups
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of

    cfg = make_config("unused", workers=1, zero=0, micro=GLOBAL_BATCH, accum=1, vocab=vocab, multiple=multiple)
    module = build_train_module(cfg, family_of(cfg.model))
    o = cfg.optim
    opt = torch.optim.AdamW(weight_decay_groups(module, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
    sched = build_lr_scheduler(opt, o, cfg.train.steps)
    losses = []
    for step in range(STEPS):
        loss = module(*global_batch(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


_CACHE: dict[str, Any] = {}


@pytest.fixture
def trained(tmp_path_factory) -> tuple[Path, dict[str, list[float]]]:
    if "runs" not in _CACHE:
        root = tmp_path_factory.mktemp("bert")
        _CACHE["runs"] = (root, run_distributed(_train_cases, world_size=DP, args=(str(root),))[0])
    return _CACHE["runs"]


@pytest.mark.multiproc
@pytest.mark.parametrize("case", list(CASES))
def test_dp2_encoder_loss_matches_single_process(trained, case: str) -> None:
    torch.set_num_threads(1)
    if "reference" not in _CACHE:
        _CACHE["reference"] = reference_losses()
    reference, losses = _CACHE["reference"], trained[1][case]
    assert len(losses) == STEPS
    for step, (got, want) in enumerate(zip(losses, reference)):
        assert got == pytest.approx(want, rel=1e-5), f"{case}: step {step + 1} loss {got} != single-process {want}"
    assert reference[-1] < reference[0] - 0.5  # the masked tokens were learnt


@pytest.mark.multiproc
@pytest.mark.parametrize("case", ["zero0", "zero2", "zero3"])
def test_an_encoder_checkpoint_converts_to_bert_for_masked_lm(trained, case: str, tmp_path: Path) -> None:
    from transformers import AutoModelForMaskedLM, BertForMaskedLM

    from fm_train.convert import convert_checkpoint

    lines: list[str] = []
    out = convert_checkpoint(trained[0] / case, tmp_path / "hf", no_tokenizer=True, dtype="fp32", progress=lines.append)
    assert any("verified against the engine's probe" in line for line in lines), lines
    hf = AutoModelForMaskedLM.from_pretrained(str(out), local_files_only=True)
    assert isinstance(hf, BertForMaskedLM)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]


def assert_reads_in_place_like_local(step: Path) -> None:
    """The converter's reader over an fsspec filesystem (ranged reads, no local copy, as for a step in
    object storage) returns every weight and Adam moment exactly as from the local, memory-mapped files."""
    import fsspec
    from upath import UPath

    from fm_train.checkpoint import read_manifest
    from fm_train.deepspeed_adapter.ckpt_reader import DeepSpeedWeights
    from fm_train.families import family_of

    fs, root = fsspec.filesystem("memory"), f"/{step.parent.parent.name}"
    for path in step.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{root}/{path.relative_to(step).as_posix()}", path.read_bytes())
    manifest = read_manifest(step)
    model_fields = manifest["config"]["model"]
    tied = family_of(model_fields).tied_params(model_fields)
    local = DeepSpeedWeights(step, manifest, tied=tied)
    remote = DeepSpeedWeights(UPath(f"memory://{root}"), manifest, tied=tied)
    assert remote.shapes() == local.shapes()
    for param in local.shapes():
        for key in (None, "exp_avg", "exp_avg_sq"):
            assert torch.equal(remote.get(param, key), local.get(param, key)), (param, key)
    assert remote.optimizer_step() == local.optimizer_step() == STEPS


@pytest.mark.multiproc
@pytest.mark.parametrize("case", ["zero0", "zero3"])
def test_a_checkpoint_in_storage_reads_in_place_like_a_local_one(trained, case: str) -> None:
    assert_reads_in_place_like_local(trained[0] / case / "checkpoints" / f"step_{STEPS:08d}")


@pytest.mark.unit
def test_a_bert_for_masked_lm_dir_is_imported_for_continued_pretraining(tmp_path: Path) -> None:
    """``model.init_from`` a transformers-saved BertForMaskedLM: the family and shape come from its
    config.json, the weights through the key map, and the first masked-token loss is transformers'."""
    import transformers

    from fm_train.config import build_config
    from fm_train.convert.hf_import import open_hf
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of

    hf_cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    transformers.BertForMaskedLM(hf_cfg).save_pretrained(str(tmp_path / "hf"))
    cfg = build_config({"model": {"init_from": str(tmp_path / "hf"), "vocab_multiple": 128},
                        "parallel": {"zero_stage": 0}, "cluster": {"workers": 1}, "data": {"seq_len": SEQ}})
    assert cfg.model.family == "bert" and cfg.model.hidden == 64 and cfg.model.norm_eps == 1e-12
    family = family_of(cfg.model)
    _, weights = open_hf(tmp_path / "hf", family)
    module = build_train_module(cfg, family, init=weights)
    inputs, labels = global_batch(0)
    hf = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    with torch.no_grad():
        want = hf(input_ids=inputs, labels=labels).loss
        got = module(inputs, labels)
    assert float(got) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.unit
def test_a_tokenizer_with_bert_s_special_tokens_keeps_their_ids(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models

    from data_shards import DataError
    from fm_train.families import family_of

    def info_with(tokens: list[str]) -> SimpleNamespace:
        vocab = {t: i for i, t in enumerate([*tokens, "a", "b", "c"])}
        directory = tmp_path / "-".join(tokens).strip("[]") / "tokenizer"
        directory.mkdir(parents=True)
        Tokenizer(models.WordLevel(vocab, unk_token="a")).save(str(directory / "tokenizer.json"))
        return SimpleNamespace(tokenizer_dir=directory, vocab_size=len(vocab), eos_id=vocab.get("[SEP]", 0))

    family = family_of("bert")
    wordpiece = family.objective.data(info_with(["[PAD]", "[MASK]", "[CLS]", "[SEP]"]), 8, 1)
    assert (wordpiece.cls_id, wordpiece.sep_id, wordpiece.mask_id, wordpiece.pad_id, wordpiece.eos_id) == (2, 3, 1, 0,
                                                                                                          None)
    eos_only = info_with(["<eos>"])
    appended = family.objective.data(eos_only, 8, 1)
    assert (appended.cls_id, appended.sep_id, appended.mask_id, appended.pad_id, appended.eos_id) == (4, 5, 6, 7, 0)
    assert 7 in appended.special_ids  # [PAD] is never drawn as a random replacement
    # Room for three only: an encoder trained before [PAD] existed resumes (and evaluates) without one.
    old = family.objective.data(eos_only, 7, 1)
    assert (old.cls_id, old.sep_id, old.mask_id, old.pad_id, old.vocab_size) == (4, 5, 6, None, 7)
    with pytest.raises(DataError, match="model.vocab_size=6 leaves no room for the encoder's"):
        family.objective.data(info_with(["<x>"]), 6, 1)
    with pytest.raises(DataError, match=r"has some of BERT's special tokens but not \['\[MASK\]', '\[PAD\]'\]"):
        family.objective.data(info_with(["[CLS]", "[SEP]"]), 8, 1)
