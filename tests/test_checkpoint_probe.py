"""The probe record and its comparison, in one process (the engine side runs in the multi-process tests)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fm_train.checkpoint.probe import (
    manifest_entry,
    probe_tokens,
    summarize,
    write_probe,
)
from fm_train.convert.probe import compare, read_probe, tolerance


def _logits(seed: int = 0, vocab: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = probe_tokens(vocab, 16)
    return torch.randn(*ids.shape, vocab, generator=gen) * 3, ids


def test_probe_tokens_are_fixed_and_leave_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a, b = probe_tokens(512, 64), probe_tokens(512, 64)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, b) and a.shape == (2, 32) and int(a.max()) < 512
    assert probe_tokens(512, 8).shape == (2, 8)  # never longer than the model's context


def test_summary_round_trips_through_the_file_and_matches_itself(tmp_path: Path) -> None:
    logits, ids = _logits()
    record = summarize(logits, ids)
    assert record["logits"].shape == (2, 3, 64) and record["positions"].tolist() == [0, 8, 15]
    assert torch.allclose(record["logsumexp"], torch.logsumexp(logits, -1))
    assert record["token_logits"][1, 4] == logits[1, 4, ids[1, 5]]
    write_probe(tmp_path, record, precision="fp32")
    back = read_probe(tmp_path, {"probe": manifest_entry(record, precision="fp32")})
    assert back is not None and compare(back, record, 1e-4).max_abs_diff == 0.0
    assert read_probe(tmp_path, {}) is None  # a manifest from before the probe


def test_a_permuted_vocabulary_shard_is_caught_with_its_place() -> None:
    """tp vocab shards concatenated in the wrong order: same set of values, other places."""
    logits, ids = _logits()
    want = summarize(logits, ids)
    swapped = torch.cat([logits[..., 32:], logits[..., :32]], dim=-1)
    worst = compare(summarize(swapped, ids), want, tolerance("fp32"))
    assert not worst.ok and worst.field in ("logits", "token_logits") and worst.max_abs_diff > 1
    assert "max abs diff" in worst.describe() and worst.field in worst.describe()
    # The log-sum-exp alone would not see it: it is invariant under a permutation of the vocabulary.
    assert torch.allclose(summarize(swapped, ids)["logsumexp"], want["logsumexp"])


def test_bounds_scale_with_the_logits_and_the_least_precise_dtype() -> None:
    logits, ids = _logits()
    want = summarize(logits, ids)
    assert tolerance("fp32", "bf16") == tolerance("bf16") > tolerance("fp16") > tolerance("fp32")
    near = summarize(logits + 1e-3 * torch.randn_like(logits), ids)
    assert compare(near, want, tolerance("bf16")).ok and not compare(near, want, tolerance("fp32")).ok
    bound = compare(want, want, 1e-4).bound
    assert math.isclose(bound, 1e-4 * want["logits"].abs().max().item())
    nan = dict(want, logits=want["logits"].clone())
    nan["logits"][0, 0, 0] = float("nan")
    assert not compare(nan, want, 1.0).ok


def test_records_of_other_batches_are_not_compared() -> None:
    logits, ids = _logits()
    other = ids.clone()
    other[0, 0] = (other[0, 0] + 1) % 64
    with pytest.raises(ValueError, match="different input batches"):
        compare(summarize(logits, other), summarize(logits, ids), 1e-4)


def test_the_probe_length_splits_over_the_sequence_parallel_ranks():
    assert probe_tokens(512, 64, multiple=8).shape == (2, 32)
    assert probe_tokens(512, 60, multiple=7).shape == (2, 28)  # rounded down to a multiple
    assert probe_tokens(512, 4096, multiple=64).shape == (2, 64)  # longer than usual when the split needs it
    assert probe_tokens(512, 30, multiple=64).shape == (2, 30)  # never past the model's context
