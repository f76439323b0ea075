"""Data: corpora readers, tokenization, batching, metrics and LightningDataModules."""

import importlib
from typing import Any

from .batching import BucketBatchSampler, Collator, EncodedDataset, SortedBatchSampler
from .encoding import HFEncoder, WordEncoder, minilm_path, resolve_tokenizer
from .glue import load_glue_split, read_glue_file, write_glue_predictions
from .newsgroups import load_20newsgroups
from .paths import cache_dir, resolve_data_dir
from .tasks import GLUE_TASKS, TASKS, TaskInfo, get_task
from .vocab import Vocab, glove_embeddings, tokenize

# imported on first use: they pull in lightning / torchmetrics, which are slow to import
_LAZY = {
    "GlueDataModule": ".datamodules",
    "NewsgroupsDataModule": ".datamodules",
    "RawSplit": ".base",
    "TextDataModule": ".base",
    "main_metric": ".metrics",
    "task_metrics": ".metrics",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BucketBatchSampler",
    "Collator",
    "EncodedDataset",
    "GLUE_TASKS",
    "GlueDataModule",
    "HFEncoder",
    "NewsgroupsDataModule",
    "RawSplit",
    "SortedBatchSampler",
    "TASKS",
    "TaskInfo",
    "TextDataModule",
    "Vocab",
    "WordEncoder",
    "cache_dir",
    "get_task",
    "glove_embeddings",
    "load_20newsgroups",
    "load_glue_split",
    "main_metric",
    "minilm_path",
    "read_glue_file",
    "resolve_data_dir",
    "resolve_tokenizer",
    "task_metrics",
    "tokenize",
    "write_glue_predictions",
]
