"""fp32 weights and Adam moments out of a DeepSpeed step directory, one full tensor at a time.

Where each ZeRO stage keeps them is :mod:`fm_train.deepspeed_adapter.ckpt_ranks`' business (one reader per
model-parallel rank); this module merges the ranks: tensor-parallel shards (``mp_rank_XX``,
pipeline-major like DeepSpeed's grid) are concatenated along the split dims the manifest records, and
pipeline names (``{layer}.{param}``, ``tied_modules.{key}.{param}``) become fm_train names through the
manifest's layer table; the expert-parallel ranks' rows of each stacked expert parameter are stacked
again in the order of the manifest's ``experts`` record. The converter reads the weights; a resume on
another layout (:mod:`fm_train.checkpoint.reshard`) reads the weights, the moments and the step count.

Files are opened with ``torch.load(mmap=True, weights_only=True)`` (a step in object storage: read in
place, :mod:`fm_train.storage.ranged_reads`), so nothing is read until a parameter is asked for and
then only its slices: the resident set stays near one tensor plus one output shard, whatever the
model size (zero_to_fp32's ZeRO-1/2 path concatenates whole groups instead). Loads use
``weights_only=True`` with DeepSpeed's three plain record classes allowed, unless the caller trusts
the checkpoint.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from fm_train.deepspeed_adapter.ckpt_files import load_ds_file
from fm_train.deepspeed_adapter.ckpt_ranks import Zero0Rank, Zero3Rank, Zero12Rank
from fm_train.storage.errors import CheckpointError
from fm_train.deepspeed_adapter.ckpt_names import ds_to_fm, tp_split_dim

__all__ = ["DeepSpeedWeights", "load_ds_file"]

log = logging.getLogger("fm_train.checkpoint")
_LAYER_FILE = re.compile(r"^layer_([0-9]+)(?:-model_([0-9]+))?-model_states\.pt\Z")
# What a resume needs besides tensors, from the first model-states file (DeepSpeed writes it per mp rank).
ENGINE_FIELDS = ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")


class DeepSpeedWeights:
    """The fp32 state of one step directory under fm_train names: ``shapes()``, then ``get(name)`` for
    the weight or ``get(name, "exp_avg" | "exp_avg_sq")`` for Adam's moments, ``optimizer_step()`` and
    ``engine_state()`` (LR scheduler and DeepSpeed's step counters). ``tied``: the model's tied parameter ->
    the one it shares (the family's ``tied_params``)."""

    def __init__(self, step_dir: Path, manifest: Mapping[str, Any], *, tied: Mapping[str, str],
                 trust: bool = False) -> None:
        # A UPath in object storage stays one: its files are then read in place (ranged reads).
        self.step_dir = step_dir if hasattr(step_dir, "fs") else Path(step_dir)
        self.manifest = manifest
        self._trust = trust
        topo = manifest["topology"]
        self.tp, self.pp, self.dp, self.stage = topo["tp"], topo["pp"], topo["dp"], topo["zero_stage"]
        self.note = ""
        self._experts = _expert_names(manifest)
        # One reader per model-parallel rank, pipeline-major (mp = pp_stage * tp + tp_rank).
        self._ranks = [self._open_mp_rank(mp, trust) for mp in range(self.tp * self.pp)]
        self._index: dict[str, list[tuple[int, str]]] = {}  # fm name -> [(mp rank, ds name)]
        for mp, reader in enumerate(self._ranks):
            for ds_name in reader.shapes:
                self._index.setdefault(ds_to_fm(ds_name, manifest), []).append((mp, ds_name))
        for name, parts in self._index.items():
            # A tied module lives on the first and the last pipeline stage: keep the first stage's copy.
            first_stage = min(mp // self.tp for mp, _ in parts)
            self._index[name] = [(mp, ds) for mp, ds in parts if mp // self.tp == first_stage]
        for name in tied:
            # ZeRO-0 keeps a tied parameter as a second entry; Hugging Face stores the shared one only.
            self._index.pop(name, None)
        missing = sorted(self._experts - set(self._index))
        if missing:
            raise CheckpointError(f"{step_dir}: the manifest's experts record names {missing[:3]}, which no"
                                  " model-parallel rank's files hold")
        self._shapes = {n: self._merged_shape(n) for n in self._index}

    def _model_file(self, tag: str) -> Path:
        if self.stage == 3:
            return self.step_dir / f"zero_pp_rank_0_{tag}_model_states.pt"
        return self.step_dir / f"{tag}_model_states.pt"

    def _layer_files(self, tp_rank: int) -> dict[int, Path]:
        """Pipeline layer index -> this tp rank's ``layer_LL-model_TT-model_states.pt`` (ZeRO-0 pipelines)."""
        found = {}
        for name in self.manifest["files"]:  # the files the manifest vouches for, not whatever a glob finds
            m = _LAYER_FILE.match(name)
            if m and int(m.group(2) or 0) == tp_rank:
                found[int(m.group(1))] = self.step_dir / name
        return found

    def _tied_layers(self) -> dict[str, int]:
        """Pipeline tied key -> index of the layer whose file holds the tied module's weights."""
        index_of = {e["module"]: int(e["index"]) for e in self.manifest["layers"]}
        return {key: index_of[module] for key, module in self.manifest.get("tied", {}).items() if module in index_of}

    def _open_mp_rank(self, mp: int, trust: bool) -> Any:
        d, tag = self.step_dir, f"mp_rank_{mp:02d}"
        model_file = self._model_file(tag)
        if self._experts and self.stage not in (1, 2):
            raise CheckpointError(f"{d}: an expert-parallel step (ep={self.manifest['experts']['ep']}) saved with "
                                  f"ZeRO-{self.stage}; fm-train writes those with ZeRO-1 or 2 only")
        if self.stage in (0, 1, 2):
            bf16 = (d / f"bf16_zero_pp_rank_0_{tag}_optim_states.pt").exists()
            if self.stage == 0 and not bf16:
                if self.manifest["topology"]["precision"] != "fp32":
                    self.note = ("ZeRO-0 with fp16 training: exported from the 16-bit training weights "
                                 "(DeepSpeed's FP16 optimizer does not name its fp32 master copies)")
                layers = self._layer_files(mp % self.tp) if self.pp > 1 else {}
                return Zero0Rank(model_file, layers, self._tied_layers(), trust)
            optim = [d / f"{'bf16_' if bf16 else ''}zero_pp_rank_{r}_{tag}_optim_states.pt" for r in range(self.dp)]
            self.note = f"fp32 master weights from ZeRO-{self.stage} optimizer partitions (dp={self.dp})"
            if not self._experts:
                return Zero12Rank(model_file, optim, trust)
            return Zero12Rank(model_file, optim, trust, is_expert=lambda ds: ds_to_fm(ds, self.manifest) in self._experts,
                              ep=self.manifest["experts"]["ep"])
        if self.stage == 3:
            optim = [d / f"zero_pp_rank_{r}_{tag}_optim_states.pt" for r in range(self.dp)]
            self.note = f"fp32 master weights from ZeRO-3 partitions (dp={self.dp})"
            return Zero3Rank(model_file, optim, trust)
        raise CheckpointError(f"{d}: unknown ZeRO stage {self.stage} in the manifest")

    def _merged_shape(self, name: str) -> torch.Size:
        parts = self._index[name]
        shape = list(self._ranks[parts[0][0]].shapes[parts[0][1]])
        dim = tp_split_dim(name, self.manifest)
        if dim is not None and self.tp > 1:
            shape[dim] = sum(self._ranks[mp].shapes[ds][dim] for mp, ds in parts)
        return torch.Size(shape)

    def shapes(self) -> dict[str, torch.Size]:
        """Full (tp-merged) shape of every parameter, by fm_train name, in checkpoint order."""
        return dict(self._shapes)

    def get(self, name: str, key: str | None = None) -> torch.Tensor:
        """The full fp32 tensor of ``name`` (``key``: None for the weight, else an Adam moment), tp
        shards concatenated along the recorded dim."""
        parts = self._index[name]
        dim = tp_split_dim(name, self.manifest)
        if dim is None or self.tp == 1:
            # Replicated (or one shard): every tp rank holds the same values; the first is the copy.
            mp, ds = parts[0]
            return self._ranks[mp].get(ds, key)
        if len(parts) != self.tp:
            raise CheckpointError(f"{name}: {len(parts)} tp shards in {self.step_dir}, expected {self.tp}")
        return torch.cat([self._ranks[mp].get(ds, key) for mp, ds in sorted(parts)], dim=dim)

    def optimizer_step(self) -> int:
        """Adam's step count (equal on every rank); a clear error when the checkpoint has no moments."""
        steps = {r.step() for r in self._ranks}
        if None in steps or len(steps) != 1:
            raise CheckpointError(f"{self.step_dir}: Adam step counts {sorted(steps, key=str)} across model-parallel "
                               "ranks; expected one saved count (was it saved before the first step?)")
        return int(steps.pop())  # type: ignore[arg-type]

    def engine_state(self) -> dict[str, Any]:
        """LR scheduler state and DeepSpeed's ``global_steps``/``global_samples``/``skipped_steps``."""
        states = load_ds_file(self._model_file("mp_rank_00"), trust=self._trust)
        return {k: states.get(k) for k in ENGINE_FIELDS}


def _expert_names(manifest: Mapping[str, Any]) -> frozenset[str]:
    """fm_train names of the parameters whose rows expert parallelism split (none when ep = 1)."""
    record = manifest.get("experts")
    return frozenset(record["params"]) if record else frozenset()
