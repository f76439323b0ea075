"""scripts/pareto.py (via scripts/report.py) on synthetic results.json files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import load_script
from test_export_report import TERN, W4, W8, _run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scripts():
    report = load_script("qat_report", "report.py")
    pareto = load_script("qat_pareto", "pareto.py")
    yield report, pareto
    for name in ("qat_report", "qat_pareto"):
        sys.modules.pop(name, None)


def _auto(budget: float) -> dict:
    return {"_target_": "qat.auto.AutoQuantCallback", "mode": "qat", "budget": budget,
            "budget_kind": "size", "weight": {"bits": 8}, "activation": {"bits": 8}}


def _tree(root: Path) -> None:
    acc = lambda v: {"test/loss": 1.0, "test/accuracy": v}  # noqa: E731
    _run(root, "20ng_textcnn_fp32", "a", {"mode": "fp32"}, {"fp32": acc(0.74)},
         size=(1000, 1000))
    _run(root, "20ng_textcnn_w8a8", "a", W8, {"qat": acc(0.733)}, size=(1000, 260))
    _run(root, "20ng_textcnn_w4a8", "a", W4, {"qat": acc(0.736)}, size=(1000, 135))
    _run(root, "20ng_textcnn_w2a8-kd", "a", TERN, {"qat": acc(0.699)}, size=(1000, 72))
    _run(root, "20ng_textcnn_w8a8-prune80", "a", W8, {"qat": acc(0.715)}, prune=0.8,
         size=(1000, 150))
    for run_id, budget, value, size in (("b10", 0.10, 0.731, 99), ("b135", 0.135, 0.745, 134),
                                        ("b05", 0.05, 0.70, 50)):
        _run(root, "20ng_textcnn_auto", run_id, _auto(budget), {"qat": acc(value)},
             size=(1000, size))
    bands = {**_auto(0.05), "embedding_bands": {"module": "embedding", "bounds": [10000, 25000]}}
    _run(root, "20ng_textcnn_auto-bands", "a", bands, {"qat": acc(0.737)}, size=(1000, 45))
    _run(root, "sst2_minilm_w8a8", "a", W8, {"qat": acc(0.9)}, model="minilm", task="sst2")


def test_pareto_front() -> None:
    pareto = load_script("qat_pareto_front", "pareto.py")
    pts = [(1.0, 0.74), (0.26, 0.733), (0.135, 0.736), (0.099, 0.731), (0.072, 0.699),
           (0.15, 0.715), (0.134, 0.745)]
    assert pareto.pareto_front(pts) == [(0.072, 0.699), (0.099, 0.731), (0.134, 0.745)]
    assert pareto.pareto_front([(0.5, 0.7), (0.5, 0.8)]) == [(0.5, 0.8)]
    assert pareto.pareto_front([]) == []


def test_report_draws_pareto_per_task_and_model(scripts, tmp_path: Path) -> None:
    report, pareto = scripts
    root, out = tmp_path / "outputs", tmp_path / "results"
    _tree(root)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n<!-- results:end -->\n")
    rows = report.main(["--root", str(root), "--out", str(out), "--readme", str(readme)])
    schemes = {r.scheme for r in rows if r.model == "textcnn"}
    assert {"auto-size0.1", "auto-size0.135", "auto-size0.05"} <= schemes
    fams = {r.scheme: pareto.family(r) for r in rows if r.model == "textcnn"}
    assert fams["fp32"] == "float" and fams["w4a8"] == "uniform"
    assert fams["w8a8+prune0.8"] == "pruned" and fams["auto-size0.1"] == "auto"
    assert fams["w2a8-ternary"] == "uniform"
    assert fams["auto-size0.05-bands10k/25k"] == "auto-bands"
    png = out / "pareto_20newsgroups_textcnn.png"
    assert png.stat().st_size > 5000
    assert not (out / "pareto_sst2_minilm.png").exists()  # one run: nothing to trade off
    assert "![pareto_20newsgroups_textcnn](results/pareto_20newsgroups_textcnn.png)" in \
        readme.read_text()
    auto = [r for r in rows if r.scheme.startswith("auto")]
    assert len(auto) == 4 and all(r.weight_bits == 0 for r in auto)  # 0: mixed per layer


def test_pareto_script_alone(scripts, tmp_path: Path) -> None:
    _, pareto = scripts
    root = tmp_path / "outputs"
    _tree(root)
    made = pareto.main(["--root", str(root), "--out", str(tmp_path / "plots")])
    assert [p.name for p in made] == ["pareto_20newsgroups_textcnn.png"]
    with pytest.raises(SystemExit, match="no such folder"):
        pareto.main(["--root", str(tmp_path / "missing")])

