"""scripts/report.py on a fake outputs tree: table, CSV, plots and the README section."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml
from helpers import load_script

from qat.provenance import NUMERICS_VERSION, numerics_fingerprint, numerics_parts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    yield load_script("qat_report", "report.py")
    sys.modules.pop("qat_report", None)


def _run(root: Path, name: str, run_id: str, quant: dict, stages: dict, seed: int = 42,
         model: str = "TextCNN", task: str = "20newsgroups", prune: float | None = None,
         distill: bool = False, size=(1000, 260), step: float | None = None,
         extra: str = "", criterion: str | None = None) -> Path:
    d = root / name / run_id
    d.mkdir(parents=True)
    cfg = {"name": name, "seed": seed, "quant": quant, "data": {"task": task},
           "model": {"_target_": f"qat.models.{model}"},
           "distill": {"_target_": "qat.lit.kd.KDConfig"} if distill else {}, "prune": {}}
    if prune is not None:
        cfg["prune"] = {"_target_": "qat.prune.PruningCallback",
                        "schedule": {"kind": "cubic", "final_sparsity": prune}}
        if criterion:
            cfg["prune"]["criterion"] = criterion
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    results = {"name": name, "data": {"task": task}, "stages": stages,
               "command": f"qat-train recipe={name} seed={seed} run_id={run_id}{extra}",
               "size": {"fp32_bytes": size[0], "quantized_bytes": size[1]},
               "monitor": "val/accuracy", "commit": "abcdef1234567", "numerics": "n1",
               "hardware": {"cpu_count": 2}, "timing": {"step_time_ratio": step}}
    (d / "results.json").write_text(json.dumps(results))
    return d


W8 = {"mode": "qat", "weight": {"bits": 8}, "activation": {"bits": 8}}
W4 = {"mode": "qat", "weight": {"bits": 4}, "activation": {"bits": 8}}
PTQ8 = {"mode": "ptq", "weight": {"bits": 8}, "activation": {"bits": 8}}
TERN = {"mode": "qat", "weight": {"bits": 2, "mode": "ternary"}, "activation": {"bits": 8}}
FP = {"mode": "fp32"}


def acc(v: float) -> dict:
    return {"test/loss": 1.0, "test/accuracy": v}


def _tree(root: Path) -> None:
    for seed, f, q in ((1, 0.80, 0.797), (2, 0.82, 0.812), (3, 0.84, 0.836)):
        _run(root, "20ng_textcnn_fp32", f"seed{seed}", FP, {"fp32": acc(f)}, seed, size=(1000,
                                                                                        1000))
        _run(root, "20ng_textcnn_w8a8", f"seed{seed}", W8, {"fp32": acc(f), "qat": acc(q)}, seed,
             step=1.1 + seed / 100, extra=" ckpt_path=last" if seed == 3 else "")  # resumed
    _run(root, "20ng_textcnn_w8a8", "x", W4, {"fp32": acc(0.80), "qat": acc(0.79)}, 1,
         size=(1000, 140), distill=True, extra=" quant=w4a8_per_channel_lsq distill=kd")
    _run(root, "20ng_textcnn_w8a8", "y", PTQ8, {"fp32": acc(0.80), "ptq": acc(0.78)}, 1,
         extra=" quant=ptq_w8a8_per_channel")
    _run(root, "20ng_textcnn_w8a8", "z", TERN, {"fp32": acc(0.80), "qat": acc(0.70)}, 1,
         size=(1000, 70), distill=True, extra=" quant=w2a8_ternary_per_channel distill=kd")
    _run(root, "20ng_textcnn_w8a8", "p", W8, {"fp32": acc(0.80), "qat": acc(0.79)}, 1, prune=0.5,
         extra=" prune=gradual")
    _run(root, "20ng_textcnn_w8a8", "m", W8, {"fp32": acc(0.80), "qat": acc(0.798)}, 1,
         prune=0.5, criterion="movement", extra=" prune=gradual prune.criterion=movement")
    _run(root, "sst2_minilm_fp32", "seed42", FP, {"fp32": acc(0.89)}, model="PretrainedClassifier",
         task="sst2")
    broken = root / "broken" / "x"
    broken.mkdir(parents=True)
    (broken / "results.json").write_text("{not json")


def test_report_rows_seeds_targets_archive_readme(report, tmp_path: Path) -> None:
    root, out = tmp_path / "outputs", tmp_path / "results"
    _tree(root)
    sst = root / "sst2_minilm_fp32" / "seed42" / "results.json"  # one run of the current code
    res = json.loads(sst.read_text())
    res.update(command="python scripts/other.py", numerics_version=NUMERICS_VERSION,
               numerics=numerics_fingerprint(), numerics_parts=numerics_parts())
    sst.write_text(json.dumps(res))
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nintro\n\n<!-- results:start -->\nold table\n"
                      "<!-- results:end -->\n\nfooter\n")
    rows = report.main(["--root", str(root), "--out", str(out), "--readme", str(readme)])
    by = {r.scheme: r for r in rows if r.model == "textcnn"}
    assert set(by) == {"fp32", "w8a8", "w4a8+kd", "ptq-w8a8", "w2a8-ternary+kd", "w8a8+prune0.5",
                       "w8a8+prune0.5-movement"}
    fp, w8 = by["fp32"], by["w8a8"]
    assert fp.seeds == [1, 2, 3] and fp.value == pytest.approx(0.82)
    assert fp.std == pytest.approx(0.02) and fp.target == "≥ 0.82: met"
    # the delta pairs each seed with the float model it started from
    assert w8.delta == pytest.approx(((0.797 - 0.80) + (0.812 - 0.82) + (0.836 - 0.84)) / 3)
    assert w8.target == "≥ -0.5: met" and w8.step_time_ratio == pytest.approx(1.12)
    assert w8.command == "qat-train recipe=20ng_textcnn_w8a8 seed=1,2,3"
    assert by["w4a8+kd"].target == "≥ -1.5: met" and by["w4a8+kd"].size_ratio == 0.14
    assert by["w2a8-ternary+kd"].target == "≥ -3.0: misses by 7.00"
    assert by["ptq-w8a8"].method == "ptq" and by["ptq-w8a8"].target == ""
    assert by["w8a8+prune0.5"].target == "≥ -0.5: misses by 0.50"
    assert by["w8a8+prune0.5-movement"].target == "≥ -0.5: met"  # the same goal as magnitude
    sst = next(r for r in rows if r.task == "sst2")
    assert sst.model == "minilm" and sst.target == "≥ 0.90: misses by 1.0"
    with open(out / "results.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows) == 8
    md = (out / "results.md").read_text()
    # made by code this commit does not hold (fake commit and fingerprint): marked, and why
    assert "| 20newsgroups | textcnn | w8a8 | accuracy | 0.8200 | 0.8150 ± 0.0197 † | -0.50 |" in md
    assert "† not what the code and configs on this commit make" in md
    assert "numerics code unknown (commit abcdef1234)" in md
    assert "| sst2 | minilm | fp32 | accuracy |  | 0.8900 |" in md  # current: no mark
    assert "`qat-train recipe=20ng_textcnn_w8a8 quant=w4a8_per_channel_lsq distill=kd seed=1`" in md
    for png in ("accuracy_vs_bits.png", "accuracy_vs_sparsity.png", "qat_vs_ptq.png"):
        assert (out / png).stat().st_size > 1000
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n\n<!-- results:start -->\n| task |")
    assert text.endswith("<!-- results:end -->\n\nfooter\n") and "old table" not in text
    # the archive alone rebuilds the same table (outputs/ is not in the repository)
    archived = json.loads((out / "runs/20ng_textcnn_w8a8/seed2/results.json").read_text())
    assert archived["config"]["seed"] == 2
    again = report.rows_of(report.collect([out / "runs"]))
    assert [(r.scheme, r.value, r.delta) for r in again] == [(r.scheme, r.value, r.delta)
                                                             for r in rows]


def test_report_leaves_readme_without_markers(report, tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    _tree(root)
    readme = tmp_path / "README.md"
    readme.write_text("# Title\nno markers here\n")
    report.main(["--root", str(root), "--out", str(tmp_path / "r"), "--readme", str(readme)])
    assert readme.read_text() == "# Title\nno markers here\n"
    with pytest.raises(SystemExit, match="no results"):
        report.main(["--root", str(tmp_path / "missing"), "--out", str(tmp_path / "none")])


@pytest.mark.parametrize("float_jobs, kept", [(1, True), (2, False), (None, False)])
def test_step_ratio_needs_the_float_run_alone_too(report, tmp_path: Path, float_jobs,
                                                  kept: bool) -> None:
    """The in-run ratio divides by the float run's step: shown only when both ran alone."""
    root = tmp_path / "outputs"
    fdir = _run(root, "20ng_textcnn_fp32", "seed1", FP, {"fp32": acc(0.8)}, 1)
    fres = json.loads((fdir / "results.json").read_text())
    fres["timing"] = {"fp32_step_s": 0.1, "concurrent_jobs": float_jobs}
    (fdir / "results.json").write_text(json.dumps(fres))
    qdir = _run(root, "20ng_textcnn_w8a8", "seed1", W8, {"fp32": acc(0.8), "qat": acc(0.79)}, 1)
    qres = json.loads((qdir / "results.json").read_text())
    qres["timing"] = {"step_time_ratio": 1.2, "concurrent_jobs": 1}
    # recorded where it ran (elsewhere): found among the runs beside this one
    qres["float_run"] = {"recipe": "20ng_textcnn_fp32", "run_dir": "/elsewhere/seed1"}
    (qdir / "results.json").write_text(json.dumps(qres))
    run = report.load_run(qdir / "results.json")
    assert run.step_time_ratio == (pytest.approx(1.2) if kept else None)
    qres["float_run"]["run_dir"] = str(tmp_path / "missing")  # float run nowhere: no ratio
    qres["float_run"]["recipe"] = "gone"
    (qdir / "results.json").write_text(json.dumps(qres))
    assert report.load_run(qdir / "results.json").step_time_ratio is None
