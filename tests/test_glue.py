"""GLUE readers: the shared copies, the official layouts of MNLI/QQP/QNLI, errors, downloads,
and the submission-file writer."""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from qat.data import download as dl
from qat.data.glue import find_glue_task, load_glue_split, read_glue_file, write_glue_predictions
from qat.data.tasks import GLUE_TASKS, get_task

# rows per split from /work/shared/data/README.md; label counts are the public GLUE figures
# (label ids in the order of TaskInfo.label_names; RTE: entailment, not_entailment)
EXPECTED = {
    "cola": {"train": (8551, [2528, 6023]), "dev": (1043, [322, 721]), "test": (1063, None)},
    "sst2": {"train": (67349, [29780, 37569]), "dev": (872, [428, 444]), "test": (1821, None)},
    "mrpc": {"train": (3668, [1194, 2474]), "dev": (408, [129, 279]), "test": (1725, None)},
    "stsb": {"train": (5749, None), "dev": (1500, None), "test": (1379, None)},
    "rte": {"train": (2490, [1249, 1241]), "dev": (277, [146, 131]), "test": (3000, None)},
    "wnli": {"train": (635, [323, 312]), "dev": (71, [40, 31]), "test": (146, None)},
}


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_shared_copies_counts_and_labels(data_dir: Path, task: str) -> None:
    info = get_task(task)
    for split, (rows, label_counts) in EXPECTED[task].items():
        s = load_glue_split(task, split, data_dir, download=False)
        assert len(s) == rows, (task, split)
        assert all(s.texts_a) or task == "sst2"
        assert (s.texts_b is not None) == info.is_pair
        if split == "test":
            assert s.labels is None
            assert s.ids == [str(i) for i in range(rows)]  # GLUE index == row position
        elif info.is_regression:
            assert all(0.0 <= y <= 5.0 for y in s.labels) and len(set(s.labels)) > 50
        else:
            counts = Counter(s.labels)
            assert [counts[i] for i in range(info.num_labels)] == label_counts, (task, split)


