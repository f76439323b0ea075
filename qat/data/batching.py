"""Datasets of encoded examples, the padding collator and length-bucketing batch samplers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, Dataset, Sampler, SequentialSampler

__all__ = [
    "EncodedDataset",
    "Collator",
    "EpochSequentialSampler",
    "BucketBatchSampler",
    "SortedBatchSampler",
]


class EncodedDataset(Dataset):
    """Per-example id lists (``features[key][i]``), optional labels and example ids ``idx``."""

    def __init__(
        self,
        features: dict[str, list[list[int]]],
        labels: Sequence[int] | Sequence[float] | None,
        idx: Sequence[int],
    ) -> None:
        n = len(idx)
        for k, v in features.items():
            if len(v) != n:
                raise ValueError(f"feature {k!r} has {len(v)} rows, expected {n}")
        if labels is not None and len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} examples")
        self.features, self.labels, self.idx = features, labels, list(idx)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {k: v[i] for k, v in self.features.items()}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        item["idx"] = self.idx[i]
        return item

    def lengths(self) -> list[int]:
        """Length of each example's ``input_ids`` (what the samplers sort by)."""
        return [len(s) for s in self.features["input_ids"]]


class Collator:
    """Pad every ``*input_ids*``/``token_type_ids*`` list to the longest in the batch.

    ``*_weights`` lists (TF-IDF ``term_weights``) are padded with 0.0 as float32.
    ``input_ids`` gets ``attention_mask`` (long, 1 = token), ``input_ids_a`` gets
    ``attention_mask_a`` and so on. ``labels`` becomes long (classification) or float
    (regression); ``idx`` long. All tensors are ``(B, T)`` or ``(B,)``.
    """

    def __init__(self, pad_id: int, regression: bool = False) -> None:
        self.pad_id, self.regression = pad_id, regression

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for key in examples[0]:
            if key in ("labels", "idx"):
                continue
            seqs = [e[key] for e in examples]
            lens = torch.tensor([len(s) for s in seqs])
            t = int(lens.max())
            if key.endswith("_weights"):  # float per-token weights (TF-IDF bags): pad with 0
                batch[key] = torch.tensor([s + [0.0] * (t - len(s)) for s in seqs],
                                          dtype=torch.float32)
                continue
            pad = 0 if key.startswith("token_type_ids") else self.pad_id
            batch[key] = torch.tensor([s + [pad] * (t - len(s)) for s in seqs], dtype=torch.long)
            if key.startswith("input_ids"):
                mask = torch.arange(t)[None, :] < lens[:, None]  # (1, T) < (B, 1) -> (B, T)
                batch[key.replace("input_ids", "attention_mask")] = mask.long()
        if "labels" in examples[0]:
            dtype = torch.float32 if self.regression else torch.long
            batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=dtype)
        batch["idx"] = torch.tensor([e["idx"] for e in examples], dtype=torch.long)
        return batch


class EpochSequentialSampler(Sampler[int]):
    """``0 .. n-1`` in order, carrying the epoch for :class:`BucketBatchSampler`.

    Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler`` (this object) before
    every epoch; without Lightning each iteration advances the epoch by one.
    """

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        self.epoch += 1  # read by the batch sampler before iterating
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


class BucketBatchSampler(BatchSampler):
    """Training batches of similar length: shuffle, sort by length within chunks of
    ``bucket_batches`` batches, cut into batches, shuffle the batches.

    The order depends only on ``seed`` and the epoch, read from ``sampler.epoch`` (set by
    Lightning through ``set_epoch``; a ``DistributedSampler`` injected by Lightning works too:
    each rank buckets its own shard). Build it with :meth:`from_lengths`.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Iterable[int],
        batch_size: int,
        drop_last: bool = False,
        lengths: Sequence[int] = (),
        seed: int = 0,
        shuffle: bool = True,
        bucket_batches: int = 100,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)  # type: ignore[arg-type]
        if bucket_batches < 1:
            raise ValueError(f"bucket_batches={bucket_batches} must be >= 1")
        self.lengths, self.seed = list(lengths), seed
        self.shuffle, self.bucket_batches = shuffle, bucket_batches
        self._skip = 0

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], batch_size: int, seed: int = 0,
                     shuffle: bool = True, bucket_batches: int = 100,
                     drop_last: bool = False) -> BucketBatchSampler:
        """Bucketing over the examples ``0 .. len(lengths)-1``."""
        return cls(EpochSequentialSampler(len(lengths)), batch_size, drop_last, lengths, seed,
                   shuffle, bucket_batches)

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` (forwarded to the index sampler)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)  # type: ignore[union-attr]

    def skip_batches(self, n: int) -> None:
        """Resume mid-epoch: the next iteration leaves out its first ``n`` batches."""
        self._skip = int(n)

    def _chunks(self) -> list[int]:
        n, c = len(self.sampler), self.batch_size * self.bucket_batches  # type: ignore[arg-type]
        return [min(c, n - s) for s in range(0, n, c)]

    def __len__(self) -> int:
        b = self.batch_size
        return sum(k // b if self.drop_last else -(-k // b) for k in self._chunks())

    def __iter__(self) -> Iterator[list[int]]:
        epoch = int(getattr(self.sampler, "epoch", 0))
        order = list(self.sampler)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        if self.shuffle:
            order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
        b, chunk = self.batch_size, self.batch_size * self.bucket_batches
        batches: list[list[int]] = []
        for s in range(0, len(order), chunk):
            part = sorted(order[s : s + chunk], key=self.lengths.__getitem__)
            batches += [part[j : j + b] for j in range(0, len(part), b)]
        if self.drop_last:
            batches = [x for x in batches if len(x) == b]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        skip, self._skip = self._skip, 0
        yield from batches[skip:]


class SortedBatchSampler(BatchSampler):
    """Evaluation batches in order of decreasing length (``idx`` in the batch keeps identity).

    A ``BatchSampler`` with the standard ``(sampler, batch_size, drop_last)`` arguments, so
    Lightning can re-create it for prediction; build it with :meth:`from_lengths`.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Iterable[int],
        batch_size: int,
        drop_last: bool = False,
        lengths: Sequence[int] | None = None,
        sort: bool = True,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)  # type: ignore[arg-type]
        self.lengths, self.sort = lengths, sort

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], batch_size: int,
                     sort: bool = True) -> SortedBatchSampler:
        """Batches over the examples ``0 .. len(lengths)-1``."""
        return cls(SequentialSampler(range(len(lengths))), batch_size, False, list(lengths), sort)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        if self.sort and self.lengths is not None:
            lengths = self.lengths
            order.sort(key=lambda i: -lengths[i])
        b = self.batch_size
        for j in range(0, len(order), b):
            if not self.drop_last or j + b <= len(order):
                yield order[j : j + b]
