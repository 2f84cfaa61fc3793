"""Run the probe batch through a live training engine at save time and bring its summary to rank 0.

Every rank calls :func:`engine_probe` (the forward is collective: ZeRO-3 gathers parameters over dp,
tp layers reduce over tp, a pipeline passes activations between stages). The forward is the
training's own:

- a plain ``DeepSpeedEngine`` (any ZeRO stage, tp, sp): ``engine(input_ids, labels)``, with the wrapper's
  ``loss_fn`` (``fm_train.engine.train_module.ModelWithLoss``) swapped for one that keeps the logits
  for the length of the call (with sp, each rank's chunk, gathered along the sequence);
- a ``PipelineEngine``: ``eval_batch`` on one micro-batch with ``return_logits``; the activation
  shapes are reset before and after, since the probe's shape is not the training micro-batch's
  (:func:`fm_train.deepspeed_adapter.pipeline.pipeline_logits`).

With tp > 1 the logits are vocabulary shards; the tp group gathers them in tp-rank order. The rank
that then holds the full logits (rank 0, or the last stage's dp 0 / tp 0 rank of a pipeline)
summarises them and sends the summary to rank 0. Training state is left as found: eval mode only
for the call (then the previous mode), the global RNG states saved and restored around it (the
model has no dropout today; this keeps it true if it gets some), no gradients, no optimizer calls.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

from fm_train.checkpoint import collective
from fm_train.checkpoint.manifest import saved_padded_vocab
from fm_train.checkpoint.probe import FIELDS, probe_positions, probe_tokens, summarize
from fm_train.checkpoint.rng import capture_rng, restore_rng
from fm_train.parallel.sequence_parallel import pipeline_item, sequence_group
from fm_train.parallel.tensor_parallel import tensor_sequence_split

TPInfo = tuple[Any, int, int]  # (process group or None, this rank's index in it, its size)


def engine_probe(engine: Any, model_fields: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """The probe record (:func:`fm_train.checkpoint.probe.summarize`) of ``engine`` on rank 0, None elsewhere."""
    from fm_train.deepspeed_adapter.engine import is_pipeline_engine
    from fm_train.deepspeed_adapter.pipeline import pipeline_logits

    # A length the layout can split: the sp chunks, each split again by tp under its sequence split.
    split = sequence_group(engine.module).size * tensor_sequence_split(engine.module)
    tokens = probe_tokens(int(model_fields["vocab_size"]), int(model_fields["max_seq_len"]), split)
    rng, was_training = capture_rng(), engine.module.training
    try:
        if is_pipeline_engine(engine):
            sp = sequence_group(engine.module)
            local, tp, owner = pipeline_logits(engine, pipeline_item({"input_ids": tokens, "labels": tokens}, sp))
            if local is not None and sp.size > 1:
                local = _gather_sequence(local, sp.group, sp.size)
        else:
            local, tp, owner = _dense_logits(engine, tokens)
    finally:
        engine.train(was_training)
        restore_rng(rng)
    record = None
    if local is not None:
        full = _gather_vocab(local, tp)
        rows = saved_padded_vocab(model_fields)
        if full.shape[-1] != rows:
            raise RuntimeError(f"probe: the engine's gathered logits have {full.shape[-1]} columns, the model's "
                               f"padded vocabulary is {rows} (model.vocab_size={model_fields['vocab_size']})")
        if collective.rank() == owner:  # the padding columns are no token's: not part of the record
            record = summarize(full[..., :int(model_fields["vocab_size"])], tokens)
    return _to_rank0(record, owner, tokens, int(model_fields["vocab_size"]), engine.device)


@contextlib.contextmanager
def _keeping_logits(module: torch.nn.Module, into: dict[str, torch.Tensor]) -> Iterator[None]:
    """Swap ``module.loss_fn`` for one that stores the logits it is given (and returns a zero loss)."""
    if not callable(getattr(module, "loss_fn", None)):
        raise TypeError(f"probe: {type(module).__name__} has no loss_fn; fm-train's engines wrap the model in "
                        "ModelWithLoss (forward(input_ids, labels) = loss_fn(model(input_ids), labels))")
    original, head_loss = module.loss_fn, getattr(module, "head_loss", None)

    def keep(logits: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
        into["logits"] = logits.detach()
        return logits.new_zeros(())

    module.loss_fn = keep
    if head_loss is not None:  # the probe wants logits, not the fused head's per-token losses
        module.head_loss = False
    try:
        yield
    finally:
        module.loss_fn = original
        if head_loss is not None:
            module.head_loss = head_loss


def _dense_logits(engine: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, TPInfo, int]:
    """Every rank runs the probe (dp replicas compute the same logits); rank 0 owns the result."""
    mpu = getattr(engine, "mpu", None)
    tp: TPInfo = (None, 0, 1)
    if mpu is not None and mpu.get_tensor_model_parallel_world_size() > 1:
        tp = (mpu.get_tensor_model_parallel_group(), mpu.get_tensor_model_parallel_rank(),
              mpu.get_tensor_model_parallel_world_size())
    kept: dict[str, torch.Tensor] = {}
    ids = tokens.to(engine.device)
    engine.eval()
    with torch.no_grad(), _keeping_logits(engine.module, kept):
        engine(ids, ids)
    sp = sequence_group(engine.module)  # sequence parallelism: each rank has its chunk of the positions
    if sp.size > 1:
        return _gather_sequence(kept["logits"], sp.group, sp.size), tp, 0
    return kept["logits"], tp, 0


def _gather_sequence(local: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """The whole sequence's logits from the sp group's consecutive chunks (rank order is chunk order)."""
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _gather_vocab(local: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    """Full-vocabulary logits from this tp group's shards, ordered by tp rank (the vocab split order)."""
    group, rank, size = tp
    if size == 1:
        return local
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local, group=group)
    ranks = [torch.zeros(1, dtype=torch.int64, device=local.device) for _ in range(size)]
    dist.all_gather(ranks, torch.tensor([rank], dtype=torch.int64, device=local.device), group=group)
    order = sorted(range(size), key=lambda i: int(ranks[i].item()))
    return torch.cat([parts[i] for i in order], dim=-1)


def _to_rank0(record: dict[str, torch.Tensor] | None, owner: int, tokens: torch.Tensor, vocab: int,
              device: torch.device) -> dict[str, torch.Tensor] | None:
    """Move the owner's record to rank 0 as one flat fp32 tensor (every shape is known from ``tokens``)."""
    me = collective.rank()
    if owner == 0:
        return record if me == 0 else None
    rows, length = tokens.shape
    shapes = {"logits": (rows, len(probe_positions(length)), vocab), "logsumexp": (rows, length),
              "token_logits": (rows, length - 1)}
    sizes = [int(torch.Size(shapes[f]).numel()) for f in FIELDS]
    if me == owner:
        assert record is not None
        dist.send(torch.cat([record[f].reshape(-1) for f in FIELDS]).to(device), dst=0)
        return None
    if me != 0:
        return None
    flat = torch.empty(sum(sizes), dtype=torch.float32, device=device)
    dist.recv(flat, src=owner)
    out = {"input_ids": tokens.to(torch.int64), "positions": probe_positions(length)}
    for field, part in zip(FIELDS, flat.cpu().split(sizes)):
        out[field] = part.reshape(shapes[field]).contiguous()
    return out
