"""scripts/report.py on a fake outputs tree: table, CSV, plots and the README section."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("qat_report", ROOT / "scripts" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["qat_report"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("qat_report", None)


def _run(root: Path, name: str, run_id: str, quant: dict, stages: dict, model: str = "textcnn",
         task: str = "20newsgroups", prune: float | None = None, size=(1000, 260)) -> Path:
    d = root / name / run_id
    (d / ".hydra").mkdir(parents=True)
    cfg = {"name": "${hydra:runtime.choices.recipe}", "quant": quant,
           "model": {"_target_": f"qat.models.{model}"}, "data": {"task": task},
           "distill": {}, "prune": {}}
    if prune is not None:
        cfg["prune"] = {"_target_": "qat.prune.PruningCallback",
                        "schedule": {"kind": "cubic", "final_sparsity": prune}}
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"runtime": {"choices": {"recipe": name, "model": model}}}}))
    results = {"name": name, "data": {"task": task}, "stages": stages,
               "size": {"fp32_bytes": size[0], "quantized_bytes": size[1]},
               "monitor": "val/accuracy"}
    (d / "results.json").write_text(json.dumps(results))
    return d


W8 = {"mode": "qat", "weight": {"bits": 8}, "activation": {"bits": 8}}
W4 = {"mode": "qat", "weight": {"bits": 4}, "activation": {"bits": 8}}
PTQ8 = {"mode": "ptq", "weight": {"bits": 8}, "activation": {"bits": 8}}
TERN = {"mode": "qat", "weight": {"bits": 2, "mode": "ternary"}, "activation": {"bits": 8}}


def _tree(root: Path) -> None:
    acc = lambda v: {"test/loss": 1.0, "test/accuracy": v}  # noqa: E731
    _run(root, "20ng_textcnn_fp32", "a", {"mode": "fp32"}, {"fp32": acc(0.80)}, size=(1000, 1000))
    _run(root, "20ng_textcnn_w8a8", "old", W8, {"qat": acc(0.10)})  # superseded by "new"
    _run(root, "20ng_textcnn_w8a8", "new", W8, {"fp32": acc(0.81), "qat": acc(0.805)})
    _run(root, "20ng_textcnn_w4a8", "a", W4, {"qat": acc(0.79)}, size=(1000, 140))
    _run(root, "20ng_textcnn_ptq-w8a8", "a", PTQ8, {"ptq": acc(0.78)})
    _run(root, "20ng_textcnn_w2", "a", TERN, {"qat": acc(0.70)}, size=(1000, 70))
    _run(root, "20ng_textcnn_w8a8_prune", "a", W8, {"qat": acc(0.77)}, prune=0.5)
    _run(root, "sst2_minilm_w8a8", "a", W8, {"qat": {"test/accuracy": 0.9}}, model="minilm",
         task="sst2")
    _run(root, "rte_minilm_w8a8", "a", W8, {"fp32": acc(0.60), "qat": acc(0.65)}, model="minilm",
         task="rte")
    broken = root / "broken" / "x"
    broken.mkdir(parents=True)
    (broken / "results.json").write_text("{not json")


def test_report_table_csv_plots_readme(report, tmp_path: Path) -> None:
    root, out = tmp_path / "outputs", tmp_path / "results"
    _tree(root)
    (root / "20ng_textcnn_w8a8" / "new" / "results.json").touch()  # newest
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nintro\n\n<!-- results:start -->\nold table\n"
                      "<!-- results:end -->\n\nfooter\n")
    rows = report.main(["--root", str(root), "--out", str(out), "--readme", str(readme)])
    by = {r.scheme: r for r in rows if r.model == "textcnn"}
    assert set(by) == {"fp32", "w8a8", "w4a8", "ptq-w8a8", "w2a8-ternary", "w8a8+prune0.5"}
    assert by["w8a8"].value == 0.805 and by["w8a8"].baseline == 0.80  # the float recipe's run
    assert by["w8a8"].delta == pytest.approx(0.005)
    assert by["w4a8"].baseline == 0.80 and by["w4a8"].size_ratio == pytest.approx(0.14)
    assert by["ptq-w8a8"].method == "ptq" and by["w2a8-ternary"].weight_bits == 2
    assert by["w8a8+prune0.5"].sparsity == 0.5 and by["fp32"].size_ratio is None
    sst = next(r for r in rows if r.task == "sst2")
    assert sst.baseline is None and sst.delta is None  # no float run of that task
    rte = next(r for r in rows if r.task == "rte")
    assert rte.baseline == 0.6 and rte.delta == pytest.approx(0.05)  # its own float stage
    with open(out / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows) == 8 and "size_ratio" in table[0]
    md = (out / "results.md").read_text()
    assert "| 20newsgroups | textcnn | w4a8 | accuracy | 0.7900 | 0.8000 | -1.00 | 0.140x |" in md
    assert "| `qat-train recipe=20ng_textcnn_w4a8` |" in md  # every row names its command
    overrides = root / "20ng_textcnn_w8a8" / "new" / ".hydra" / "overrides.yaml"
    overrides.write_text(yaml.safe_dump(["recipe=20ng_textcnn_w8a8", "seed=3"]))
    w8 = next(r for r in report.collect(root) if r.scheme == "w8a8")
    assert w8.command == "qat-train recipe=20ng_textcnn_w8a8 seed=3"
    for png in ("accuracy_vs_bits.png", "accuracy_vs_sparsity.png", "qat_vs_ptq.png"):
        assert (out / png).stat().st_size > 1000
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n\n<!-- results:start -->\n| task |")
    assert text.endswith("<!-- results:end -->\n\nfooter\n") and "old table" not in text
    assert "![qat_vs_ptq](results/qat_vs_ptq.png)" in text


def test_report_leaves_readme_without_markers(report, tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    _tree(root)
    readme = tmp_path / "README.md"
    readme.write_text("# Title\nno markers here\n")
    report.main(["--root", str(root), "--out", str(tmp_path / "r"), "--readme", str(readme)])
    assert readme.read_text() == "# Title\nno markers here\n"
    with pytest.raises(SystemExit, match="no such folder"):
        report.main(["--root", str(tmp_path / "missing")])
