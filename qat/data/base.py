"""Shared LightningDataModule logic: splitting, limiting, encoding, dataloaders, state.

Subclasses provide ``task_info`` and ``_load_raw()`` returning the raw splits:
``{"train": [RawSplit], "val": [...], "test": [...], "predict": [...]}`` (one entry per
dataloader; several only for MNLI).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection

from .batching import BucketBatchSampler, Collator, EncodedDataset, SortedBatchSampler
from .encoding import HFEncoder, WordEncoder, resolve_tokenizer
from .metrics import task_metrics
from .tasks import TaskInfo
from .tfidf import TfidfEncoder
from .vocab import Vocab

__all__ = ["RawSplit", "TextDataModule", "split_indices", "limit_split"]

STAGES = ("train", "val", "test", "predict")


@dataclass
class RawSplit:
    """Texts (second sentence for pairs), labels (None if unlabelled) and example ids ``idx``
    (position in the source file), plus a display name (``dev_matched`` ...)."""

    name: str
    texts_a: list[str]
    texts_b: list[str] | None
    labels: list | None
    idx: list[int]

    def __len__(self) -> int:
        return len(self.texts_a)

    def subset(self, rows: Sequence[int], name: str | None = None) -> RawSplit:
        """The rows ``rows`` (positions in this split), ids kept."""
        return RawSplit(
            name or self.name,
            [self.texts_a[i] for i in rows],
            None if self.texts_b is None else [self.texts_b[i] for i in rows],
            None if self.labels is None else [self.labels[i] for i in rows],
            [self.idx[i] for i in rows],
        )


def split_indices(
    n: int, fraction: float, seed: int, labels: Sequence | None = None
) -> tuple[list[int], list[int]]:
    """(train rows, val rows): ``round(fraction * n_class)`` rows of each class go to val
    (stratified when ``labels`` are given; random otherwise), chosen with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    groups: dict[Any, list[int]] = defaultdict(list)
    for i in range(n):
        groups[labels[i] if labels is not None else 0].append(i)
    val: list[int] = []
    for key in sorted(groups):
        rows = groups[key]
        perm = torch.randperm(len(rows), generator=g).tolist()
        val += [rows[p] for p in perm[: round(fraction * len(rows))]]
    val_set = set(val)
    return [i for i in range(n) if i not in val_set], sorted(val)


def limit_split(split: RawSplit, limit: int | None, seed: int) -> RawSplit:
    """The first ``limit`` rows after a seeded shuffle (the split itself if no limit)."""
    if limit is None or limit >= len(split):
        return split
    g = torch.Generator().manual_seed(seed)
    return split.subset(torch.randperm(len(split), generator=g)[:limit].tolist())


def _check_int(name: str, value: Any, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}={value!r} is invalid: must be an integer >= {low}"
                         + (" or None" if allow_none else ""))


