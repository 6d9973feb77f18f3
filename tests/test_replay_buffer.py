"""Reservoir sampling is uniform, and every mixed batch holds the replay share it was asked for."""

from __future__ import annotations

import math
import random

import pytest

from common import UserError
from dataset import NativeFunctionCallingDataset
from replay_buffer import (DisplacingBatchSampler, MixedBatchSampler, ReservoirBuffer, check_replay_settings,
                           mixed_dataloader, original_round_subset, replay_count)


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


@pytest.mark.parametrize("batch_size, ratio, original, reservoir", [(2, 0.2, 0, 0), (4, 0.2, 0, 1), (5, 0.2, 1, 1),
                                                                    (8, 0.2, 1, 2), (10, 0.35, 3, 4), (16, 0.2, 3, 3)])
def test_original_policy_truncates_the_replay_count(batch_size, ratio, original, reservoir):
    assert replay_count(batch_size, ratio, "original") == original
    assert replay_count(batch_size, ratio) == reservoir
    assert check_replay_settings(batch_size, ratio, "original") == original


def test_unknown_policy_is_refused():
    with pytest.raises(UserError, match="--replay_policy: expected one of reservoir, original"):
        check_replay_settings(8, 0.2, "fifo")


@pytest.mark.parametrize("n, kept", [(5000, 500), (1001, 500), (999, 499), (600, 300), (7, 3), (1, 0)])
def test_original_round_subset_is_half_the_round_capped_at_500(n, kept):
    items = list(range(n))
    subset = original_round_subset(items, seed=3)
    assert len(subset) == kept and len(set(subset)) == kept and set(subset) <= set(items)
    assert subset == original_round_subset(items, seed=3)


def test_displacing_batches_replace_new_samples_with_replayed_ones():
    # 23 new samples in batches of 8 (8, 8, 7): int(8 * 0.25) = 2, 2 and int(7 * 0.25) = 1 of them give way.
    sampler = DisplacingBatchSampler(num_new=23, num_replay=9, batch_size=8, ratio=0.25, shuffle=True, seed=0)
    assert len(sampler) == 3
    batches = list(sampler)
    assert [len(batch) for batch in batches] == [8, 8, 7]
    assert [sum(i >= 23 for i in batch) for batch in batches] == [2, 2, 1]
    new = [i for batch in batches for i in batch if i < 23]
    assert len(new) == len(set(new)) == 23 - 5
    assert all(len({i for i in batch if i >= 23}) == sum(i >= 23 for i in batch) for batch in batches)
    again = DisplacingBatchSampler(num_new=23, num_replay=9, batch_size=8, ratio=0.25, shuffle=True, seed=0)
    assert list(again) == batches and list(sampler) != batches
    small = DisplacingBatchSampler(num_new=16, num_replay=1, batch_size=8, ratio=0.25, shuffle=False, seed=0)
    assert list(small) == [[0, 1, 2, 3, 4, 5, 16], [8, 9, 10, 11, 12, 13, 16]]
    none = DisplacingBatchSampler(num_new=5, num_replay=4, batch_size=2, ratio=0.2, shuffle=False, seed=0)
    assert list(none) == [[0, 1], [2, 3], [4]]
