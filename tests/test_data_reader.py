"""The streaming reader: exact epochs for any split, exact resume across dp sizes, mixing, bad shards."""

from __future__ import annotations

import shutil
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_shards import BadShardError, BuildOptions, DataError, build_shards, check_sources, make_train_loader, make_val_loader
from data_shards.index import read_index

pytestmark = pytest.mark.unit
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SEQ = 15


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """Two sources with one tokenizer: 'a' has 3 shards (fewer than 4 ranks x 2 workers), 'b' several."""
    root = tmp_path_factory.mktemp("reader")
    a_in, b_in = root / "a.txt", root / "b.txt"
    a_in.write_text((STDLIB / "json" / "decoder.py").read_text())
    b_in.write_text((STDLIB / "email" / "message.py").read_text()[:30_000])
    common = dict(seq_len=SEQ, workers=0, progress=False)
    build_shards(BuildOptions(inputs=[str(a_in)], out=root / "a", vocab_size=300, shard_size=180_000, **common))
    build_shards(BuildOptions(inputs=[str(b_in)], out=root / "b", tokenizer_dir=root / "a" / "tokenizer",
                              shard_size=40_000, **common))
    assert len(read_index(root / "a").shards) == 3
    return {"a": root / "a", "b": root / "b", "root": root, "a_in": a_in}


def all_samples(directory: Path) -> list[bytes]:
    """Every stored sample, read with tarfile (independent of the reader under test)."""
    import tarfile

    out = []
    for shard in read_index(directory).shards:
        with tarfile.open(directory / shard.name) as tf:
            out += [tf.extractfile(m).read() for m in tf.getmembers()]
    return out