def test_special_formats(data_dir: Path) -> None:
    mrpc = load_glue_split("mrpc", "train", data_dir, download=False)  # BOM before "Quality"
    assert mrpc.texts_a[0].startswith("Amrozi accused his brother")
    assert mrpc.texts_b[0].startswith('Referring to him as only "the witness"')
    cola = load_glue_split("cola", "train", data_dir, download=False)  # no header
    assert cola.texts_a[0] == (
        "Our friends won't buy this analysis, let alone the next one we propose.")
    stsb = load_glue_split("stsb", "dev", data_dir, download=False)
    assert (stsb.texts_a[0], stsb.texts_b[0], stsb.labels[0]) == (
        "A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)
    stsb_test = load_glue_split("stsb", "test", data_dir, download=False)
    assert stsb_test.texts_b[0] == "A girl is brushing her hair."
    sst = load_glue_split("sst2", "dev", data_dir, download=False)
    assert sst.texts_a[0].startswith("it 's a charming") and sst.labels[0] == 1


def test_mnli_official_layout(tmp_path: Path, glue_layout) -> None:
    glue_layout(tmp_path, "MNLI", n=9)
    tr = load_glue_split("mnli", "train", tmp_path, download=False)
    assert len(tr) == 9 and tr.labels == [0, 1, 2] * 3
    assert tr.texts_a[0] == 'The "tr" cat 0 sat .' and tr.texts_b[0] == "A tr mat 0 ' s"
    assert tr.ids[:2] == ["0", "1"]
    dm = load_glue_split("mnli", "dev_matched", tmp_path, download=False)
    dmm = load_glue_split("mnli", "dev_mismatched", tmp_path, download=False)
    assert (len(dm), len(dmm)) == (9, 12)
    assert dm.labels == [0, 1, 2] * 3  # gold_label (last column), not label1..label5
    tm = load_glue_split("mnli", "test_mismatched", tmp_path, download=False)
    assert len(tm) == 7 and tm.labels is None and tm.texts_a[0] == 'The "tmm" cat 0 sat .'
    with pytest.raises(ValueError, match="allowed"):
        load_glue_split("mnli", "dev", tmp_path, download=False)


def test_qqp_official_layout(tmp_path: Path, glue_layout) -> None:
    glue_layout(tmp_path, "QQP", n=6)
    tr = load_glue_split("qqp", "train", tmp_path, download=False)
    assert tr.texts_a[1] == 'How do I "learn" 1?' and tr.texts_b[1] == "What's the way to learn 1?"
    assert tr.labels == [0, 1, 0, 1, 0, 1] and tr.ids[0] == "500"
    te = load_glue_split("qqp", "test", tmp_path, download=False)
    assert len(te) == 4 and te.labels is None and te.ids == ["0", "1", "2", "3"]


def test_qnli_official_layout(tmp_path: Path, glue_layout) -> None:
    glue_layout(tmp_path, "QNLI", n=6)
    dev = load_glue_split("qnli", "dev", tmp_path, download=False)
    assert len(dev) == 5 and dev.labels == [0, 1, 0, 1, 0]
    assert dev.texts_a[2] == "What is 2?" and dev.texts_b[2] == 'It is "2".'
    assert load_glue_split("qnli", "test", tmp_path, download=False).texts_b is not None


def test_malformed_row_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "train.tsv"
    p.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly two\n")
    with pytest.raises(ValueError, match=r"train\.tsv:3: malformed row with 2 fields"):
        read_glue_file(p, "rte", labelled=True)


def test_missing_column_unknown_label_empty_split(tmp_path: Path) -> None:
    p = tmp_path / "dev.tsv"
    p.write_text("index\tsentence1\tlabel\n0\ta\tentailment\n")
    with pytest.raises(ValueError, match=r"dev\.tsv:1: missing column 'sentence2'"):
        read_glue_file(p, "rte", labelled=True)
    p.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"dev\.tsv:2: unknown label 'maybe'.*not_entailment"):
        read_glue_file(p, "rte", labelled=True)
    p.write_text("index\tsentence1\tsentence2\tlabel\n")
    with pytest.raises(ValueError, match=r"dev\.tsv: no examples \(empty split\)"):
        read_glue_file(p, "rte", labelled=True)
    p.write_text("")
    with pytest.raises(ValueError, match="empty file"):
        read_glue_file(p, "sst2", labelled=True)
    p.write_text("src\t1\t\tok\nsrc\tx\t\tbad\n")
    with pytest.raises(ValueError, match=r"dev\.tsv:2: unknown label 'x'"):
        read_glue_file(p, "cola", labelled=True)
    p.write_text("src\t1\tok\n")
    with pytest.raises(ValueError, match=r"dev\.tsv:1: malformed row with 3 fields, expected 4"):
        read_glue_file(p, "cola", labelled=True)
    p.write_text("index\tb\tc\td\te\tf\tg\ts1\ts2\tscore\n0\tg\tf\ty\to\t1\t2\tx\ty\tfive\n")
    with pytest.raises(ValueError, match=r"dev\.tsv:2: label 'five' is not a number"):
        read_glue_file(p, "stsb", labelled=True)


def test_unknown_task_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="valid tasks") as exc:
        get_task("squad")
    assert "mnli" in str(exc.value) and "sst2" in str(exc.value)
    with pytest.raises(ValueError, match="not a GLUE task"):
        load_glue_split("20newsgroups", "train")
    assert {get_task(n).name for n in ("SST-2", "sst_2", "STS-B", "CoLA", "MNLI")} == {
        "sst2", "stsb", "cola", "mnli"}


def test_missing_task_error_names_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dev_matched\.tsv") as exc:
        find_glue_task("mnli", tmp_path, download=False)
    assert "MNLI.zip" in str(exc.value) and "glue/MNLI" in str(exc.value)


