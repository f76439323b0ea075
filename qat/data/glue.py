"""GLUE readers for the official TSV layouts, and the GLUE submission-file writer.

Files are read as UTF-8 (a BOM, as in MRPC, is skipped) with quoting off (``csv.QUOTE_NONE``):
GLUE sentences contain quote characters. Columns are found by header name where the file has
a header; CoLA's train/dev have none (source, label, original mark, sentence) and STS-B uses
its last three columns (sentence1, sentence2, score). Any malformed row raises a ``ValueError``
naming the file and line.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .download import GLUE_URLS, MRPC_URLS, download_glue_task
from .paths import download_dir, resolve_data_dir
from .tasks import GLUE_TASKS, TaskInfo, get_task

__all__ = [
    "GlueSplit",
    "GLUE_SPLITS",
    "glue_split_files",
    "find_glue_task",
    "read_glue_file",
    "load_glue_split",
    "write_glue_predictions",
]

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

Col = str | int  # a header name, or a (possibly negative) column index

# split -> file name; "dev"/"test" splits of MNLI come in matched and mismatched versions
GLUE_SPLITS = ("train", "dev", "test", "dev_matched", "dev_mismatched", "test_matched",
               "test_mismatched")


@dataclass(frozen=True)
class _Layout:
    """Where the fields are. ``header=False``: columns are indices and rows have ``ncols``."""

    text_a: Col
    text_b: Col | None
    label: Col | None
    header: bool = True
    ncols: int | None = None
    index: Col | None = None


_TRAIN_DEV: dict[str, _Layout] = {
    "cola": _Layout(3, None, 1, header=False, ncols=4),
    "sst2": _Layout("sentence", None, "label"),
    "mrpc": _Layout("#1 String", "#2 String", "Quality"),
    "stsb": _Layout(-3, -2, -1, index="index"),
    "qqp": _Layout("question1", "question2", "is_duplicate", index="id"),
    "mnli": _Layout("sentence1", "sentence2", "gold_label", index="index"),
    "qnli": _Layout("question", "sentence", "label", index="index"),
    "rte": _Layout("sentence1", "sentence2", "label", index="index"),
    "wnli": _Layout("sentence1", "sentence2", "label", index="index"),
}
_TEST: dict[str, _Layout] = {
    "cola": _Layout("sentence", None, None, index="index"),
    "sst2": _Layout("sentence", None, None, index="index"),
    "mrpc": _Layout("#1 String", "#2 String", None, index="index"),
    "stsb": _Layout(-2, -1, None, index="index"),
    "qqp": _Layout("question1", "question2", None, index="id"),
    "mnli": _Layout("sentence1", "sentence2", None, index="index"),
    "qnli": _Layout("question", "sentence", None, index="index"),
    "rte": _Layout("sentence1", "sentence2", None, index="index"),
    "wnli": _Layout("sentence1", "sentence2", None, index="index"),
}


@dataclass
class GlueSplit:
    """One split. ``labels`` is None for the unlabelled test files; ``ids`` are the official
    index/id column values (the row position where the file has none); ``path`` the source."""

    texts_a: list[str]
    texts_b: list[str] | None
    labels: list[int] | list[float] | None
    ids: list[str]
    path: Path
    task: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts_a)


def glue_split_files(task: str) -> tuple[str, ...]:
    """The file names a task needs (``train.tsv``, ``dev.tsv``, ``test.tsv``; MNLI: six)."""
    info = get_task(task)
    if info.name == "mnli":
        return ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv", "test_matched.tsv",
                "test_mismatched.tsv")
    return ("train.tsv", "dev.tsv", "test.tsv")


def find_glue_task(task: str, data_dir: str | Path | None = None, download: bool = True) -> Path:
    """The folder ``<data_dir>/glue/<TASK>`` holding all the task's files (downloads if allowed)."""
    info = _glue_info(task)
    files = glue_split_files(info.name)
    roots = [resolve_data_dir(data_dir)]
    if download_dir().resolve() not in roots:
        roots.append(download_dir().resolve())
    tried = []
    for root in roots:
        for cand in (root / "glue" / info.dir_name, root / info.dir_name):
            tried.append(cand)
            if all((cand / f).is_file() for f in files):
                return cand
    error = None
    if download:
        try:
            return download_glue_task(info.dir_name, files, download_dir())
        except (OSError, ValueError) as exc:
            error = exc
    src = (MRPC_URLS if info.name == "mrpc" else {"zip": GLUE_URLS.get(info.dir_name)})
    listing = "\n  ".join(str(p) for p in tried)
    raise FileNotFoundError(
        f"GLUE {info.dir_name} not found: expected the files {list(files)} in one of\n  {listing}"
        f"\nGet them from the official GLUE download ({src}) or the Hugging Face 'glue' dataset "
        f"(written as TSV in the official layout) into <data_dir>/glue/{info.dir_name}/, "
        "or set data_dir / QAT_DATA_DIR."
        + (f"\nDownload failed: {error}" if error else " (download disabled)")
    )


def _glue_info(task: str) -> TaskInfo:
    info = get_task(task)
    if info.name not in GLUE_TASKS:
        raise ValueError(f"{task!r} is not a GLUE task; valid: {list(GLUE_TASKS)}")
    return info


def _resolve(col: Col | None, header: list[str] | None, path: Path) -> int | None:
    if col is None or isinstance(col, int):
        return col
    assert header is not None
    if col not in header:
        raise ValueError(f"{path}:1: missing column {col!r}; the header has {header}")
    return header.index(col)


