"""The global shuffle: a keyed bijection per epoch that mixes the whole source, independent of the
number of readers; the windowed order stays available and a saved state keeps its mode; a shard left
out mid-epoch drops only its own samples."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from data_shards import BuildOptions, DataError, build_shards, make_train_loader
from data_shards.index import read_index
from data_shards.order import SourceOrder, feistel_permute

pytestmark = pytest.mark.unit
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SEQ = 15


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4099, 65_537])
def test_feistel_is_a_bijection_of_the_range_and_depends_on_its_key(n):
    x = np.arange(n)
    a, b = feistel_permute(x, n, (1, 2, 3)), feistel_permute(x, n, (1, 2, 4))
    assert np.array_equal(np.sort(a), x) and np.array_equal(np.sort(b), x)
    if n >= 64:
        assert (a != b).mean() > 0.9  # another key (seed, source or epoch): another order
        assert abs(np.corrcoef(x, a.astype(np.int64))[0, 1]) < 0.1  # not close to the identity


def _first_batch_stats(shuffle: str, shards: int = 16, per_shard: int = 500, batch: int = 256) -> tuple[int, float]:
    """(distinct shards in the first global batch of epoch 0, mean over shards of the std of the epoch
    positions at which their samples appear, relative to a uniform spread)."""
    order = SourceOrder(0, seed=7, train=np.full(shards, per_shard), window=1024, shuffle=shuffle)
    shard, _ = order.locate(np.arange(batch))
    drawn = len(np.unique(shard))
    all_shard, _ = order.locate(np.arange(order.epoch_len))
    positions = np.arange(order.epoch_len)
    spread = np.mean([positions[all_shard == s].std() for s in range(shards)]) / (order.epoch_len / np.sqrt(12))
    return drawn, float(spread)


def test_the_global_order_mixes_shards_and_positions_the_windowed_one_does_not():
    drawn, spread = _first_batch_stats("global")
    assert drawn >= 14  # of 16 shards, in a batch of 256 (expected about 16)
    assert 0.9 < spread < 1.1  # every shard's samples are spread over the whole epoch
    drawn_w, spread_w = _first_batch_stats("window")
    assert drawn_w <= 3 and spread_w < 0.2  # a window of 1024 spans at most 3 shards of 500


def test_skipped_shards_are_never_drawn_and_every_sample_once_per_epoch():
    train = np.array([40, 0, 25, 33, 0, 7])
    order = SourceOrder(2, seed=1, train=train, window=8)
    shard, local = order.locate(np.arange(2 * order.epoch_len))
    for epoch in range(2):
        sl = slice(epoch * order.epoch_len, (epoch + 1) * order.epoch_len)
        pairs = set(zip(shard[sl].tolist(), local[sl].tolist()))
        assert pairs == {(s, i) for s in range(len(train)) for i in range(train[s])}
    assert not np.array_equal(shard[: order.epoch_len], shard[order.epoch_len:])  # each epoch its own order


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shuffle")
    text = root / "m.txt"
    text.write_text((STDLIB / "email" / "message.py").read_text()[:40_000])
    build_shards(BuildOptions(inputs=[str(text)], out=root / "m", vocab_size=300, shard_size=8_000, seq_len=SEQ,
                              workers=0, progress=False))
    assert len(read_index(root / "m").shards) >= 8
    return root / "m"


def _first_batches(directory: Path, shuffle: str, dp: int) -> tuple[list, dict]:
    """Each rank's first micro-batch of a global batch of 32, and the state after it."""
    ids, state = [], None
    for rank in range(dp):
        batch = next(iter(make_train_loader([(str(directory), 1.0)], seq_len=SEQ, micro_batch=32 // dp,
                                            dp_rank=rank, dp_size=dp, seed=5, shuffle=shuffle)))
        ids.append(batch["input_ids"])
        state = batch["state"]
    return ids, state