def global_stream(sources, *, dp: int, mb: int, steps: int, state=None, workers: int = 0, seed: int = 3,
                  **kw) -> tuple[list[bytes], list[dict]]:
    """Samples of ``steps`` global batches in global order (rank-major within a step), plus each step's
    rank-0 state; asserts that all ranks agree on state and receipt."""
    per_rank = []
    for r in range(dp):
        it = iter(make_train_loader(sources, seq_len=SEQ, micro_batch=mb, dp_rank=r, dp_size=dp, seed=seed,
                                    num_workers=workers, state=state, **kw))
        per_rank.append([next(it) for _ in range(steps)])
    samples, states = [], []
    for m in range(steps):
        batches = [per_rank[r][m] for r in range(dp)]
        assert all(b["state"] == batches[0]["state"] and b["receipt"] == batches[0]["receipt"] for b in batches)
        for b in batches:
            assert b["input_ids"].shape == (mb, SEQ) and b["input_ids"].dtype.is_floating_point is False
            assert (b["labels"][:, :-1] == b["input_ids"][:, 1:]).all()
            full = np.concatenate([b["input_ids"].numpy(), b["labels"].numpy()[:, -1:]], axis=1)
            samples += [row.astype("<u2").tobytes() for row in full]
        states.append(batches[0]["state"])
    return samples, states


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("dp", [1, 2, 4])
def test_every_sample_is_read_once_per_epoch(dirs, dp, workers):
    """Multiset equality per epoch for 1/2/4 ranks, 0/2 loader workers, with fewer shards than readers."""
    src = [(str(dirs["a"]), 1.0)]
    expected = Counter(all_samples(dirs["a"]))
    n = sum(expected.values())
    mb = 3
    steps = -(-2 * n // (mb * dp))
    samples, states = global_stream(src, dp=dp, mb=mb, steps=steps, workers=workers)
    assert Counter(samples[:n]) == expected and Counter(samples[n:2 * n]) == expected
    assert samples[:n] != samples[n:2 * n]  # epoch 2 has a fresh permutation
    assert states[-1]["epoch"] == [(steps * mb * dp) // n]


def test_order_depends_on_seed_not_on_split(dirs):
    src = [(str(dirs["a"]), 1.0)]
    one, s1 = global_stream(src, dp=1, mb=8, steps=6)
    two, s2 = global_stream(src, dp=2, mb=4, steps=6)
    four, s4 = global_stream(src, dp=4, mb=2, steps=6)
    assert one == two == four and s1 == s2 == s4
    other, _ = global_stream(src, dp=1, mb=8, steps=6, seed=4)
    assert other != one


@pytest.mark.parametrize("before,after", [((2, 2), (2, 2)), ((2, 2), (1, 4)), ((1, 4), (2, 2)), ((2, 3), (1, 6))])
def test_resume_continues_exactly(dirs, before, after):
    """(dp, micro_batch) before and after a save/restore: the concatenation equals the uninterrupted stream."""
    src = [(str(dirs["a"]), 2.0), (str(dirs["b"]), 1.0)]
    (dp0, mb0), (dp1, mb1) = before, after
    whole, whole_states = global_stream(src, dp=dp0, mb=mb0, steps=40, workers=2)
    head, head_states = global_stream(src, dp=dp0, mb=mb0, steps=25)
    tail, tail_states = global_stream(src, dp=dp1, mb=mb1, steps=15, state=head_states[-1], workers=2 if dp1 == 1 else 0)
    assert head + tail == whole
    assert tail_states[-1]["receipt"] == whole_states[-1]["receipt"]
    assert tail_states[-1]["position"] == 40 * dp0 * mb0


def test_receipt_proves_nothing_was_skipped_or_repeated(dirs):
    """A correct resume logs the uninterrupted run's receipts; a resume one batch off never does."""
    src = [(str(dirs["a"]), 1.0)]
    _, states = global_stream(src, dp=1, mb=4, steps=10)  # states[i]: after step i + 1
    assert len({s["receipt"] for s in states}) == 10
    _, ok = global_stream(src, dp=1, mb=4, steps=5, state=states[4])
    _, skipped = global_stream(src, dp=1, mb=4, steps=5, state=states[5])
    _, repeated = global_stream(src, dp=1, mb=4, steps=5, state=states[3])
    assert [s["receipt"] for s in ok] == [s["receipt"] for s in states[5:]]
    assert skipped[-1]["receipt"] != states[-1]["receipt"] and repeated[-1]["receipt"] != states[-1]["receipt"]


def test_receipt_is_order_sensitive_but_grouping_free():
    from data_shards.state import receipt_update

    pos, ids = np.arange(8), np.array([5, 9, 2, 7, 1, 1, 3, 8], dtype=np.uint64)
    whole = receipt_update(0, pos, ids)
    assert receipt_update(receipt_update(0, pos[:3], ids[:3]), pos[3:], ids[3:]) == whole
    assert receipt_update(0, pos, ids[[1, 0, 2, 3, 4, 5, 6, 7]]) != whole


def test_mixing_matches_weights(dirs):
    src = [(str(dirs["a"]), 0.7), (str(dirs["b"]), 0.3)]
    a = set(all_samples(dirs["a"]))
    samples, states = global_stream(src, dp=2, mb=50, steps=40)  # 4000 samples, several epochs of each
    share = sum(s in a for s in samples) / len(samples)
    assert abs(share - 0.7) < 0.01
    assert states[-1]["consumed"] == [2800, 1200]


def test_validation_split_is_held_out_and_stable(dirs):
    src = [(str(dirs["a"]), 1.0)]
    n = sum(s.samples for s in read_index(dirs["a"]).shards)
    train, _ = global_stream(src, dp=1, mb=1, steps=n, val_fraction=0.1)
    val_batches = [list(make_val_loader(src, seq_len=SEQ, micro_batch=2, dp_rank=r, dp_size=2, seed=3,
                                        val_fraction=0.1, max_batches=1000)) for r in range(2)]
    assert len(val_batches[0]) == len(val_batches[1]) == (n // 10) // 4
    val = {row.numpy().tobytes() for rank in val_batches for b in rank for row in b["input_ids"]}
    train_inputs = {np.frombuffer(s, "<u2")[:-1].astype(np.int64).tobytes() for s in train[: n - n // 10]}
    assert len(train_inputs) == len({s[:-2] for s in all_samples(dirs["a"])}) - n // 10
    assert not val & train_inputs
    again = list(make_val_loader(src, seq_len=SEQ, micro_batch=2, dp_rank=0, dp_size=2, seed=3, val_fraction=0.1,
                                 max_batches=1000))
    assert all((x["input_ids"] == y["input_ids"]).all() for x, y in zip(again, val_batches[0]))


def _copy(dirs, name: str) -> Path:
    dst = dirs["root"] / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(dirs["a"], dst)
    return dst


def test_bad_shards_fail_with_a_clear_error_or_are_skipped_identically(dirs):
    d = _copy(dirs, "truncated")
    shard = d / read_index(d).shards[1].name
    shard.write_bytes(shard.read_bytes()[:5000])
    src = [(str(d), 1.0)]
    with pytest.raises(DataError, match=r"shard-000001\.tar is truncated.*fm-train shard --verify.*on_bad_shard"):
        make_train_loader(src, seq_len=SEQ, micro_batch=2, dp_rank=0, dp_size=1, seed=0)
    index, original = read_index(d), all_samples(dirs["a"])
    kept = original[:index.shards[0].samples] + original[-index.shards[2].samples:]
    with pytest.warns(UserWarning, match="skipped"):
        samples, states = global_stream(src, dp=2, mb=2, steps=-(-len(kept) // 4), on_bad_shard="skip")
    assert states[0]["skipped_shards"] == ["0:shard-000001.tar"]
    assert Counter(samples[:len(kept)]) == Counter(kept)  # one epoch of the good shards, same on both ranks

    d = _copy(dirs, "missing")
    (d / read_index(d).shards[0].name).unlink()
    with pytest.raises(DataError, match="shard-000000.tar is missing"):
        make_train_loader([(str(d), 1.0)], seq_len=SEQ, micro_batch=2, dp_rank=0, dp_size=1, seed=0)

    d = _copy(dirs, "flipped")
    shard = d / read_index(d).shards[2].name
    data = bytearray(shard.read_bytes())
    data[3000] ^= 0xFF  # inside token data: only the sha256 can tell
    shard.write_bytes(bytes(data))
    # Found when the shard is first read (by default), not by the start-up check of every rank.
    stream = make_train_loader([(str(d), 1.0)], seq_len=SEQ, micro_batch=2, dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(BadShardError, match=rf"{shard.name} is corrupted: its sha256 is [0-9a-f]{{64}} but index"):
        for _ in zip(range(-(-read_index(d).num_samples // 2)), stream):
            pass


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_damaged_mid_file_is_named_by_key_and_left_out_by_skip_shards(dirs, workers):
    d = _copy(dirs, f"overwritten-{workers}")
    index = read_index(d)
    shard = d / index.shards[1].name
    with open(shard, "r+b") as fh:  # sample 3's tar header: the start-up check (first/last header) passes
        fh.seek(3 * index.stride_bytes)
        fh.write(b"\xff" * 100)
    src = [(str(d), 1.0)]
    epoch = -(-index.num_samples // 2)
    # The per-sample check, what ranged reads and data.verify_sha256: false rely on (the sha256 on first
    # read finds it too: tests/test_data_verify_on_read.py).
    stream = make_train_loader(src, seq_len=SEQ, micro_batch=2, dp_rank=0, dp_size=1, seed=0, num_workers=workers,
                               on_bad_shard="skip", verify_sha256=False)
    with pytest.raises(BadShardError, match=r"shard-000001\.tar is corrupted at sample 3 ") as caught:
        for _, _ in zip(range(epoch), stream):
            pass
    assert caught.value.key == "0:shard-000001.tar"  # also through loader worker processes

    index, original = read_index(d), all_samples(dirs["a"])
    kept = original[:index.shards[0].samples] + original[-index.shards[2].samples:]
    samples, states = global_stream(src, dp=2, mb=2, steps=-(-len(kept) // 4), workers=workers,
                                    skip_shards=[caught.value.key])
    assert states[-1]["skipped_shards"] == ["0:shard-000001.tar"]
    assert Counter(samples[:len(kept)]) == Counter(kept)


def test_token_bytes_overwritten_behind_an_intact_header_are_caught(dirs):
    d = _copy(dirs, "tokens-overwritten")
    index = read_index(d)
    with open(d / index.shards[0].name, "r+b") as fh:  # sample 2's first token, past its 512-byte header
        fh.seek(2 * index.stride_bytes + 512)
        fh.write(b"\xff\xff")
    stream = make_train_loader([(str(d), 1.0)], seq_len=SEQ, micro_batch=2, dp_rank=0, dp_size=1, seed=0,
                               verify_sha256=False)  # the per-sample check, without the sha256 on first read
    with pytest.raises(BadShardError, match=r"shard-000000\.tar is corrupted at sample 2 \(.*\): token id 65535 is"
                                            r" not below the vocabulary size 300") as caught:
        for _, _ in zip(range(-(-index.num_samples // 2)), stream):
            pass
    assert caught.value.key == "0:shard-000000.tar"


def test_inconsistent_sources_and_settings_are_refused(dirs, tmp_path):
    other = tmp_path / "other"
    build_shards(BuildOptions(inputs=[str(dirs["a_in"])], out=other, seq_len=SEQ, vocab_size=280, workers=0,
                              progress=False))
    with pytest.raises(DataError, match="different tokenizer.*--tokenizer"):
        check_sources([str(dirs["a"]), str(other)])
    info = check_sources([str(dirs["a"]), str(dirs["b"])], model_vocab_size=300)
    assert info.seq_len == SEQ and info.tokenizer_dir == dirs["a"] / "tokenizer" and info.vocab_size <= 300
    with pytest.raises(DataError, match="model.vocab_size is 100"):
        check_sources([str(dirs["a"])], model_vocab_size=100)
    with pytest.raises(DataError, match="data.seq_len is 16"):
        make_train_loader([(str(dirs["a"]), 1.0)], seq_len=16, micro_batch=2, dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(DataError, match="no index.json"):
        check_sources([str(tmp_path)])
    src = [(str(dirs["a"]), 1.0)]
    state = next(iter(make_train_loader(src, seq_len=SEQ, micro_batch=2, dp_rank=0, dp_size=1, seed=0)))["state"]
    with pytest.raises(DataError, match="seed: 0 -> 1"):
        make_train_loader(src, seq_len=SEQ, micro_batch=2, dp_rank=0, dp_size=1, seed=1, state=state)


def test_default_corpus_builds_once(tmp_path):
    from data_shards import build_default_corpus

    out = build_default_corpus(tmp_path / "stdlib", vocab_size=300, seq_len=SEQ, workers=0, max_bytes=100_000)
    index = read_index(out)
    assert index.num_samples > 100 and index.vocab_size <= 300
    stamp = (out / "index.json").stat().st_mtime_ns
    assert build_default_corpus(out, vocab_size=300, seq_len=SEQ) == out
    assert (out / "index.json").stat().st_mtime_ns == stamp


def test_source_order_survives_pickling_for_spawned_loader_workers():
    import pickle

    import numpy as np

    from data_shards.order import SourceOrder

    order = SourceOrder(source=0, seed=3, train=np.array([5, 7, 4]), window=4)
    positions = np.arange(0, 40)
    clone = pickle.loads(pickle.dumps(order))
    for a, b in zip(order.locate(positions), clone.locate(positions)):
        assert np.array_equal(a, b)
