"""Shared pytest fixtures: the read-only corpora folder, and a network-free, private cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def _data_dir() -> Path:
    env = os.environ.get("QAT_DATA_DIR")
    return Path(env).expanduser().resolve() if env else SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _offline_private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test touches the network (QAT_OFFLINE=1); caches go to a session temp dir unless
    QAT_CACHE_DIR is set."""
    mp = pytest.MonkeyPatch()
    mp.setenv("QAT_OFFLINE", "1")
    if not os.environ.get("QAT_CACHE_DIR"):
        mp.setenv("QAT_CACHE_DIR", str(tmp_path_factory.mktemp("qat_cache")))
    yield
    mp.undo()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test (small models on a shared CPU: faster and steadier)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def train_env(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For tests that train through qat.train: the corpora folder, W&B off, and Hydra's global
    state cleared afterwards."""
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.setenv("QAT_DATA_DIR", str(data_dir))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    yield
    GlobalHydra.instance().clear()


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For tests of the commands: runs under tmp_path, W&B off, one-line errors, and Hydra's
    global state cleared afterwards."""
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.setenv("QAT_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setenv("QAT_FULL_ERROR", "0")
    yield
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The corpora folder ($QAT_DATA_DIR or <repo>/../shared/data); skips when absent."""
    path = _data_dir()
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set QAT_DATA_DIR)")
    return path


MNLI_TRAIN_HEADER = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse "
                     "sentence1_parse sentence2_parse sentence1 sentence2 label1 gold_label")
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER.replace("label1", "label1 label2 label3 label4 label5")
MNLI_TEST_HEADER = MNLI_TRAIN_HEADER.replace(" label1 gold_label", "")
_GOLD = ("contradiction", "entailment", "neutral")


def _mnli_rows(n: int, kind: str, tag: str) -> list[str]:
    rows = []
    for i in range(n):
        s1, s2 = f'The "{tag}" cat {i} sat .', f"A {tag} mat {i} ' s"
        parses = [f"( {s1} )", f"( {s2} )", f"(ROOT {s1})", f"(ROOT {s2})"]
        head = [str(i), str(1000 + i), f"{1000 + i}e", "fiction", *parses, s1, s2]
        gold = _GOLD[i % 3]
        if kind == "train":
            head += [gold, gold]
        elif kind == "dev":
            head += [gold, gold, _GOLD[(i + 1) % 3], gold, gold, gold]
        rows.append("\t".join(head))
    return rows


def write_glue_layout(root: Path, task: str, n: int = 9) -> Path:
    """Write a tiny copy of GLUE ``task`` (MNLI, QQP or QNLI) in its official layout under
    ``root/glue/<TASK>/``; returns the task folder. Labels cycle through the label set."""
    if task == "MNLI":
        files = {
            "train.tsv": [MNLI_TRAIN_HEADER.replace(" ", "\t"), *_mnli_rows(n, "train", "tr")],
            "dev_matched.tsv": [MNLI_DEV_HEADER.replace(" ", "\t"), *_mnli_rows(n, "dev", "m")],
            "dev_mismatched.tsv": [MNLI_DEV_HEADER.replace(" ", "\t"),
                                   *_mnli_rows(n + 3, "dev", "mm")],
            "test_matched.tsv": [MNLI_TEST_HEADER.replace(" ", "\t"),
                                 *_mnli_rows(n - 1, "test", "tm")],
            "test_mismatched.tsv": [MNLI_TEST_HEADER.replace(" ", "\t"),
                                    *_mnli_rows(n - 2, "test", "tmm")],
        }
    elif task == "QQP":
        def qqp(k: int, labelled: bool) -> list[str]:
            head = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate" if labelled else \
                "id\tquestion1\tquestion2"
            rows = [head]
            for i in range(k):
                q1, q2 = f'How do I "learn" {i}?', f"What's the way to learn {i}?"
                rows.append(f"{500 + i}\t{2 * i}\t{2 * i + 1}\t{q1}\t{q2}\t{i % 2}" if labelled
                            else f"{i}\t{q1}\t{q2}")
            return rows
        files = {"train.tsv": qqp(n, True), "dev.tsv": qqp(n - 1, True), "test.tsv": qqp(4, False)}
    elif task == "QNLI":
        def qnli(k: int, labelled: bool) -> list[str]:
            lab = ("entailment", "not_entailment")
            rows = ["index\tquestion\tsentence" + ("\tlabel" if labelled else "")]
            for i in range(k):
                r = f"{i}\tWhat is {i}?\tIt is \"{i}\"."
                rows.append(r + (f"\t{lab[i % 2]}" if labelled else ""))
            return rows
        files = {"train.tsv": qnli(n, True), "dev.tsv": qnli(n - 1, True),
                 "test.tsv": qnli(5, False)}
    else:
        raise ValueError(task)
    folder = root / "glue" / task
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        (folder / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def glue_layout() -> object:
    """The :func:`write_glue_layout` function."""
    return write_glue_layout