class TextDataModule(L.LightningDataModule):
    """Base class of :class:`NewsgroupsDataModule` and :class:`GlueDataModule`."""

    task_info: TaskInfo

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        max_length: int = 128,
        tokenizer: str = "word",
        min_freq: int = 1,
        max_vocab: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        limit_train: int | None = None,
        limit_eval: int | None = None,
        bucket_batches: int = 100,
        sort_eval: bool = True,
        download: bool = True,
        ngram: int = 2,
    ) -> None:
        super().__init__()
        _check_int("batch_size", batch_size, 1)
        _check_int("eval_batch_size", eval_batch_size, 1, allow_none=True)
        _check_int("max_length", max_length, 3)
        _check_int("min_freq", min_freq, 1)
        _check_int("max_vocab", max_vocab, 5, allow_none=True)
        _check_int("seed", seed, 0)
        _check_int("num_workers", num_workers, 0)
        _check_int("limit_train", limit_train, 1, allow_none=True)
        _check_int("limit_eval", limit_eval, 1, allow_none=True)
        _check_int("bucket_batches", bucket_batches, 1)
        _check_int("ngram", ngram, 1)
        if not isinstance(val_fraction, int | float) or not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction!r} is invalid: must be in [0, 1)")
        self.tokenizer_name, self.tokenizer_spec = tokenizer, resolve_tokenizer(tokenizer)
        self.data_dir, self.batch_size = data_dir, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_length, self.min_freq, self.max_vocab = max_length, min_freq, max_vocab
        self.val_fraction, self.seed, self.num_workers = float(val_fraction), seed, num_workers
        self.limit_train, self.limit_eval = limit_train, limit_eval
        self.bucket_batches, self.sort_eval, self.download = bucket_batches, sort_eval, download
        self.ngram = ngram  # tokenizer='tfidf': word n-grams up to this length
        self._vocab: Vocab | None = None
        self.encoder: WordEncoder | HFEncoder | TfidfEncoder | None = None
        self.splits: dict[str, list[RawSplit]] | None = None
        self._datasets: dict[tuple[str, int], EncodedDataset] = {}

    # ----- subclass hooks -----------------------------------------------------------------
    def _load_raw(self) -> dict[str, list[RawSplit]]:
        raise NotImplementedError

    def _source(self) -> str:
        return ""

    # ----- setup ---------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Load, split and limit the data (once). The tokenizer/vocabulary is built on first
        use (``vocab``, ``vocab_size``, ``pad_id``, a dataloader)."""
        if self.splits is None:
            raw = self._load_raw()
            raw["train"] = [limit_split(raw["train"][0], self.limit_train, self.seed)]
            for key in ("val", "test", "predict"):
                raw[key] = [limit_split(s, self.limit_eval, self.seed) for s in raw[key]]
            self.splits = raw

    def _ensure_encoder(self) -> WordEncoder | HFEncoder | TfidfEncoder:
        if self.encoder is None:
            self._build_encoder()
        assert self.encoder is not None
        return self.encoder

    def _build_encoder(self) -> None:
        if self.tokenizer_spec == "word":
            if self._vocab is None:
                self._require_setup()
                assert self.splits is not None
                train = self.splits["train"][0]
                texts = train.texts_a + (train.texts_b or [])
                self._vocab = Vocab.build(texts, self.min_freq, self.max_vocab)
            self.encoder = WordEncoder(self._vocab, self.max_length)
        elif self.tokenizer_spec == "tfidf":
            if not isinstance(self.encoder, TfidfEncoder):
                self._require_setup()
                assert self.splits is not None
                train = self.splits["train"][0]
                texts = train.texts_a if train.texts_b is None else [
                    f"{a} {b}" for a, b in zip(train.texts_a, train.texts_b, strict=True)]
                self.encoder = TfidfEncoder.fit(texts, self.ngram, self.min_freq,
                                                self.max_vocab, self.max_length)
        else:
            self.encoder = HFEncoder(self.tokenizer_spec, self.max_length)
        self._datasets = {}

    @property
    def vocab(self) -> Vocab | None:
        """The word (or TF-IDF term) vocabulary, built from the training split on first use;
        None for HF tokenizers."""
        if self.tokenizer_spec == "tfidf":
            return self._ensure_encoder().vocab  # type: ignore[union-attr]
        if self.tokenizer_spec != "word":
            return None
        self._ensure_encoder()
        return self._vocab

    def _require_setup(self) -> None:
        if self.splits is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() first")

    def dataset(self, stage: str, i: int = 0) -> EncodedDataset:
        """The encoded dataset of ``stage`` (train/val/test/predict), dataloader ``i``."""
        self._require_setup()
        encoder = self._ensure_encoder()
        assert self.splits is not None
        if stage not in STAGES:
            raise ValueError(f"stage={stage!r} is invalid: allowed {STAGES}")
        key = (stage, i)
        if key not in self._datasets:
            s = self.splits[stage][i]
            feats = encoder(s.texts_a, s.texts_b)
            self._datasets[key] = EncodedDataset(feats, s.labels, s.idx)
        return self._datasets[key]

    # ----- dataloaders ---------------------------------------------------------------------
    def _collator(self) -> Collator:
        return Collator(self.pad_id, regression=self.is_regression)

    def _loader(self, ds: EncodedDataset, train: bool) -> DataLoader:
        if train:
            sampler: BucketBatchSampler | SortedBatchSampler = BucketBatchSampler.from_lengths(
                ds.lengths(), self.batch_size, seed=self.seed, bucket_batches=self.bucket_batches)
        else:
            sampler = SortedBatchSampler.from_lengths(ds.lengths(), self.eval_batch_size,
                                                      self.sort_eval)
        # a private generator: creating an iterator must not draw from the global RNG, or a
        # resumed run's dropout stream would differ from an uninterrupted run's
        return DataLoader(ds, batch_sampler=sampler, collate_fn=self._collator(),
                          num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.seed))

    def _loaders(self, stage: str) -> DataLoader | list[DataLoader]:
        self._require_setup()
        assert self.splits is not None
        loaders = [self._loader(self.dataset(stage, i), stage == "train")
                   for i in range(len(self.splits[stage]))]
        return loaders[0] if len(loaders) == 1 else loaders

    def train_dataloader(self) -> DataLoader:
        """Bucketed, shuffled training batches (deterministic given ``seed`` and epoch)."""
        return self._loaders("train")  # type: ignore[return-value]

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation loader(s), in the order of :attr:`val_names`."""
        return self._loaders("val")

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """Labelled test loader(s), in the order of :attr:`test_names`."""
        return self._loaders("test")

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        """Loader(s) to predict on (GLUE: the unlabelled test files), see :attr:`predict_names`."""
        return self._loaders("predict")

    # ----- properties ----------------------------------------------------------------------
    @property
    def task_name(self) -> str:
        return self.task_info.name

    @property
    def num_labels(self) -> int:
        return self.task_info.num_labels

    @property
    def is_regression(self) -> bool:
        return self.task_info.is_regression

    @property
    def is_pair(self) -> bool:
        return self.task_info.is_pair

    @property
    def label_names(self) -> list[str]:
        return list(self.task_info.label_names)

    @property
    def main_metric(self) -> str:
        return self.task_info.main_metric

    @property
    def vocab_size(self) -> int:
        return self._ensure_encoder().vocab_size

    @property
    def pad_id(self) -> int:
        return self._ensure_encoder().pad_id

    def _names(self, stage: str) -> list[str]:
        self._require_setup()
        assert self.splits is not None
        return [s.name for s in self.splits[stage]]

    @property
    def val_names(self) -> list[str]:
        return self._names("val")

    @property
    def test_names(self) -> list[str]:
        return self._names("test")

    @property
    def predict_names(self) -> list[str]:
        return self._names("predict")

    def metrics(self, prefix: str | None = None) -> MetricCollection:
        """A fresh MetricCollection for this task (one per dataloader)."""
        return task_metrics(self.task_info, prefix=prefix)

    def describe(self) -> dict[str, Any]:
        """Data settings and split sizes, for result records."""
        d: dict[str, Any] = {
            "task": self.task_name, "source": self._source(), "tokenizer": self.tokenizer_name,
            "max_length": self.max_length, "val_fraction": self.val_fraction,
            "tokenizer_path": self.tokenizer_spec, "val_split": self._val_split_kind(),
            "seed": self.seed, "limit_train": self.limit_train, "limit_eval": self.limit_eval,
            "min_freq": self.min_freq, "max_vocab": self.max_vocab,
        }
        if self.splits is not None:
            d["sizes"] = {k: {s.name: len(s) for s in v} for k, v in self.splits.items()}
        if self.encoder is not None:
            d["vocab_size"] = self.encoder.vocab_size
        return d

    def _val_split_kind(self) -> str:
        if not self.val_fraction:
            return "official dev set"
        how = "random" if self.is_regression else "stratified by label"
        return f"{self.val_fraction:g} of train, {how}, seed {self.seed}"

    # ----- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The word vocabulary or TF-IDF terms and idf (stored by Lightning in checkpoints);
        empty for HF tokenizers."""
        if self.tokenizer_spec == "tfidf" and (self.encoder is not None
                                               or self.splits is not None):
            return {"tfidf": self._ensure_encoder().state_dict()}  # type: ignore[union-attr]
        if self.tokenizer_spec == "word" and (self._vocab is not None or self.splits is not None):
            vocab = self.vocab
            assert vocab is not None
            return {"vocab": vocab.state_dict()}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Use the checkpoint's vocabulary (datasets are re-encoded if it differs)."""
        if "tfidf" in state_dict:
            if self.tokenizer_spec != "tfidf":
                raise ValueError(f"the checkpoint holds TF-IDF terms but tokenizer="
                                 f"{self.tokenizer_name!r}; use tokenizer='tfidf'")
            enc = TfidfEncoder.from_state_dict(state_dict["tfidf"], self.max_length)
            if not isinstance(self.encoder, TfidfEncoder) or (
                    enc.state_dict() != self.encoder.state_dict()):
                self.encoder, self._datasets = enc, {}
            return
        if "vocab" not in state_dict:
            return
        if self.tokenizer_spec != "word":
            raise ValueError(f"the checkpoint holds a word vocabulary but tokenizer="
                             f"{self.tokenizer_name!r}; use tokenizer='word'")
        vocab = Vocab.from_state_dict(state_dict["vocab"])
        if vocab != self._vocab:
            self._vocab = vocab
            if self.encoder is not None:
                self._build_encoder()
