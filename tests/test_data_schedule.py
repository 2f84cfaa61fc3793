"""Data mixtures over time (data.schedule): the closed-form order against a replay, the realized shares
per phase, the static order unchanged, exact resume on another split, the resume rule (the past is
fixed, the future may change), and the config errors."""

from __future__ import annotations

import numpy as np
import pytest

from data_shards import DataError, make_train_loader
from data_shards.order import Mixer, SourceOrder, StreamOrder
from data_shards.schedule import Phase, ScheduledMixer, spread
from data_shards.state import receipt_update
from fm_train.config import ConfigError, build_config
from fm_train.config.mixture import describe_mixture, resolve_schedule

pytestmark = pytest.mark.unit


def _replay(mixer: ScheduledMixer, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Position by position: each position's source, and its index counted by walking the stream."""
    source, _ = mixer.split(np.arange(n))
    counts = np.zeros(mixer.n_sources, dtype=np.int64)
    k = np.empty(n, dtype=np.int64)
    for p, s in enumerate(source.tolist()):
        k[p] = counts[s]
        counts[s] += 1
    return source, k


def test_static_order_is_bit_identical_to_before_schedules():
    # Receipt and counts of a three-source static mixture, computed with the code before data.schedule existed.
    orders = [SourceOrder(s, seed=11, train=np.array([50, 70, 30]) + s, window=16) for s in range(3)]
    first = [np.array([0, 50 + s, 120 + 2 * s]) for s in range(3)]
    order = StreamOrder(orders, Mixer([0.5, 0.3, 0.2]), first)
    pos = np.arange(5000)
    assert f"{receipt_update(0, pos, order.sample_ids(*order.locate(pos))):016x}" == "029c856d363716b2"
    assert order.epochs(4321) == ([2161, 1296, 864], [14, 8, 5])
    # One constant phase of positive weights is the static mixture itself.
    scheduled = ScheduledMixer([Phase(0, (0.5, 0.3, 0.2))], 3)
    for a, b in zip(scheduled.split(pos), Mixer([0.5, 0.3, 0.2]).split(pos)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("seed", range(4))
def test_closed_form_equals_a_replay_at_every_position(seed):
    rng = np.random.default_rng(seed)
    batch, n_sources, phases, start = int(rng.integers(3, 17)), int(rng.integers(2, 5)), [], 0
    for i in range(int(rng.integers(1, 6))):
        w = rng.integers(0, 4, n_sources).astype(float)
        w[rng.integers(n_sources)] += 1  # never all zero
        end = start + batch * int(rng.integers(1, 9))
        phases.append(Phase(start, tuple(w), end=end, ramp_step=batch if i and rng.random() < 0.5 else 0))
        start = end
    mixer = ScheduledMixer(phases, n_sources)
    n = start + 3 * batch  # past the last phase too (its weights hold)
    source, k = _replay(mixer, n)
    assert np.array_equal(mixer.split(np.arange(n))[1], k)
    for p in rng.integers(0, n, 40).tolist():  # any position, alone: the counts before it
        assert mixer.consumed(p) == np.bincount(source[:p], minlength=n_sources).tolist()
        assert np.array_equal(mixer.split(np.array([p])), (source[p:p + 1], k[p:p + 1]))


def test_each_phase_realizes_its_weights_and_a_ramp_moves_step_by_step():
    g = 40
    mixer = ScheduledMixer([Phase(0, (0.75, 0.25), end=100 * g), Phase(100 * g, (0.0, 1.0), end=110 * g, ramp_step=g),
                            Phase(110 * g, (0.0, 1.0))], 2)
    source, _ = mixer.split(np.arange(120 * g))
    assert np.bincount(source[: 100 * g]).tolist() == [3000, 1000]  # 3:1 exactly over whole periods
    code = [int((source[(100 + m) * g:(101 + m) * g] == 1).sum()) for m in range(10)]
    assert code == [round(g * (0.25 + 0.75 * (m + 1) / 10)) for m in range(10)]  # the weights at each step's end
    assert (source[110 * g:] == 1).all()  # annealing: only the second source
    src, rank = spread(np.array([6, 2]))  # within a step the sources are spread, not in runs
    assert src.tolist() == [0, 0, 1, 0, 0, 0, 1, 0] and rank.tolist() == [0, 1, 0, 2, 3, 4, 1, 5]


def _loader(sources, dp_rank=0, dp_size=1, state=None, schedule=None, workers=0):
    return iter(make_train_loader(sources, seq_len=32, micro_batch=4 // dp_size, dp_rank=dp_rank, dp_size=dp_size,
                                  seed=3, state=state, schedule=schedule, verify_sha256=False, num_workers=workers))


def _phases(first_end: int = 5, g: int = 4) -> list[Phase]:
    return [Phase(0, (0.8, 0.2), end=first_end * g), Phase(first_end * g, (0.0, 1.0), end=9 * g, ramp_step=g),
            Phase(9 * g, (0.0, 1.0))]


def test_a_scheduled_stream_is_the_same_on_any_split_and_resumes_exactly(corpus):
    sources = [(str(corpus), 1.0), (str(corpus), 1.0)]  # two streams of one directory: independent orders
    whole = [next(it) for it in [_loader(sources, schedule=_phases())] for _ in range(12)]
    assert [b["source_ids"].tolist() for b in whole[-3:]] == [[1, 1, 1, 1]] * 3  # annealed
    assert whole[2]["state"]["consumed"] == [10, 2]  # 12 positions at 0.8 / 0.2
    pooled = _loader(sources, schedule=_phases(), workers=2)  # the schedule travels to loader workers by pickling
    assert all(bool((next(pooled)["input_ids"] == b["input_ids"]).all()) for b in whole)
    for after in (3, 5, 7):  # mid-phase, at the boundary, mid-ramp: resume on dp2 from dp1's state
        ranks = [_loader(sources, r, 2, state=whole[after - 1]["state"], schedule=_phases()) for r in range(2)]
        for b in whole[after:]:
            halves = [next(it) for it in ranks]
            assert torch_equal(b["input_ids"], halves[0]["input_ids"], halves[1]["input_ids"])
            assert b["receipt"] == halves[0]["receipt"] == halves[1]["receipt"]


def torch_equal(whole, first, second) -> bool:
    return bool((whole[:2] == first).all() and (whole[2:] == second).all())


def test_a_resume_may_change_the_future_of_the_schedule_but_not_its_past(corpus):
    sources = [(str(corpus), 1.0), (str(corpus), 1.0)]
    it = _loader(sources, schedule=_phases())
    batches = [next(it) for _ in range(6)]
    later = _phases(first_end=7)  # the first phase extended from step 5 to 7 after 4 steps: the past keeps its place
    resumed = _loader(sources, state=batches[3]["state"], schedule=later)
    assert next(resumed)["receipt"] == batches[4]["receipt"]  # step 5: constant weights in both
    assert next(resumed)["receipt"] != batches[5]["receipt"]  # step 6: still constant, no longer the ramp
    with pytest.raises(DataError, match="orders the 24 samples already consumed differently.*position 16"):
        _loader(sources, state=batches[5]["state"], schedule=_phases(first_end=4))
    with pytest.raises(DataError, match="already consumed differently.*position 0"):
        _loader(sources, state=batches[3]["state"])  # static weights 1:1 are another past
    # A static run's state resumes under a schedule whose first phase has its weights.
    plain = _loader([(str(corpus), 0.8), (str(corpus), 0.2)])
    state = [next(plain) for _ in range(3)][-1]["state"]
    assert next(_loader(sources, state=state, schedule=_phases()))["receipt"] == batches[3]["receipt"]


def _cfg(tiny_config_dict: dict, schedule, sources=None, steps: int = 10):
    raw = dict(tiny_config_dict)
    raw["data"] = {**raw["data"], "schedule": schedule,
                   "sources": sources or [{"name": "web", "path": "data/a"}, {"name": "code", "path": "data/b"}]}
    raw["train"] = {**raw["train"], "steps": steps}
    return build_config(raw)


def test_a_schedule_resolves_to_sample_positions(tiny_config_dict):
    cfg = _cfg(tiny_config_dict, [{"until_step": 6, "weights": {"web": 0.7, "data/b": 0.3}},
                                  {"until_step": 8, "ramp_to": {"code": 1}}, {"weights": {"code": 1}}])
    g = cfg.global_batch
    assert resolve_schedule(cfg) == [{"start": 0, "end": 6 * g, "weights": [0.7, 0.3], "ramp_step": 0},
                                     {"start": 6 * g, "end": 8 * g, "weights": [0.0, 1.0], "ramp_step": g},
                                     {"start": 8 * g, "end": None, "weights": [0.0, 1.0], "ramp_step": 0}]
    assert describe_mixture(cfg) == ("schedule steps 0-6: web 0.70 code 0.30; steps 6-8: ramp to code 1.00;"
                                     " steps 8-end: code 1.00")  # the line `fm-train plan` prints


@pytest.mark.parametrize("schedule, sources, message", [
    ([{"until_step": 6, "weights": {"web": 1}}, {"until_step": 4, "weights": {"code": 1}}], None,
     r"data.schedule\[1\].until_step=4 is not after the previous phase's end \(step 6\): phases would overlap"),
    ([{"until_step": 6, "weights": {"web": 1}}], None, r"data.schedule ends at step 6 but train.steps=10"),
    ([{"weights": {"web": 1}}, {"weights": {"code": 1}}], None, r"data.schedule\[0\] has no until_step"),
    ([{"weights": {"books": 1}}], None, r"data.schedule\[0\].weights names source 'books', which is not in"),
    ([{"weights": {"web": 0, "code": 0}}], None, r"data.schedule\[0\].weights gives every source weight 0"),
    ([{"weights": {"web": -1, "code": 2}}], None, r"data.schedule\[0\].weights.web=-1.0 is not a weight"),
    ([{"until_step": 5, "ramp_to": {"web": 1}}, {"weights": {"web": 1}}], None,
     r"data.schedule\[0\] ramps, but the first phase has no earlier weights"),
    ([{"until_step": 5, "weights": {"web": 1}}, {"ramp_to": {"web": 1}}], None, r"a ramp needs until_step"),
    ([{"weights": {"web": 1}, "ramp_to": {"web": 1}}], None, r"needs exactly one of weights"),
    ([{"weights": {"web": 1}}], [{"path": "x/web"}, {"path": "y/web"}], r"have the same name \['web'\]"),
    ([{"weights": {"web": 1}}], [{"name": "web", "path": "a", "weight": 2.0}, {"name": "code", "path": "b"}],
     r"data.sources\[0\].weight=2.0 is set, but data.schedule gives the weights"),
])
def test_bad_schedules_are_config_errors_naming_the_field(tiny_config_dict, schedule, sources, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tiny_config_dict, schedule, sources)


def test_per_sample_losses_add_up_to_the_loss_and_split_by_source():
    import torch
    import torch.nn.functional as F

    from fm_train.engine.source_metrics import SourceMeter, per_sample_cross_entropy

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 12, generator=gen)  # vocab 10 padded to 12
    labels = torch.randint(0, 10, (3, 5), generator=gen)
    labels[1, :2] = -100  # masked-LM style: tokens that do not count
    sums, counts = per_sample_cross_entropy(logits, labels, vocab_size=10)
    assert counts.tolist() == [5, 3, 5]
    loss = F.cross_entropy(logits[..., :10].reshape(-1, 10), labels.reshape(-1), ignore_index=-100)
    assert float(sums.sum() / counts.sum()) == pytest.approx(float(loss), rel=1e-6)
    meter = SourceMeter(["web", "code"], seq_len=5, device=torch.device("cpu"), losses=True)
    meter.add([(torch.tensor([1, 0, 1]), sums, counts)])
    record = meter.record({"consumed": [7, 9]})
    assert record["tokens_seen/web"] == 35 and record["tokens_seen/code"] == 45
    assert record["loss/web"] == pytest.approx(float(sums[1] / 3), rel=1e-6)
    assert record["loss/code"] == pytest.approx(float((sums[0] + sums[2]) / 10), rel=1e-6)
    assert meter.record(None) == {"loss/web": None, "loss/code": None}  # reset after a record


def test_a_saved_schedule_cannot_ask_for_an_unbounded_ramp():
    # A checkpoint's data state is untrusted: a ramp of 2^40 steps would build a segment per step.
    from data_shards.schedule import MAX_RAMP_STEPS

    hostile = [Phase(0, (1.0, 1.0), end=8), Phase(8, (1.0, 0.0), end=8 + 2**40, ramp_step=1)]
    with pytest.raises(DataError, match=r"a ramp of 1099511627776 steps exceeds the 1,048,576 a ramp may have"):
        ScheduledMixer(hostile, 2)
    ScheduledMixer([Phase(0, (1.0, 1.0), end=8), Phase(8, (1.0, 0.0), end=8 + 4 * 16, ramp_step=4)], 2)
    assert MAX_RAMP_STEPS == 1 << 20
