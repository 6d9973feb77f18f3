"""Reservoir sampling is uniform, and every mixed batch holds the replay share it was asked for."""

from __future__ import annotations

import math
import random

import pytest

from common import UserError
from dataset import NativeFunctionCallingDataset
from replay_buffer import MixedBatchSampler, ReservoirBuffer, check_replay_settings, mixed_dataloader, replay_count


def test_reservoir_keeps_every_seen_item_with_equal_probability():
    stream, capacity, trials = 50, 10, 4000
    counts = [0] * stream
    for trial in range(trials):
        buffer = ReservoirBuffer(capacity, seed=trial)
        buffer.add_many(range(stream))
        assert len(buffer) == capacity and buffer.seen == stream
        for item in buffer.items:
            counts[item] += 1
    expected = trials * capacity / stream
    frequencies = [c / trials for c in counts]
    # Each item is kept with probability capacity / stream = 0.2 (standard error 0.0063 over 4000 trials).
    assert max(abs(f - capacity / stream) for f in frequencies) < 0.03
    # Early and late items alike: no drift along the stream.
    assert abs(sum(frequencies[:25]) - sum(frequencies[25:])) / 25 < 0.01
    chi_square = sum((c - expected) ** 2 / expected for c in counts)
    assert chi_square < 90  # 49 degrees of freedom: P(chi2 > 90) < 0.001 under uniformity


def test_reservoir_is_seeded_and_round_boundaries_do_not_matter():
    whole, split = ReservoirBuffer(7, seed=3), ReservoirBuffer(7, seed=3)
    whole.add_many(range(40))
    split.add_many(range(15))
    split.add_many(range(15, 40))
    assert whole.items == split.items and split.seen == 40


def test_reservoir_below_capacity_keeps_everything_and_samples_distinct_items():
    buffer = ReservoirBuffer(10, seed=0)
    buffer.add_many("abcd")
    assert buffer.items == list("abcd") and len(buffer) == 4
    drawn = buffer.sample(3, random.Random(1))
    assert len(drawn) == 3 and len(set(drawn)) == 3 and set(drawn) <= set("abcd")
    assert sorted(buffer.sample(9, random.Random(1))) == list("abcd")


def test_reservoir_needs_a_positive_capacity():
    with pytest.raises(UserError, match="--replay_buffer_size must be > 0"):
        ReservoirBuffer(0)


@pytest.mark.parametrize("batch_size, ratio, count", [(8, 0.25, 2), (8, 0.2, 2), (8, 0.0, 0), (1, 0.5, 1),
                                                       (4, 0.1, 0), (10, 0.35, 4)])
def test_replay_count_rounds_half_up(batch_size, ratio, count):
    assert replay_count(batch_size, ratio) == count


def test_a_ratio_that_leaves_no_new_samples_is_refused():
    assert check_replay_settings(8, 0.5) == 4
    with pytest.raises(UserError, match="leaves none for the round's own samples"):
        check_replay_settings(8, 1.0)


def test_every_batch_holds_the_replay_share_and_every_new_sample_once_per_epoch():
    sampler = MixedBatchSampler(num_new=30, num_replay=7, batch_size=8, replay_per_batch=2, shuffle=True, seed=0)
    assert len(sampler) == math.ceil(30 / 6)
    epochs = [list(sampler), list(sampler)]
    for batches in epochs:
        assert len(batches) == len(sampler)
        new = [i for batch in batches for i in batch if i < 30]
        assert sorted(new) == list(range(30))
        for batch in batches:
            replay = [i for i in batch if i >= 30]
            assert len(replay) == 2 and len(set(replay)) == 2 and all(30 <= i < 37 for i in replay)
    assert epochs[0] != epochs[1]
    again = MixedBatchSampler(num_new=30, num_replay=7, batch_size=8, replay_per_batch=2, shuffle=True, seed=0)
    assert list(again) == epochs[0]


def test_mixed_loader_batches_hold_round_and_replay_samples_at_the_ratio(tiny_tokenizer):
    def samples(tag: str, n: int) -> list[dict]:
        return [{"user_input": f"{tag} query {i}", "tools": ["get_weather"], "function_calls": ['{"city": "x"}']}
                for i in range(n)]

    def encode(name: str) -> list[int]:
        return tiny_tokenizer(f"[{name}]", add_special_tokens=False)["input_ids"]

    new = NativeFunctionCallingDataset(samples("new", 21), tiny_tokenizer, encode, 128, "train")
    old = NativeFunctionCallingDataset(samples("old", 9), tiny_tokenizer, encode, 128, "train")
    batch_size, ratio = 8, 0.25
    loader = mixed_dataloader(new, old, batch_size, replay_count(batch_size, ratio), tiny_tokenizer.pad_token_id,
                              shuffle=True, seed=5)
    seen_new = []
    for batch in loader:
        queries = batch["user_input"]
        n_old = sum(q.startswith("old") for q in queries)
        assert n_old == 2
        assert batch["input_ids"].shape[0] == len(queries) and batch["labels"] is not None
        seen_new += [q for q in queries if q.startswith("new")]
        if len(queries) == batch_size:
            assert n_old / batch_size == ratio
    assert sorted(seen_new) == sorted(s["user_input"] for s in samples("new", 21))
