"""Packing: whole samples laid end to end in one row, and training micro-batches measured in tokens.

`PackedCollator` turns the samples of a micro-batch into one row: `input_ids`, `labels` and `position_ids` of shape
(1, T), positions restarting at 0 for every sample, and no `attention_mask`. transformers reads restarting positions
without a mask as packed samples and keeps each sample's attention inside itself: varlen kernels (flash attention,
llmft_varlen) get the sample boundaries, flex attention a document mask, SDPA and eager a block-diagonal causal mask.
The first label of every sample is ignored: in the row it would be predicted from the previous sample's last token,
and unpacked it is never a target (causal LM losses shift labels by one). So a packed micro-batch trains exactly the
targets the same samples padded would, with the same losses and gradients, and none of the padding's compute.

`TokenBudgetBatchSampler` decides which samples share a micro-batch: each epoch it shuffles the samples (seeded by
the run's seed and the epoch), cuts the order into windows of `window` samples and bin-packs each window
best-fit decreasing into micro-batches of at most `max_tokens` tokens. Every sample appears exactly once per epoch and
is never split. All epochs yield the same number of micro-batches (the Trainer plans steps from the first epoch's
length), a multiple of ranks x accumulation steps, so every rank takes the same number of steps and every optimizer
step holds the same samples however many ranks share them; epochs that packed into fewer are split up to that
number, which costs a few micro-batches of a thousand.

The heaviest micro-batches come first. Each epoch's `heaviest_first` micro-batches with the most tokens (the longest
sample breaking ties) are moved to its front — the Trainer moves a whole optimizer step's worth (ranks x
accumulation), so every rank starts on one of them and the first step holds the same micro-batches however ranks and
accumulation divide it — the rest keep their seeded order: a run that will run out of GPU memory on its largest
micro-batch does so in its first step, not hours later when the shuffle reaches it.
Memory follows the token count for activations and logits, and for attention kernels that materialise a mask or the
scores (SDPA with packing, eager) the longest row, which is the packed micro-batch itself. Without a token budget,
`LongestFirstSampler` does the same for the Trainer's per-sample batches: the longest samples fill the first
optimizer step.
"""

from __future__ import annotations

import bisect
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llmft.data.render import IGNORE_INDEX
from llmft.errors import ConfigError, DataError
from llmft.kernels import PAD_MULTIPLE

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from llmft.args import DataArguments
    from llmft.kernels import Kernels

logger = logging.getLogger(__name__)


