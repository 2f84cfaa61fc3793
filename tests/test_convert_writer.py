"""The streaming safetensors writer: what it writes is what ``safetensors`` reads back, in every dtype
and shard plan, and a tensor of the wrong shape stops it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fm_train.convert.writer import DTYPES, INDEX_FILE, SINGLE_FILE, plan_shards, write_safetensors

pytestmark = pytest.mark.unit


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (50, 16), "layers.0.q.weight": (16, 16), "layers.0.norm.weight": (16,),
              "layers.1.q.weight": (16, 16), "odd.weight": (3, 5, 7), "head.weight": (50, 16)}
    return {n: torch.randn(s, generator=gen) for n, s in shapes.items()}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("max_shard_bytes", [2**30, 3000])
def test_written_files_read_back_through_safetensors(tmp_path, dtype, max_shard_bytes):
    src = _tensors()
    # A transposed view: the writer must gather non-contiguous tensors, not write their storage.
    src["layers.1.q.weight"] = src["layers.1.q.weight"].t()
    torch_dtype = DTYPES[dtype]
    shapes = {n: t.shape for n, t in src.items()}
    weight_map = write_safetensors(tmp_path, shapes, src.__getitem__, torch_dtype, max_shard_bytes=max_shard_bytes)

    files = sorted({f for f in weight_map.values()})
    expected_files = len(plan_shards(shapes, torch_dtype, max_shard_bytes))
    assert len(files) == expected_files
    if expected_files == 1:
        assert files == [SINGLE_FILE] and not (tmp_path / INDEX_FILE).exists()
    else:
        index = json.loads((tmp_path / INDEX_FILE).read_text())
        assert index["weight_map"] == weight_map
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                      for t in (v.to(torch_dtype) for v in src.values()))
    got: dict[str, torch.Tensor] = {}
    for f in files:
        got.update(load_file(str(tmp_path / f)))
        with safe_open(str(tmp_path / f), framework="pt") as fh:
            assert fh.metadata() == {"format": "pt"}
    assert set(got) == set(src)
    for name, tensor in src.items():
        assert got[name].dtype == torch_dtype and got[name].shape == tensor.shape
        assert torch.equal(got[name], tensor.to(torch_dtype)), name


def test_a_tensor_of_the_wrong_shape_stops_the_writer(tmp_path):
    src = _tensors()
    shapes = {n: t.shape for n, t in src.items()}
    shapes["odd.weight"] = torch.Size((3, 5, 8))
    with pytest.raises(ValueError, match=r"odd.weight: got shape \(3, 5, 7\), planned \(3, 5, 8\)"):
        write_safetensors(tmp_path, shapes, src.__getitem__, torch.bfloat16)
