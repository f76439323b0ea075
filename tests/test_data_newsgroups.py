"""20 Newsgroups: counts against scikit-learn, strip functions, layouts, cache, download."""

from __future__ import annotations

import io
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from qat.data import download as dl
from qat.data.newsgroups import (
    find_20newsgroups,
    load_20newsgroups,
    normalize_remove,
    strip_newsgroup_footer,
    strip_newsgroup_header,
    strip_newsgroup_quoting,
)
from qat.data.tasks import NEWSGROUPS_LABELS

# per-class counts of scikit-learn's fetch_20newsgroups (bydate), label order = sorted names
TRAIN_COUNTS = [480, 584, 591, 590, 578, 593, 585, 594, 598, 597, 600, 595, 591, 594, 593,
                599, 546, 564, 465, 377]
TEST_COUNTS = [319, 389, 394, 392, 385, 395, 390, 396, 398, 397, 399, 396, 393, 396, 394, 398,
               364, 376, 310, 251]


@pytest.fixture(scope="session")
def ng_train(data_dir: Path):
    return load_20newsgroups(data_dir, "train", download=False)


@pytest.fixture(scope="session")
def ng_test(data_dir: Path):
    return load_20newsgroups(data_dir, "test", download=False)


def test_train_counts(ng_train) -> None:
    assert len(ng_train.texts) == len(ng_train.labels) == 11314
    counts = Counter(ng_train.labels)
    assert [counts[i] for i in range(20)] == TRAIN_COUNTS
    assert ng_train.label_names == NEWSGROUPS_LABELS
    assert list(NEWSGROUPS_LABELS) == sorted(NEWSGROUPS_LABELS)


def test_test_counts(ng_test) -> None:
    assert len(ng_test.texts) == 7532
    counts = Counter(ng_test.labels)
    assert [counts[i] for i in range(20)] == TEST_COUNTS


def test_order_reproduces_sklearn_documented_example(ng_train) -> None:
    # fetch_20newsgroups: load_files shuffles with RandomState(0), then RandomState(42);
    # its documentation shows target[:10] == [7, 4, 4, 1, 14, 16, 13, 3, 2, 4].
    y = np.array(ng_train.labels)
    first = np.arange(len(y))
    np.random.RandomState(0).shuffle(first)
    second = np.arange(len(y))
    np.random.RandomState(42).shuffle(second)
    assert y[first][second][:10].tolist() == [7, 4, 4, 1, 14, 16, 13, 3, 2, 4]


def test_texts_are_latin1_raw_messages(ng_train) -> None:
    assert all(isinstance(t, str) for t in ng_train.texts[:50])
    assert ng_train.texts[0].startswith("From:")
    assert ng_train.filenames[0].startswith("alt.atheism/")


def test_strip_header() -> None:
    text = "From: a@b\nSubject: hi\n\nBody line\n\nSecond paragraph"
    assert strip_newsgroup_header(text) == "Body line\n\nSecond paragraph"
    assert strip_newsgroup_header("no blank line") == ""


def test_strip_footer() -> None:
    assert strip_newsgroup_footer("Body\nmore\n--\nJohn\njohn@x.org") == "Body\nmore"
    assert strip_newsgroup_footer("Body\n\nsig") == "Body"
    assert strip_newsgroup_footer("single line") == "single line"


def test_strip_quoting() -> None:
    text = "In article <1@x> bob writes:\n> quoted\n| piped\nmine\nalice wrote: x\nkept"
    assert strip_newsgroup_quoting(text) == "mine\nkept"


def test_quoting_matches_sklearn_regex(ng_test) -> None:
    # scikit-learn's pattern, applied line by line
    quote_re = re.compile(r"(writes in|writes:|wrote:|says:|said:|^In article|^Quoted from|^\||^>)")
    for text in ng_test.texts[::8]:
        expect = "\n".join(line for line in text.split("\n") if not quote_re.search(line))
        assert strip_newsgroup_quoting(text) == expect


def test_remove_applies_and_is_validated(data_dir: Path, ng_test) -> None:
    stripped = load_20newsgroups(data_dir, "test", remove=("headers", "footers", "quotes"),
                                 download=False)
    assert stripped.labels == ng_test.labels
    assert not stripped.texts[0].startswith("From:")
    assert sum(map(len, stripped.texts)) < 0.8 * sum(map(len, ng_test.texts))
    assert normalize_remove("quotes,headers") == ("headers", "quotes")
    with pytest.raises(ValueError, match="signatures"):
        normalize_remove(["signatures"])


