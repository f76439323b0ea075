"""LightningDataModules for 20 Newsgroups and the nine GLUE tasks.

Splits (``val_names``/``test_names``/``predict_names`` give the dataloader order):

* 20 Newsgroups: train = bydate train minus a validation part of ``val_fraction`` (default
  0.1, stratified by label, seeded); val = that part; test = predict = bydate test.
* GLUE with ``val_fraction > 0`` (default 0.1): val is carved from train (stratified; random
  for STS-B), test = the official dev set(s) (GLUE's test labels are not public), so models are
  selected on val and reported on dev. predict = the unlabelled official test set(s) (for GLUE
  submission files). ``val_fraction=0``: val = test = dev (selection on the reported split).
  MNLI has two dev/test sets: index 0 = matched, index 1 = mismatched.

Batches: ``input_ids``/``attention_mask`` (B, T) long, ``labels`` (B,) long or float (absent
for unlabelled splits), ``idx`` (B,) the row of the example in its source file, and
``token_type_ids`` (B, T) for pairs (and HF tokenizers that use them). Word-level pairs add
``input_ids_a``/``attention_mask_a`` and ``input_ids_b``/``attention_mask_b`` (each sentence
alone); their ``input_ids`` is ``<cls> a <sep> b``.
"""

from __future__ import annotations

from collections.abc import Iterable

from .base import RawSplit, TextDataModule, split_indices
from .glue import find_glue_task, load_glue_split
from .newsgroups import find_20newsgroups, load_20newsgroups, normalize_remove
from .tasks import get_task

__all__ = ["NewsgroupsDataModule", "GlueDataModule"]


class NewsgroupsDataModule(TextDataModule):
    """20 Newsgroups (bydate) classification, 20 classes; ``remove`` as in scikit-learn."""

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        max_length: int = 256,
        tokenizer: str = "word",
        min_freq: int = 2,
        max_vocab: int | None = 50000,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        remove: str | Iterable[str] | None = (),
        limit_train: int | None = None,
        limit_eval: int | None = None,
        bucket_batches: int = 100,
        sort_eval: bool = True,
        download: bool = True,
        ngram: int = 2,
    ) -> None:
        super().__init__(data_dir, batch_size, eval_batch_size, max_length, tokenizer,
                         min_freq, max_vocab, val_fraction, seed, num_workers, limit_train,
                         limit_eval, bucket_batches, sort_eval, download, ngram)
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction!r} is invalid for 20 Newsgroups: "
                             "must be in (0, 1)")
        self.remove = normalize_remove(remove)
        self.task_info = get_task("20newsgroups")
        self.save_hyperparameters()

    def prepare_data(self) -> None:
        """Locate (or download) the archive."""
        find_20newsgroups(self.data_dir, download=self.download)

    def _source(self) -> str:
        return str(find_20newsgroups(self.data_dir, download=False))

    def _load_raw(self) -> dict[str, list[RawSplit]]:
        tr = load_20newsgroups(self.data_dir, "train", self.remove, download=self.download)
        te = load_20newsgroups(self.data_dir, "test", self.remove, download=self.download)
        full = RawSplit("train", tr.texts, None, tr.labels, list(range(len(tr.texts))))
        test = RawSplit("test", te.texts, None, te.labels, list(range(len(te.texts))))
        train_rows, val_rows = split_indices(len(full), self.val_fraction, self.seed, tr.labels)
        return {"train": [full.subset(train_rows)], "val": [full.subset(val_rows, "val")],
                "test": [test], "predict": [test]}

    def describe(self) -> dict:
        """Data settings (``remove`` included) and split sizes."""
        return {**super().describe(), "remove": list(self.remove)}


class GlueDataModule(TextDataModule):
    """One GLUE task (``task``: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli)."""

    def __init__(
        self,
        task: str = "sst2",
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
        info = get_task(task)
        if not info.is_glue:
            raise ValueError(f"task={task!r} is not a GLUE task; use NewsgroupsDataModule")
        super().__init__(data_dir, batch_size, eval_batch_size, max_length, tokenizer,
                         min_freq, max_vocab, val_fraction, seed, num_workers, limit_train,
                         limit_eval, bucket_batches, sort_eval, download, ngram)
        self.task_info = info
        self.save_hyperparameters()

    def prepare_data(self) -> None:
        """Locate (or download) the task's files."""
        find_glue_task(self.task_name, self.data_dir, download=self.download)

    def _source(self) -> str:
        return str(find_glue_task(self.task_name, self.data_dir, download=False))

    def _split(self, name: str) -> RawSplit:
        s = load_glue_split(self.task_name, name, self.data_dir, download=self.download)
        return RawSplit(name, s.texts_a, s.texts_b, s.labels, list(range(len(s))))

    def _load_raw(self) -> dict[str, list[RawSplit]]:
        mnli = self.task_name == "mnli"
        dev = [self._split(n) for n in (("dev_matched", "dev_mismatched") if mnli else ("dev",))]
        pred = [self._split(n) for n in
                (("test_matched", "test_mismatched") if mnli else ("test",))]
        full = self._split("train")
        if self.val_fraction > 0:
            labels = None if self.is_regression else full.labels
            tr, va = split_indices(len(full), self.val_fraction, self.seed, labels)
            return {"train": [full.subset(tr)], "val": [full.subset(va, "val")],
                    "test": dev, "predict": pred}
        return {"train": [full], "val": dev, "test": dev, "predict": pred}
