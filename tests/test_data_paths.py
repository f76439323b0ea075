"""Data and cache directory resolution; the offline switch of the fetcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from qat.data.download import fetch_url
from qat.data.paths import cache_dir, download_dir, resolve_data_dir


def test_resolve_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QAT_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("QAT_CACHE_DIR", str(tmp_path / "cache"))
    assert resolve_data_dir(str(tmp_path / "arg")) == (tmp_path / "arg").resolve()
    assert resolve_data_dir(None) == (tmp_path / "env").resolve()
    monkeypatch.delenv("QAT_DATA_DIR")
    assert resolve_data_dir() == (tmp_path / "cache" / "data").resolve()
    assert cache_dir() == tmp_path / "cache" and download_dir() == tmp_path / "cache" / "data"
    monkeypatch.delenv("QAT_CACHE_DIR")
    assert cache_dir() == Path("~/.cache/qat").expanduser()
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir("rel") == tmp_path.resolve() / "rel"


def test_fetch_refuses_when_offline(tmp_path: Path) -> None:
    with pytest.raises(ConnectionError, match="QAT_OFFLINE"):  # set by conftest for all tests
        fetch_url("https://example.invalid/file", tmp_path / "f")
    assert not (tmp_path / "f").exists()
