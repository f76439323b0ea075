"""Downloads of the public corpora into the cache (short timeout; never used in tests).

Every network access goes through :func:`fetch_url`, so tests replace that one function.
Setting ``QAT_OFFLINE=1`` makes :func:`fetch_url` fail at once without touching the network.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import urllib.request
import zipfile
import zlib
from pathlib import Path

__all__ = [
    "NEWSGROUPS_URL",
    "GLUE_URLS",
    "MRPC_URLS",
    "fetch_url",
    "check_tar_archive",
    "download_20newsgroups",
    "download_glue_task",
]

NEWSGROUPS_URL = "https://ndownloader.figshare.com/files/5975967"  # scikit-learn's source
_GLUE = "https://dl.fbaipublicfiles.com/glue/data/"
GLUE_URLS = {
    "CoLA": _GLUE + "CoLA.zip",
    "SST-2": _GLUE + "SST-2.zip",
    "QQP": _GLUE + "QQP-clean.zip",
    "STS-B": _GLUE + "STS-B.zip",
    "MNLI": _GLUE + "MNLI.zip",
    "QNLI": _GLUE + "QNLIv2.zip",
    "RTE": _GLUE + "RTE.zip",
    "WNLI": _GLUE + "WNLI.zip",
}
MRPC_URLS = {  # as in the original download_glue_data.py
    "train": "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt",
    "test": "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_test.txt",
    "dev_ids": _GLUE + "mrpc_dev_ids.tsv",
}


def fetch_url(url: str, dest: Path, timeout: float = 10.0) -> Path:
    """Download ``url`` to ``dest`` (atomically, via a ``.part`` file that is removed on any
    failure); a response shorter than its Content-Length raises ``OSError`` like any network
    error, so a partial download never lands at ``dest``."""
    if os.environ.get("QAT_OFFLINE", "").strip().lower() in ("1", "true", "yes"):
        raise ConnectionError(f"QAT_OFFLINE is set: not downloading {url}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    req = urllib.request.Request(url, headers={"User-Agent": "qat"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp, open(part, "wb") as fh:
            shutil.copyfileobj(resp, fh)
            expected = resp.headers.get("Content-Length") if resp.headers else None
        got = part.stat().st_size
        if expected is not None and expected.isdigit() and got != int(expected):
            raise OSError(f"incomplete download of {url}: {got} of {expected} bytes")
        part.replace(dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def check_tar_archive(path: Path) -> None:
    """Read a (compressed) tar archive to its end; raises ``ValueError`` naming ``path`` when it
    is truncated or corrupt (the compressed stream's length and checksum are checked too)."""
    try:
        with tarfile.open(path, "r:*") as tar:
            for _ in tar:
                pass
            while tar.fileobj.read(1 << 20):  # past the tar end marker, to the stream's end
                pass
    except (EOFError, tarfile.TarError, zlib.error, gzip.BadGzipFile) as exc:
        raise corrupt_archive(path, exc) from None


def corrupt_archive(path: Path, exc: BaseException) -> ValueError:
    """The one-line error for a truncated or corrupt archive at ``path``."""
    reason = str(exc) or type(exc).__name__
    return ValueError(f"{path} is truncated or corrupt ({reason}): a partial download? Delete "
                      f"it and download it again from {NEWSGROUPS_URL}")


def download_20newsgroups(dest_dir: Path, timeout: float = 10.0) -> Path:
    """Fetch ``20news-bydate.tar.gz`` into ``dest_dir/20newsgroups/``; returns the archive path.

    The archive is read to its end before it takes its place, so a partial download is never
    kept (``OSError`` instead)."""
    dest = Path(dest_dir) / "20newsgroups" / "20news-bydate.tar.gz"
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.download")
    try:
        fetch_url(NEWSGROUPS_URL, tmp, timeout=timeout)
        try:
            check_tar_archive(tmp)
        except ValueError as exc:
            raise OSError(f"the download of {NEWSGROUPS_URL} is incomplete or corrupt: "
                          f"{exc}") from None
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _extract_task_files(zip_path: Path, task: str, names: tuple[str, ...], out: Path) -> None:
    """Copy the top-level ``<dir>/<name>`` members of a GLUE zip into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path) as zf:
        found = set()
        for info in zf.infolist():
            parts = Path(info.filename).parts
            if len(parts) == 2 and parts[1] in names and not info.is_dir():
                with zf.open(info) as src, open(out / parts[1], "wb") as dst:
                    shutil.copyfileobj(src, dst)
                found.add(parts[1])
    missing = sorted(set(names) - found)
    if missing:
        raise FileNotFoundError(f"{zip_path} (GLUE {task}) lacks the members {missing}")


def _format_mrpc(raw: Path, out: Path) -> None:
    """Build MRPC train/dev/test.tsv from the MSR files exactly as download_glue_data.py did."""
    with open(raw / "dev_ids.tsv", encoding="utf-8") as fh:
        dev_ids = {tuple(row.strip().split("\t")) for row in fh if row.strip()}
    out.mkdir(parents=True, exist_ok=True)
    with (
        open(raw / "msr_paraphrase_train.txt", encoding="utf-8") as data,
        open(out / "train.tsv", "w", encoding="utf-8") as train,
        open(out / "dev.tsv", "w", encoding="utf-8") as dev,
    ):
        header = data.readline()
        train.write(header)
        dev.write(header)
        for row in data:
            label, id1, id2, s1, s2 = row.strip().split("\t")
            fh = dev if (id1, id2) in dev_ids else train
            fh.write(f"{label}\t{id1}\t{id2}\t{s1}\t{s2}\n")
    with (
        open(raw / "msr_paraphrase_test.txt", encoding="utf-8") as data,
        open(out / "test.tsv", "w", encoding="utf-8") as test,
    ):
        data.readline()
        test.write("index\t#1 ID\t#2 ID\t#1 String\t#2 String\n")
        for i, row in enumerate(data):
            _label, id1, id2, s1, s2 = row.strip().split("\t")
            test.write(f"{i}\t{id1}\t{id2}\t{s1}\t{s2}\n")


def download_glue_task(
    task: str, files: tuple[str, ...], dest_dir: Path, timeout: float = 10.0
) -> Path:
    """Fetch one GLUE task (official directory name) into ``dest_dir/glue/<task>/``."""
    out = Path(dest_dir) / "glue" / task
    raw = Path(dest_dir) / "glue" / "_downloads"
    if task == "MRPC":
        fetch_url(MRPC_URLS["train"], raw / "MRPC" / "msr_paraphrase_train.txt", timeout)
        fetch_url(MRPC_URLS["test"], raw / "MRPC" / "msr_paraphrase_test.txt", timeout)
        fetch_url(MRPC_URLS["dev_ids"], raw / "MRPC" / "dev_ids.tsv", timeout)
        _format_mrpc(raw / "MRPC", out)
        return out
    if task not in GLUE_URLS:
        raise ValueError(f"no download source for GLUE task {task!r}; known: {sorted(GLUE_URLS)}")
    zip_path = fetch_url(GLUE_URLS[task], raw / f"{task}.zip", timeout)
    _extract_task_files(zip_path, task, files, out)
    return out