def test_download_with_fake_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QAT_CACHE_DIR", str(tmp_path / "cache"))
    fetched = []

    def fake_fetch(url: str, dest: Path, timeout: float = 10.0) -> Path:
        fetched.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest, "w") as zf:
            for split, rows in (("train", 3), ("dev", 2)):
                body = "".join(f"{i}\ts{i}\tt{i}\tentailment\n" for i in range(rows))
                zf.writestr(f"RTE/{split}.tsv", "index\tsentence1\tsentence2\tlabel\n" + body)
            zf.writestr("RTE/test.tsv", "index\tsentence1\tsentence2\n0\ta\tb\n")
            zf.writestr("RTE/original/ignored.tsv", "x")
        return dest

    monkeypatch.setattr(dl, "fetch_url", fake_fetch)
    s = load_glue_split("rte", "train", tmp_path / "nothing")
    assert fetched == [dl.GLUE_URLS["RTE"]] and len(s) == 3
    assert (tmp_path / "cache" / "data" / "glue" / "RTE" / "dev.tsv").is_file()


def test_mrpc_download_formatting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QAT_CACHE_DIR", str(tmp_path / "cache"))
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    sources = {
        "msr_paraphrase_train.txt": header
        + "1\t1\t2\tA \"q\".\tB.\n0\t3\t4\tC.\tD.\n1\t5\t6\tE.\tF.\n",
        "msr_paraphrase_test.txt": header + "1\t7\t8\tG.\tH.\n",
        "dev_ids.tsv": "3\t4\n",
    }

    def fake_fetch(url: str, dest: Path, timeout: float = 10.0) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(sources[dest.name], encoding="utf-8")
        return dest

    monkeypatch.setattr(dl, "fetch_url", fake_fetch)
    tr = load_glue_split("mrpc", "train", tmp_path)
    dev = load_glue_split("mrpc", "dev", tmp_path)
    te = load_glue_split("mrpc", "test", tmp_path)
    assert tr.texts_a == ['A "q".', "E."] and tr.labels == [1, 1]
    assert dev.texts_b == ["D."] and dev.labels == [0]
    assert te.texts_a == ["G."] and te.ids == ["0"]


def test_write_predictions(tmp_path: Path) -> None:
    out = write_glue_predictions("mnli-mm", [2, 0, 1], torch.tensor([[0.1, 2.0, 0.0],
                                                                      [3.0, 0.0, 0.0],
                                                                      [0.0, 0.0, 1.0]]), tmp_path)
    assert out.name == "MNLI-mm.tsv"
    assert out.read_text().splitlines() == ["index\tprediction", "0\tcontradiction",
                                            "1\tneutral", "2\tentailment"]
    out = write_glue_predictions("SST-2", torch.tensor([1, 0]), [0, 1], tmp_path / "sub")
    assert out == tmp_path / "sub" / "SST-2.tsv"
    assert out.read_text().splitlines()[1:] == ["0\t1", "1\t0"]  # sorted by index
    out = write_glue_predictions("stsb", [0, 1], torch.tensor([[5.7], [1.23456]]),
                                 tmp_path / "x.tsv")
    assert out.read_text().splitlines()[1:] == ["0\t5.000", "1\t1.235"]
    out = write_glue_predictions("rte", [0], [1], tmp_path)
    assert out.read_text().splitlines()[1] == "0\tnot_entailment"
    with pytest.raises(ValueError, match="mnli-m"):
        write_glue_predictions("mnli", [0], [0], tmp_path)
    with pytest.raises(ValueError, match="2 ids but 1"):
        write_glue_predictions("cola", [0, 1], [0], tmp_path)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        write_glue_predictions("cola", [0], [5], tmp_path)


def test_every_glue_task_has_a_submission_name() -> None:
    assert len(GLUE_TASKS) == 9
    names = [f for t in GLUE_TASKS for f in get_task(t).submission_files]
    assert names == ["CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "MNLI-m.tsv",
                     "MNLI-mm.tsv", "QNLI.tsv", "RTE.tsv", "WNLI.tsv"]
