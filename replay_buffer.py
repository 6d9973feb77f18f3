"""Experience replay for the LoRA baseline: a reservoir of earlier rounds' samples, mixed into every training batch.

`ReservoirBuffer` keeps a fixed-size uniform sample of everything it was offered (Vitter's algorithm R), so after any
number of rounds each sample seen so far is held with the same probability `capacity / seen`. Two policies
(`--replay_policy`) decide what the buffer is offered and how batches are mixed:

- `reservoir` (this toolkit): every earlier round's training samples are offered; each batch holds
  `replay_count(batch_size, ratio)` replayed samples (rounded half up) beside batch_size minus that many new ones, and
  every new sample is trained on once per epoch (`MixedBatchSampler`).
- `original` (the original toolkit's rule): after a round, `original_round_subset` (a random half of its training
  samples, at most 500) is offered; each batch of batch_size new samples gives up `int(len(batch) * ratio)` of them to
  as many replayed ones, so an epoch has as many steps as without replay and skips the displaced new samples
  (`DisplacingBatchSampler`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import partial
from typing import Iterable, Iterator

from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from common import UserError
from dataset import left_pad_collate


class ReservoirBuffer:
    """A fixed-capacity, uniform sample of every item offered to `add` (reservoir sampling, seeded)."""

    def __init__(self, capacity: int, seed: int = 0):
        if capacity <= 0:
            raise UserError(f"--replay_buffer_size must be > 0, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self._items: list = []
        self._rng = random.Random(seed)

    def add(self, item) -> None:
        """Offer one item: kept with probability capacity / seen, replacing a uniformly chosen resident."""
        self.seen += 1
        if len(self._items) < self.capacity:
            self._items.append(item)
            return
        slot = self._rng.randrange(self.seen)
        if slot < self.capacity:
            self._items[slot] = item

    def add_many(self, items: Iterable) -> None:
        for item in items:
            self.add(item)

    def sample(self, n: int, rng: random.Random) -> list:
        """Up to `n` distinct residents, drawn uniformly with the caller's generator."""
        return rng.sample(self._items, min(n, len(self._items)))

    @property
    def items(self) -> list:
        """The residents, in slot order."""
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)


REPLAY_POLICIES = ("reservoir", "original")
ORIGINAL_ROUND_CAP = 500


@dataclass(frozen=True)
class ReplaySettings:
    """The LoRA baseline's replay: the reservoir's capacity, the share of each batch replayed, and the policy."""

    buffer_size: int = 1000
    ratio: float = 0.2
    policy: str = "reservoir"


def replay_count(batch_size: int, ratio: float, policy: str = "reservoir") -> int:
    """Replay samples per batch: batch_size * ratio rounded half up (reservoir), or truncated (original)."""
    if policy == "original":
        return int(batch_size * ratio)
    return int(math.floor(batch_size * ratio + 0.5))


def original_round_subset(samples: list, seed: int | str) -> list:
    """What the original policy offers the buffer after a round: min(n // 2, 500) of its samples, drawn at random."""
    return random.Random(seed).sample(list(samples), min(len(samples) // 2, ORIGINAL_ROUND_CAP))


def check_replay_settings(batch_size: int, ratio: float, policy: str = "reservoir") -> int:
    """The replay count per batch; a ratio that leaves no room for the round's own samples is a UserError."""
    if policy not in REPLAY_POLICIES:
        raise UserError(f"--replay_policy: expected one of {', '.join(REPLAY_POLICIES)}, got {policy!r}")
    count = replay_count(batch_size, ratio, policy)
    if count >= batch_size:
        raise UserError(
            f"--replay_ratio {ratio} with --batch_size {batch_size} gives {count} replay samples per batch and leaves "
            "none for the round's own samples; lower --replay_ratio or raise --batch_size"
        )
    return count


class _ReplayBatchSampler(Sampler[list[int]]):
    """Index batches over `ConcatDataset([new, replay])`: the new samples cut into chunks of `chunk` (shuffled when
    asked), each made a batch by `_mix`; seeded, so the same seed gives the same batches."""

    def __init__(self, num_new: int, num_replay: int, chunk: int, shuffle: bool, seed: int):
        self.num_new = num_new
        self.num_replay = num_replay
        self.chunk = chunk
        self.shuffle = shuffle
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return math.ceil(self.num_new / self.chunk)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(self.num_new))
        if self.shuffle:
            self._rng.shuffle(order)
        for start in range(0, self.num_new, self.chunk):
            yield self._mix(order[start:start + self.chunk])

    def _mix(self, chunk: list[int]) -> list[int]:
        raise NotImplementedError

    def _replayed(self, count: int) -> list[int]:
        """`count` distinct replay samples, drawn uniformly, as indices into the concatenation."""
        return [self.num_new + index for index in self._rng.sample(range(self.num_replay), count)]


class MixedBatchSampler(_ReplayBatchSampler):
    """Each batch is up to batch_size - k new samples (every new sample once per epoch, shuffled when asked) plus k
    distinct replay samples drawn uniformly."""

    def __init__(self, num_new: int, num_replay: int, batch_size: int, replay_per_batch: int, shuffle: bool,
                 seed: int):
        if not 0 <= replay_per_batch < batch_size:
            raise ValueError(f"replay_per_batch must be in [0, {batch_size}), got {replay_per_batch}")
        super().__init__(num_new, num_replay, batch_size - replay_per_batch, shuffle, seed)
        self.replay_per_batch = min(replay_per_batch, num_replay)

    def _mix(self, chunk: list[int]) -> list[int]:
        return chunk + self._replayed(self.replay_per_batch)


class DisplacingBatchSampler(_ReplayBatchSampler):
    """The original's rule: the new samples are cut into batches of batch_size (shuffled when asked); in each, the last
    `int(len(batch) * ratio)` give way to as many distinct replay samples (fewer when the buffer holds fewer)."""

    def __init__(self, num_new: int, num_replay: int, batch_size: int, ratio: float, shuffle: bool, seed: int):
        if replay_count(batch_size, ratio, "original") >= batch_size:
            raise ValueError(f"ratio {ratio} leaves no new sample in a batch of {batch_size}")
        super().__init__(num_new, num_replay, batch_size, shuffle, seed)
        self.ratio = ratio

    def _mix(self, chunk: list[int]) -> list[int]:
        displaced = replay_count(len(chunk), self.ratio, "original")
        return chunk[:len(chunk) - displaced] + self._replayed(min(displaced, self.num_replay))


def mixed_dataloader(new: Dataset, replay: Dataset, batch_size: int, replay_per_batch: int, pad_token_id: int,
                     shuffle: bool, seed: int) -> DataLoader:
    """A left-padding loader whose every batch mixes `replay_per_batch` replay samples into the new ones."""
    sampler = MixedBatchSampler(len(new), len(replay), batch_size, replay_per_batch, shuffle, seed)
    return sampled_dataloader(new, replay, sampler, pad_token_id)


def sampled_dataloader(new: Dataset, replay: Dataset, sampler: Sampler[list[int]], pad_token_id: int) -> DataLoader:
    """A left-padding loader over `ConcatDataset([new, replay])` whose batches `sampler` picks."""
    return DataLoader(ConcatDataset([new, replay]), batch_sampler=sampler,
                      collate_fn=partial(left_pad_collate, pad_token_id=pad_token_id))