def read_glue_file(path: str | Path, task: str, labelled: bool) -> GlueSplit:
    """Read one official GLUE TSV file of ``task`` (``labelled``: train/dev layout)."""
    info, path = _glue_info(task), Path(path)
    lay = (_TRAIN_DEV if labelled else _TEST)[info.name]
    texts_a: list[str] = []
    texts_b: list[str] = []
    labels: list = []
    ids: list[str] = []
    label_index = {name: i for i, name in enumerate(info.label_names)}
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None) if lay.header else None
        if lay.header and not header:
            raise ValueError(f"{path}: empty file (expected a header line) for GLUE {task}")
        cols = [_resolve(c, header, path) for c in (lay.text_a, lay.text_b, lay.label, lay.index)]
        ia, ib, il, ii = cols
        if lay.header:
            assert header is not None
            ncols = len(header)
            exact = not any(isinstance(c, int) and c < 0 for c in (lay.text_a, lay.text_b))
        else:
            ncols, exact = lay.ncols or 0, True
        for row in reader:
            line = reader.line_num
            if not row or row == [""]:
                continue  # a blank line
            if (len(row) != ncols) if exact else (len(row) < ncols):
                raise ValueError(
                    f"{path}:{line}: malformed row with {len(row)} fields, expected {ncols} "
                    f"(GLUE {info.dir_name} layout)"
                )
            texts_a.append(row[ia])  # type: ignore[index]
            if ib is not None:
                texts_b.append(row[ib])
            if ii is not None:
                ids.append(row[ii])
            else:
                ids.append(str(len(ids)))
            if il is not None:
                raw = row[il].strip()
                if info.is_regression:
                    try:
                        labels.append(float(raw))
                    except ValueError:
                        raise ValueError(f"{path}:{line}: label {raw!r} is not a number") from None
                elif raw in label_index:
                    labels.append(label_index[raw])
                else:
                    raise ValueError(
                        f"{path}:{line}: unknown label {raw!r} for GLUE {info.dir_name}; "
                        f"allowed: {list(info.label_names)}"
                    )
    if not texts_a:
        raise ValueError(f"{path}: no examples (empty split) for GLUE {info.dir_name}")
    return GlueSplit(texts_a, texts_b if ib is not None else None,
                     labels if il is not None else None, ids, path, info.name)


def load_glue_split(
    task: str, split: str, data_dir: str | Path | None = None, download: bool = True
) -> GlueSplit:
    """Load ``split`` (``train``/``dev``/``test``; MNLI: ``dev_matched`` ... ) of a GLUE task."""
    info = _glue_info(task)
    names = [f[:-4] for f in glue_split_files(info.name)]
    if split not in names:
        raise ValueError(f"split {split!r} is invalid for GLUE {info.dir_name}: allowed {names}")
    folder = find_glue_task(info.name, data_dir, download=download)
    return read_glue_file(folder / f"{split}.tsv", info.name, labelled=not split.startswith("test"))


_SUBMISSION = {"mnlim": "MNLI-m.tsv", "mnlimatched": "MNLI-m.tsv", "mnlimm": "MNLI-mm.tsv",
               "mnlimismatched": "MNLI-mm.tsv"}


def write_glue_predictions(
    task: str,
    ids: Sequence[int | str] | torch.Tensor,
    preds: Sequence[float] | torch.Tensor,
    path: str | Path,
) -> Path:
    """Write a GLUE submission file (``index<TAB>prediction``, sorted by index).

    ``task`` is a GLUE task, for MNLI ``mnli-m``/``mnli-mm`` (or ``mnli_matched`` ...).
    ``preds`` are class ids, ``(N, C)`` logits (argmax taken), or STS-B scores (clipped to
    0..5). ``path`` is a file, or a folder that gets the official name (``SST-2.tsv`` ...).
    Returns the path written.
    """
    key = task.lower().replace("-", "").replace("_", "")
    if key in _SUBMISSION:
        info, fname = get_task("mnli"), _SUBMISSION[key]
    else:
        info = _glue_info(task)
        if info.name == "mnli":
            raise ValueError("for MNLI name the set: task='mnli-m' or task='mnli-mm'")
        fname = info.submission_files[0]
    p = torch.as_tensor(preds).detach().cpu()
    if info.is_regression:
        p = p.reshape(-1).float().clamp(0.0, 5.0)  # (N, 1) -> (N,)
        values = [f"{v:.3f}" for v in p.tolist()]
    else:
        if p.dim() == 2:
            p = p.argmax(dim=-1)  # (N, C) -> (N,)
        p = p.reshape(-1).long()
        if len(p) and (p.min() < 0 or p.max() >= info.num_labels):
            raise ValueError(f"{task}: class ids must be in [0, {info.num_labels})")
        values = [info.label_names[i] for i in p.tolist()]
    id_list = [int(i) for i in torch.as_tensor(ids).reshape(-1).tolist()] if isinstance(
        ids, torch.Tensor) else [int(i) for i in ids]
    if len(id_list) != len(values):
        raise ValueError(f"{task}: {len(id_list)} ids but {len(values)} predictions")
    if len(set(id_list)) != len(id_list):
        raise ValueError(f"{task}: duplicate ids in the predictions")
    out = Path(path)
    if out.is_dir() or out.suffix == "":
        out = out / fname
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        fh.write("index\tprediction\n")
        for i, v in sorted(zip(id_list, values, strict=True)):
            fh.write(f"{i}\t{v}\n")
    return out
