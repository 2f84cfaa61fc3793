"""``model.init_from`` reads only what a rank holds: its tp shards, its pipeline stage's layers, its
ZeRO-3 partitions, never the whole Hugging Face checkpoint.

On 2 gloo ranks (tp2, pp2, dp2 ZeRO-3) each rank opens a 44 MiB checkpoint the way the worker does and
builds its module from it. Measured per rank: the peak of its resident memory (VmRSS, anonymous and
mapped file pages, sampled by a thread reading ``/proc/self/status``) stays within what the rank holds
plus one tensor (21-26 MiB for 22 MiB held); the whole-file import (``get_tensor`` of every key)
peaked at 65 MiB on tp2 and ZeRO-3 and 50 MiB on pp2 (its memory-mapped tensors of every key stayed
mapped, and resident once touched, until the build ended). The elements requested through safetensors'
slice API are exactly (ZeRO-3: at most two rows per tensor more than) what the rank holds, and every
value equals the matching slice of the stored tensor. The loss equivalence of these layouts with the
Hugging Face model is in test_engine_import.py.
"""

from __future__ import annotations

import gc
import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from distributed import run_distributed

pytestmark = pytest.mark.multiproc

# Many layers next to a small vocabulary: the largest single tensor (2 MiB) is small against a rank's
# share (~24 MiB) and the whole model (~48 MiB), so the memory bound below tells the two apart.
HF_SHAPE = dict(vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
LAYOUTS = {"tp2": {"tp": 2, "zero_stage": 1}, "pp2": {"pp": 2, "zero_stage": 1}, "dp2-zero3": {"zero_stage": 3}}
SLACK = 8 * 2**20
"""Allocator and interpreter noise allowed on top of what the rank needs (bytes)."""


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    out = tmp_path_factory.mktemp("hf-slices") / "llama"
    LlamaForCausalLM(LlamaConfig(**HF_SHAPE)).save_pretrained(out)
    return out


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmRSS line")


class _PeakSampler:
    """Peak resident memory (VmRSS: anonymous and mapped file pages) of this process while the block runs, sampled every 0.5 ms."""

    def __enter__(self) -> "_PeakSampler":
        self.peak, self._stop = _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _raw(hf: Path, parallel: dict[str, Any]) -> dict[str, Any]:
    return {"run": {"dir": "unused", "seed": 1}, "model": {"init_from": str(hf)}, "precision": "fp32",
            "parallel": parallel, "cluster": {"workers": 2}, "data": {"seq_len": 32},
            "train": {"steps": 1, "micro_batch": 2, "eval_every": 0}, "optim": {"warmup_steps": 0}}


def _local_params(module: Any, cfg: Any) -> dict[str, Any]:
    """This rank's parameters by pure-model name (a pipeline's ``{layer}.{param}`` names mapped back)."""
    from fm_train.families.llama.model import args_from_config
    from fm_train.families.llama.pipeline import pipeline_layer_names

    layers = pipeline_layer_names(args_from_config(cfg.model))
    out = {}
    for name, p in module.named_parameters():
        if cfg.parallel.pp > 1:
            head, _, rest = name.partition(".")
            name = f"{layers[int(head)]}.{rest}"
        else:
            name = name.removeprefix("model.")  # ModelWithLoss's wrapper
        out[name] = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
    return out


def _build_from_hf(raw: dict[str, Any], layout: dict[str, Any]) -> dict[str, Any]:
    """Per rank: build the module from ``model.init_from`` as the worker does; what it read and holds,
    and the parameters whose values differ from their slice of the stored tensors."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from fm_train.config import build_config
    from fm_train.convert.keymap import hf_to_fm
    from fm_train.dist.groups import ParallelGroups
    from fm_train.dist.topology import Topology
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of
    from fm_train.dist.host_memory import HostMemory
    from fm_train.worker import _initial_weights

    HostMemory.configure("small", gpu=False)  # freed tensors go back to the OS at once, so the peak is honest
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = build_config(raw, require_paths=True)
    family = family_of(cfg.model)
    groups = ParallelGroups(Topology(world=cfg.world_size, tp=cfg.parallel.tp, pp=cfg.parallel.pp))
    build_train_module(cfg, family, groups)  # warm up (dropped at once): lazy imports and kernels are not the import's memory
    gc.collect()
    with _PeakSampler() as sampler:
        base = _rss_bytes()
        init = _initial_weights(cfg, family, resuming=False)
        module = build_train_module(cfg, family, groups, init=init)
    local = _local_params(module, cfg)
    rank = dist.get_rank()
    full = {hf_to_fm(family, k): v for k, v in load_file(str(Path(cfg.model.init_from) / "model.safetensors")).items()}
    wrong = [name for name, value in local.items()
             if not torch.equal(value.reshape(-1), _expected(full[name], name, layout, rank, value.numel()).reshape(-1))]
    # Small values only: the queue back to the parent is read after every rank has exited.
    return {"rank": rank, "peak": sampler.peak - base, "held": sum(t.numel() * t.element_size() for t in local.values()),
            "held_elements": sum(t.numel() for t in local.values()), "names": sorted(local), "wrong": wrong,
            "elements_read": getattr(init, "elements_read", None)}


def _expected(full: Any, name: str, layout: dict[str, Any], rank: int, n: int) -> Any:
    """What rank ``rank`` of ``layout`` must hold (``n`` elements) of the stored tensor ``full``."""
    import torch

    from fm_train.families.llama.tp_plan import TP_PLAN as LLAMA_TP_PLAN

    if layout.get("zero_stage") == 3:  # rank r's partition is the flat range [r * n, (r + 1) * n), zero padded
        part = full.reshape(-1)[rank * n:(rank + 1) * n]
        return part if part.numel() == n else torch.cat([part, part.new_zeros(n - part.numel())])
    dim = LLAMA_TP_PLAN.split_dim_of(name)
    return full if layout.get("tp", 1) == 1 or dim is None else full.chunk(layout["tp"], dim=dim)[rank]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_rank_reads_only_the_slices_it_holds(hf_dir: Path, layout: str) -> None:
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as fh:
        shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys()}
    model_elements = sum(math.prod(s) for s in shapes.values())
    model_bytes, largest = 4 * model_elements, 4 * max(math.prod(s) for s in shapes.values())  # fp32
    ranks = run_distributed(_build_from_hf, world_size=2, args=(_raw(hf_dir, LAYOUTS[layout]), LAYOUTS[layout]))
    for r in ranks:
        print(f"{layout} rank {r['rank']}: peak {r['peak'] / 2**20:.1f} MiB building from a {model_bytes / 2**20:.1f} MiB"
              f" checkpoint; holds {r['held'] / 2**20:.1f} MiB; read {r['elements_read']} of {model_elements} elements")
        # Memory: what the rank holds plus one tensor in flight, not the checkpoint (the whole-file
        # import kept every tensor of it mapped next to the module: peak about model_bytes + held).
        bound = r["held"] + largest + SLACK
        assert bound < model_bytes + r["held"] - SLACK, "the model is too small to tell a slice from the whole"
        assert r["peak"] < bound, (f"{layout} rank {r['rank']}: peak {r['peak'] / 2**20:.1f} MiB while building,"
                                   f" holds {r['held'] / 2**20:.1f} MiB of a {model_bytes / 2**20:.1f} MiB model")
        assert r["wrong"] == [], f"{layout} rank {r['rank']}: values differ from the stored slices: {r['wrong']}"
        # Elements requested through the slice API: exactly the rank's share (ZeRO-3: whole rows around
        # its flat range, at most two rows per tensor more).
        if layout == "dp2-zero3":
            rows = sum(2 * math.prod(s[1:]) for s in shapes.values())
            assert r["held_elements"] - rows <= r["elements_read"] <= r["held_elements"] + rows, r["elements_read"]
            assert r["elements_read"] < 0.6 * model_elements
        else:
            assert r["elements_read"] == r["held_elements"], (layout, r["rank"], r["elements_read"], r["held_elements"])
    if layout == "pp2":  # the two stages split the layers: neither holds (nor read) the other's
        names = [set(r["names"]) for r in ranks]
        assert not names[0] & names[1] and len(names[0] | names[1]) == len(shapes)


@pytest.mark.unit
def test_slices_flat_ranges_and_the_tied_head_read_what_they_name(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from fm_train.convert.errors import ConvertError
    from fm_train.convert.hf_weights import HFWeights
    from fm_train.families import family_of

    llama = family_of("llama")
    tied = llama.tied_params({"tie_embeddings": True})

    embed, down = torch.randn(10, 6), torch.randn(6, 9)
    save_file({"model.embed_tokens.weight": embed, "model.layers.0.mlp.down_proj.weight": down,
               "lm_head.weight": torch.zeros(10, 6)}, str(tmp_path / "model.safetensors"))
    want = {"model.embed_tokens.weight": embed.shape, "model.layers.0.mlp.down_proj.weight": down.shape}
    weights = HFWeights(tmp_path, llama, want=want, tied=tied)
    # A tied head reads the embedding (a stored lm_head.weight is ignored), chunked as torch.chunk does.
    assert torch.equal(weights.read("lm_head.weight", 0, 1, 2), embed.chunk(2, dim=0)[1])
    assert torch.equal(weights.read("model.layers.0.mlp.down_proj.weight", 1, 2, 3), down.chunk(3, dim=1)[2])
    assert weights.elements_read == 5 * 6 + 6 * 3
    for start, count in [(0, 1), (4, 11), (17, 37), (53, 1)]:  # inside a row, across rows, the tail
        assert torch.equal(weights.read_flat("model.layers.0.mlp.down_proj.weight", start, count),
                           down.reshape(-1)[start:start + count])
    with pytest.raises(ConvertError, match=r"wrong shapes \['model.embed_tokens.weight \(10, 6\) \(want \(12, 6\)\)'\]"):
        HFWeights(tmp_path, llama, want={**want, "model.embed_tokens.weight": torch.Size([12, 6])}, tied=tied)
    with pytest.raises(ConvertError, match=r"missing tensors \['model.norm.weight'\]"):
        HFWeights(tmp_path, llama, want={**want, "model.norm.weight": torch.Size([6])}, tied=tied)