def test_loader_order_is_the_same_for_any_dp_size_and_a_state_keeps_its_mode(many_shards):
    one, state = _first_batches(many_shards, "global", 1)
    two, state2 = _first_batches(many_shards, "global", 2)
    import torch

    assert torch.equal(one[0], torch.cat(two))  # rank-major split of the same global batch
    assert state == state2 and state["config"]["shuffle"] == "global"
    window, _ = _first_batches(many_shards, "window", 1)
    assert not torch.equal(one[0], window[0])
    with pytest.raises(DataError, match=r"shuffle: 'global' -> 'window'"):
        make_train_loader([(str(many_shards), 1.0)], seq_len=SEQ, micro_batch=8, dp_rank=0, dp_size=1, seed=5,
                          shuffle="window", state=state)
    with pytest.raises(DataError, match=r"data.shuffle must be one of global, window, got 'random'"):
        make_train_loader([(str(many_shards), 1.0)], seq_len=SEQ, micro_batch=8, dp_rank=0, dp_size=1, seed=5,
                          shuffle="random")


def _stored_rows(directory: Path) -> dict[int, np.ndarray]:
    """Every stored sample by its id (read with tarfile, independent of the reader under test)."""
    import tarfile

    rows = {}
    for shard in read_index(directory).shards:
        with tarfile.open(directory / shard.name) as tf:
            for local, member in enumerate(tf.getmembers()):
                rows[shard.first_sample + local] = np.frombuffer(tf.extractfile(member).read(), dtype="<u2")
    return rows


def _consume(stream, start: int, until: int, rows: dict[int, np.ndarray]) -> tuple[list[int], dict]:
    """Ids of the samples the stream delivers at positions below ``until``, checked against the stored
    tokens, and the state after the last batch."""
    order, ids, position, state = stream._order, [], start, None
    for batch in stream:
        positions = order.select(position, len(batch["input_ids"]))
        got = np.concatenate([batch["input_ids"].numpy(), batch["labels"].numpy()[:, -1:]], axis=1)
        batch_ids = order.sample_ids(*order.locate(positions)).astype(np.int64).tolist()
        assert all(np.array_equal(got[i], rows[n]) for i, n in enumerate(batch_ids))  # the tokens are those samples
        ids += [n for n, p in zip(batch_ids, positions.tolist()) if p < until]
        position, state = batch["state"]["position"], batch["state"]
        if position >= until:
            return ids, state
    raise AssertionError("the stream ended")


@pytest.mark.parametrize("shuffle", ["global", "window"])
def test_a_shard_left_out_at_position_k_repeats_and_drops_no_other_sample(many_shards, shuffle):
    """A shard found bad after k positions and left out on the resume from k: no sample of the epoch is
    read twice, no healthy one is missed, and the left-out shard gives nothing after k."""
    rows = _stored_rows(many_shards)
    common = dict(seq_len=SEQ, micro_batch=8, dp_rank=0, dp_size=1, seed=5, shuffle=shuffle)
    first = make_train_loader([(str(many_shards), 1.0)], **common)
    epoch = first._order.orders[0].epoch_len
    k = 5 * 8
    before, state = _consume(first, 0, k, rows)
    assert len(before) == k and state["position"] == k
    # The shard of a sample due soon after k, which also gave samples before k (positions 0..k-1).
    shard_of = {n: s.name for s in read_index(many_shards).shards
                for n in range(s.first_sample, s.first_sample + s.samples)}
    bad = next(shard_of[n] for n in first._order.sample_ids(*first._order.locate(np.arange(k, epoch))).tolist()
               if shard_of[n] in {shard_of[m] for m in before})
    resumed = make_train_loader([(str(many_shards), 1.0)], state=state, skip_shards=[f"0:{bad}"], **common)
    after, end = _consume(resumed, k, epoch, rows)
    assert not set(before) & set(after) and len(after) == len(set(after))  # nothing read twice
    assert not any(shard_of[n] == bad for n in after)  # the left-out shard gives nothing after k
    healthy = {n for n in rows if shard_of[n] != bad}
    assert healthy <= set(before) | set(after)  # no healthy sample of the epoch missed
    assert end["skipped_shards"] == [f"0:{bad}"] and end["epoch"] == [end["position"] // epoch]
    again = make_train_loader([(str(many_shards), 1.0)], state=state, skip_shards=[f"0:{bad}"], **common)
    assert _consume(again, k, epoch, rows)[1]["receipt"] == end["receipt"]  # the same receipt on a second resume