def _write_tiny_archive(path: Path, per_class: int = 1) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for g in NEWSGROUPS_LABELS:
                for i in range(per_class):
                    data = f"From: x\nSubject: {g}\n\ncaf\xe9 {split} {i}\n".encode("latin-1")
                    info = tarfile.TarInfo(f"20news-bydate-{split}/{g}/{100 + i}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_extracted_folders_layout(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for g in NEWSGROUPS_LABELS:
            d = tmp_path / f"20news-bydate-{split}" / g
            d.mkdir(parents=True)
            (d / "5").write_bytes(b"From: x\n\nhello \xe9")
    assert find_20newsgroups(tmp_path, download=False) == tmp_path
    s = load_20newsgroups(tmp_path, "test", download=False)
    assert s.labels == list(range(20)) and s.texts[0].endswith("hello \xe9")


def test_missing_data_error_names_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="20news-bydate.tar.gz") as exc:
        load_20newsgroups(tmp_path / "nowhere", "train", download=False)
    assert "figshare" in str(exc.value)


def test_offline_download_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Download failed"):
        load_20newsgroups(tmp_path, "train", download=True)  # QAT_OFFLINE=1 in tests


def test_download_path_with_fake_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QAT_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_fetch(url: str, dest: Path, timeout: float = 10.0) -> Path:
        calls.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        _write_tiny_archive(dest, per_class=2)
        return dest

    monkeypatch.setattr(dl, "fetch_url", fake_fetch)
    s = load_20newsgroups(tmp_path / "empty", "train")
    assert calls == [dl.NEWSGROUPS_URL]
    assert len(s.texts) == 40 and Counter(s.labels) == {i: 2 for i in range(20)}
    assert (tmp_path / "cache" / "data" / "20newsgroups" / "20news-bydate.tar.gz").is_file()
    load_20newsgroups(tmp_path / "empty", "test")  # found in the cache now: no new fetch
    assert len(calls) == 1


def test_wrong_label_folders_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "20news-bydate.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            info = tarfile.TarInfo(f"20news-bydate-{split}/only.group/1")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="only.group"):
        load_20newsgroups(tmp_path, "train", download=False)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_archive_is_one_line_naming_the_file(data_dir: Path, tmp_path: Path,
                                                       keep: float) -> None:
    """Bug: a partial download ended in a 68-line EOFError traceback naming no file."""
    from qat.data.newsgroups import _cache_file

    full = (data_dir / "20newsgroups" / "20news-bydate.tar.gz").read_bytes()
    archive = tmp_path / "20newsgroups" / "20news-bydate.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(full[: int(len(full) * keep)])  # 0.999: only the stream's tail is lost
    for _ in range(2):  # the failure is not cached either
        with pytest.raises(ValueError) as exc:
            load_20newsgroups(tmp_path, "train", download=False)
        msg = str(exc.value)
        assert "\n" not in msg and str(archive) in msg and "truncated or corrupt" in msg
        assert "download it again" in msg and dl.NEWSGROUPS_URL in msg
        assert exc.value.__cause__ is None and exc.value.__suppress_context__
    assert not _cache_file(archive).exists()


class _Response(io.BytesIO):
    def __init__(self, data: bytes, length: int) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(length)}


def test_partial_download_is_never_kept(data_dir: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    full = (data_dir / "20newsgroups" / "20news-bydate.tar.gz").read_bytes()
    cut = full[: len(full) // 3]
    monkeypatch.delenv("QAT_OFFLINE", raising=False)
    served = {"length": len(full)}  # the server announced the whole file, then hung up
    monkeypatch.setattr(dl.urllib.request, "urlopen",
                        lambda req, timeout: _Response(cut, served["length"]))
    with pytest.raises(OSError, match=r"incomplete download .* of 14496967 bytes"):
        dl.download_20newsgroups(tmp_path)
    assert not any((tmp_path / "20newsgroups").iterdir())  # no archive, no .part left
    served["length"] = len(cut)  # a server that sends a truncated file "successfully"
    with pytest.raises(OSError, match="incomplete or corrupt"):
        dl.download_20newsgroups(tmp_path)
    assert not any((tmp_path / "20newsgroups").iterdir())