@dataclass
class PackedCollator:
    """Samples ({"input_ids", "labels"} lists of equal length) -> one packed row; see the module docstring.

    The row is padded at its end to `pad_to` tokens when given (a fixed shape, which compiled kernels such as flex
    attention want), else to a multiple of `pad_to_multiple_of`. The padding is a sample of its own (positions
    restart, labels ignored), so no real token attends to it. With `sample_boundaries` the batch also carries the
    samples' cumulative offsets and the longest sample's length (`cu_seq_lens_q`/`_k`, `max_length_q`/`_k`), which
    variable-length attention kernels take as they are, computed here on the host rather than from `position_ids`
    on the GPU in every layer."""

    pad_token_id: int
    pad_to_multiple_of: int = PAD_MULTIPLE
    pad_to: int | None = None
    sample_boundaries: bool = False

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        input_ids, labels, positions, offsets = [], [], [], [0]
        for feature in features:
            ids = list(feature["input_ids"])
            if not ids:
                continue
            offsets.append(offsets[-1] + len(ids))
            input_ids.extend(ids)
            labels.append(IGNORE_INDEX)
            labels.extend(feature["labels"][1:])
            positions.extend(range(len(ids)))
        length = len(input_ids)
        target = (
            self.pad_to
            if self.pad_to is not None and self.pad_to >= length
            else (math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        )
        padding = target - length
        input_ids.extend([self.pad_token_id] * padding)
        labels.extend([IGNORE_INDEX] * padding)
        positions.extend(range(padding))
        batch = {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
        }
        if self.sample_boundaries:
            if padding:
                offsets.append(target)
            cu_seq_lens = torch.tensor(offsets, dtype=torch.int32)
            longest = max((b - a for a, b in zip(offsets, offsets[1:])), default=0)
            batch.update(
                cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=longest, max_length_k=longest
            )
        return batch


@dataclass(frozen=True)
class Packing:
    """How training micro-batches are made: packed by `collator`; `max_tokens` per micro-batch (None: the
    Trainer's per-device batch size in samples); samples bin-packed in windows of `window`."""

    collator: PackedCollator
    max_tokens: int | None = None
    window: int = 4096

    @classmethod
    def from_args(
        cls, data_args: DataArguments, tokenizer: PreTrainedTokenizerBase, kernels: Kernels
    ) -> "Packing | None":
        if not data_args.packing:
            return None
        collator = PackedCollator(
            tokenizer.pad_token_id, pad_to=kernels.pad_packed_to, sample_boundaries=kernels.takes_sample_boundaries
        )
        return cls(collator, data_args.max_tokens_per_batch or None, data_args.packing_window)


def best_fit_decreasing(lengths: Sequence[int], indices: Sequence[int], capacity: int) -> list[list[int]]:
    """`indices` grouped into bins whose `lengths` sum to at most `capacity`: longest first, each into the fullest bin
    that still has room for it (best-fit decreasing; at most 11/9 of the optimal number of bins, plus one). Samples of
    equal length keep their order in `indices`."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin number) of the bins with room, ascending
    for index in sorted(indices, key=lambda i: -lengths[i]):
        length = lengths[index]
        spot = bisect.bisect_left(free, (length, -1))  # the bin with the least room that is still enough
        if spot == len(free):
            bins.append([index])
            room, number = capacity - length, len(bins) - 1
        else:
            room, number = free.pop(spot)
            bins[number].append(index)
            room -= length
        if room > 0:
            bisect.insort(free, (room, number))
    return bins


class TokenBudgetBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of sample indices, at most `max_tokens` tokens each; see the module docstring.

    `lengths`: every sample's token count. Epochs 0 .. `num_epochs`-1 are packed up front to fix the common number of
    micro-batches; `num_epochs` may instead follow from `max_batches`, the micro-batches the run will take in all.
    A later epoch, should one come, is packed with other shuffles until it fits that number."""

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        *,
        window: int = 4096,
        seed: int = 0,
        num_epochs: int | None = None,
        max_batches: int | None = None,
        batches_multiple_of: int = 1,
        heaviest_first: int = 1,
    ) -> None:
        self.lengths = [int(n) for n in lengths]
        self.max_tokens, self.window, self.seed = max_tokens, window, seed
        self.heaviest_first = heaviest_first  # micro-batches moved to the front of every epoch
        if not self.lengths:
            raise DataError("no training sample to pack")
        longest = max(self.lengths)
        if longest > max_tokens:
            raise ConfigError(
                [
                    f"--max_tokens_per_batch {max_tokens}: sample {self.lengths.index(longest)} of the "
                    f"training data has {longest} tokens and would fit no micro-batch; raise it or lower "
                    "--model_max_length"
                ]
            )
        if len(self.lengths) < batches_multiple_of:
            raise DataError(
                f"{len(self.lengths)} training samples cannot fill the {batches_multiple_of} micro-batches "
                "of one optimizer step (ranks x gradient accumulation steps)"
            )
        counts = [len(self._pack(0))]
        if num_epochs is None:
            num_epochs = math.ceil((max_batches or counts[0]) / counts[0])
        counts += [len(self._pack(epoch)) for epoch in range(1, max(num_epochs, 1))]
        self.num_batches = math.ceil(max(counts) / batches_multiple_of) * batches_multiple_of
        self.epoch = 0
        self._cached: tuple[int, list[list[int]]] | None = None

    def _pack(self, epoch: int, attempt: int = 0) -> list[list[int]]:
        rng = random.Random(f"{self.seed}-{epoch}-{attempt}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), self.window):
            window = best_fit_decreasing(self.lengths, order[start : start + self.window], self.max_tokens)
            rng.shuffle(window)  # best-fit decreasing leaves the longest samples first
            batches.extend(window)
        return batches

    def batches(self, epoch: int) -> list[list[int]]:
        """The micro-batches of `epoch`, `len(self)` of them."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        for attempt in range(100):
            batches = self._pack(epoch, attempt)
            if len(batches) <= self.num_batches:
                break
        else:  # not reached in practice: epochs differ by a few micro-batches, and most shuffles fit
            raise DataError(
                f"epoch {epoch}: the samples would not pack into {self.num_batches} micro-batches of "
                f"{self.max_tokens} tokens"
            )
        batches = heaviest_first(_split_to(batches, self.num_batches), self.lengths, self.heaviest_first)
        self._cached = (epoch, batches)
        return batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)

    def unused_share(self) -> float:
        """The share of the token budget (micro-batches x max_tokens) no sample fills."""
        return 1 - sum(self.lengths) / (self.num_batches * self.max_tokens)


def _split_to(batches: list[list[int]], count: int) -> list[list[int]]:
    """`batches` with the most populous one split in two, in place, until there are `count` of them (a handful of
    splits: epochs pack into nearly the same number of micro-batches)."""
    batches = list(batches)
    while len(batches) < count:
        n = max(range(len(batches)), key=lambda i: len(batches[i]))
        batch = batches[n]
        batches[n : n + 1] = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]  # two or more: count <= samples
    return batches


def heaviest_first(batches: list[list[int]], lengths: Sequence[int], count: int) -> list[list[int]]:
    """`batches` with the `count` heaviest (most tokens, then the longest sample, then the earliest) moved to the
    front, heaviest first; the others keep their order."""

    def weight(n: int) -> tuple[int, int, int]:
        batch = batches[n]
        return sum(lengths[i] for i in batch), max((lengths[i] for i in batch), default=0), -n

    front = sorted(range(len(batches)), key=weight, reverse=True)[:count]
    chosen = set(front)
    return [batches[n] for n in front] + [batch for n, batch in enumerate(batches) if n not in chosen]


class LongestFirstSampler(torch.utils.data.Sampler):
    """The sample order of the Trainer's default sampler, with the `count` longest samples moved to the front.

    The order is accelerate's `SeedableRandomSampler`'s, which the Trainer's random sampler becomes: a permutation
    of torch.randperm with a generator seeded by `seed` + epoch; then the `count` longest samples (the Trainer gives
    per-device batch size x ranks x accumulation: the first optimizer step; ties: the earlier sample) are taken out of
    it and put first, longest first. It is no RandomSampler, so that accelerate keeps it; accelerate passes
    `set_epoch` on to it."""

    def __init__(self, lengths: Sequence[int], count: int, seed: int = 0) -> None:
        self.lengths, self.count, self.seed, self.epoch = [int(n) for n in lengths], count, seed, 0
        self.longest = sorted(range(len(self.lengths)), key=lambda i: (-self.lengths[i], i))[:count]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        first = set(self.longest)
        yield from self.longest
        yield from (i for i in order if i not in first)
        self.epoch += 1  # as SeedableRandomSampler does, for loaders that never call set_epoch


def sample_lengths(dataset: datasets.Dataset | torch.utils.data.Dataset) -> list[int]:
    """Token count of every sample of a rendered dataset (an Arrow dataset is read column-wise, without decoding)."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        import pyarrow.compute as pc

        column = dataset.with_format("arrow")[:]["input_ids"]
        return pc.list_value_length(column).to_pylist()
    return [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
