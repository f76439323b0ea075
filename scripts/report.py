"""Collect the recipes' results into a table, plots and the README's results section.

Every run directory under ``--root`` (default ``outputs/``) holds ``results.json`` (written by
``qat/train.py``: stages with test metrics, model sizes, data description) and
``.hydra/config.yaml`` (the composed config; ``.hydra/hydra.yaml`` names the chosen groups).
Writes ``<out>/results.csv`` and ``<out>/results.md`` (task, model, scheme, metric, float
baseline, delta, size ratio, step-time ratio when recorded), plots ``<out>/*.png`` (metric vs
weight bits per model, vs sparsity when runs are pruned, QAT vs PTQ; accuracy against size per
task and model: ``scripts/pareto.py``), and replaces the text between
``<!-- results:start -->`` and ``<!-- results:end -->`` in the README when both markers exist.

Usage: ``python scripts/report.py [--root outputs] [--out results] [--readme README.md]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

START, END = "<!-- results:start -->", "<!-- results:end -->"
__all__ = ["Row", "collect", "write_table", "write_plots", "update_readme", "main"]


@dataclass
class Row:
    """One run, reduced to what the report shows."""

    name: str
    task: str
    model: str
    scheme: str
    method: str  # fp32 | qat | ptq
    weight_bits: int  # 32 for float
    act_bits: int | None
    sparsity: float
    metric: str
    value: float | None
    baseline: float | None
    delta: float | None
    size_ratio: float | None
    step_time_ratio: float | None
    run_dir: str
    mtime: float
    command: str = ""


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _weight_bits(spec: Any) -> int | None:
    if not isinstance(spec, dict):
        return None
    mode = spec.get("mode", "int")
    return {"binary": 1, "ternary": 2}.get(mode, int(spec.get("bits", 8)))


def _scheme(quant: dict[str, Any], sparsity: float,
            distill: bool) -> tuple[str, str, int, int | None]:
    """(scheme label, method, weight bits, activation bits) from the ``quant`` config."""
    method = str(quant.get("mode", "fp32"))
    if method == "fp32" or not quant:
        label, wb, ab = "fp32", 32, None
    elif quant.get("budget") is not None:  # qat.autoquant: formats chosen per layer
        budget = quant["budget"]
        items = budget.items() if isinstance(budget, dict) else [
            (quant.get("budget_kind", "size"), budget)]
        label, wb, ab = "auto-" + "-".join(f"{k}{v:g}" for k, v in items), 0, None  # 0: mixed
    else:
        wb = _weight_bits(quant.get("weight")) or 32
        act = quant.get("activation")
        ab = int(act.get("bits", 8)) if isinstance(act, dict) else None
        mode = (quant.get("weight") or {}).get("mode", "int")
        label = f"w{wb}a{ab if ab is not None else 32}"
        if mode in ("ternary", "binary"):
            label += f"-{mode}"
        if quant.get("overrides"):
            label = f"mixed-{label}"
        if method == "ptq":
            label = f"ptq-{label}"
    if sparsity > 0:
        label += f"+prune{sparsity:g}"
    if distill:
        label += "+kd"
    return label, method, wb, ab


def _metric(results: dict[str, Any], stage: dict[str, float]) -> tuple[str, float | None]:
    """The monitored metric's name and its test value in ``stage``."""
    name = str(results.get("monitor", "val/accuracy")).split("/")[-1]
    for key, value in stage.items():
        if key.split("/")[-1] == name and key.startswith("test"):
            return name, float(value)
    others = [(k, v) for k, v in stage.items() if not k.endswith("/loss")]
    return (others[0][0].split("/")[-1], float(others[0][1])) if others else (name, None)


def _step_time_ratio(results: dict[str, Any]) -> float | None:
    for key in ("step_time_ratio", "step_time"):
        value = results.get(key)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, dict) and isinstance(value.get("ratio"), int | float):
            return float(value["ratio"])
    timing = results.get("timing")
    if isinstance(timing, dict) and isinstance(timing.get("step_time_ratio"), int | float):
        return float(timing["step_time_ratio"])
    return None


def _row(path: Path) -> Row | None:
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    run = path.parent
    cfg = _load_yaml(run / ".hydra" / "config.yaml")
    choices = (_load_yaml(run / ".hydra" / "hydra.yaml").get("hydra") or {}).get("choices") or {}
    quant = cfg.get("quant") or {}
    prune = cfg.get("prune") or {}
    sparsity = float(((prune.get("schedule") or {}).get("final_sparsity", 0.0))
                     if "_target_" in prune else 0.0)
    distill = "_target_" in (cfg.get("distill") or {})
    scheme, method, wb, ab = _scheme(quant, sparsity, distill)
    stages = results.get("stages") or {}
    stage = stages.get(method) or stages.get("qat") or stages.get("ptq") or stages.get("fp32")
    if not stage:
        return None
    metric, value = _metric(results, stage)
    baseline = stages.get("fp32")
    base = _metric(results, baseline)[1] if baseline and method != "fp32" else None
    size = results.get("size") or {}
    ratio = None
    if size.get("fp32_bytes") and size.get("quantized_bytes") and method != "fp32":
        ratio = size["quantized_bytes"] / size["fp32_bytes"]
    target = str((cfg.get("model") or {}).get("_target_", "?"))
    model = choices.get("model") or target.split(".")[-1]
    task = str((results.get("data") or {}).get("task") or (cfg.get("data") or {}).get("task", "?"))
    name = str(results.get("name") or choices.get("recipe") or run.name)
    return Row(name, task.lower(), str(model).lower(), scheme, method, wb, ab, sparsity, metric,
               value, base, None, ratio, _step_time_ratio(results), str(run),
               path.stat().st_mtime, _command(run, name))


def _command(run: Path, name: str) -> str:
    """The qat-train command line of a run, from Hydra's record of its overrides."""
    path = run / ".hydra" / "overrides.yaml"
    try:
        overrides = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        overrides = None
    if not isinstance(overrides, list) or not overrides:
        overrides = [f"recipe={name}"]
    return " ".join(["qat-train", *map(str, overrides)])


def collect(root: Path) -> list[Row]:
    """One row per distinct run configuration (the newest run wins). A quantized run's float
    baseline is the float run of the same task and model (a float recipe: the comparison at a
    training budget of its own) when there is one, else the run's own float stage."""
    latest: dict[tuple, Row] = {}
    for path in sorted(Path(root).rglob("results.json")):
        row = _row(path)
        if row is None:
            continue
        key = (row.name, row.task, row.model, row.scheme)
        if key not in latest or row.mtime > latest[key].mtime:
            latest[key] = row
    rows = sorted(latest.values(), key=lambda r: (r.task, r.model, -r.weight_bits, r.scheme))
    floats = {(r.task, r.model): r.value for r in rows if r.method == "fp32"}
    for r in rows:
        if r.method != "fp32" and floats.get((r.task, r.model)) is not None:
            r.baseline = floats[(r.task, r.model)]
        if r.value is not None and r.baseline is not None and r.method != "fp32":
            r.delta = r.value - r.baseline
    return rows


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{100 * v:+.2f}" if pct else f"{v:.4f}"
    return str(v)


def markdown(rows: Sequence[Row]) -> str:
    head = ("| task | model | scheme | metric | value | float baseline | delta (points) | "
            "size ratio | step-time ratio | command |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r.size_ratio:.3f}x" if r.size_ratio is not None else ""
        step = f"{r.step_time_ratio:.2f}x" if r.step_time_ratio is not None else ""
        lines.append(f"| {r.task} | {r.model} | {r.scheme} | {r.metric} | {_fmt(r.value)} | "
                     f"{_fmt(r.baseline)} | {_fmt(r.delta, pct=True)} | {ratio} | {step} | "
                     f"`{r.command}` |")
    return "\n".join(lines)


def write_table(rows: Sequence[Row], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    cols = [f.name for f in fields(Row)]
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    (out / "results.md").write_text("# Results\n\n" + markdown(rows) + "\n")
    return out / "results.csv", out / "results.md"


def write_plots(rows: Sequence[Row], out: Path) -> list[Path]:
    """Metric vs weight bits (per model), vs sparsity (pruned runs), QAT vs PTQ bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    made = []
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.value is not None:
            groups.setdefault((r.task, r.model), []).append(r)
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for (task, model), rs in sorted(groups.items()):
        pts = sorted({(r.weight_bits, r.value) for r in rs if r.method in ("qat", "fp32")
                      and r.sparsity == 0 and not r.scheme.startswith(("mixed", "auto"))})
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{model} / {task}")
            drawn = True
    if drawn:
        ax.set_xscale("log", base=2)
        ax.set(xlabel="weight bits (32 = float)", ylabel="test metric",
               title="QAT: metric against weight bit width")
        ax.legend(fontsize=7)
        made.append(out / "accuracy_vs_bits.png")
        fig.savefig(made[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    pruned = [r for r in rows if r.sparsity > 0 and r.value is not None]
    if pruned:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (task, model), rs in sorted(groups.items()):
            for kd in (False, True):  # one line without KD, one with
                pts = sorted({(r.sparsity, r.value) for r in rs
                              if (r.sparsity > 0 and r.scheme.endswith("+kd") == kd)
                              or r.method == "fp32"})
                if any(p[0] > 0 for p in pts):
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o--" if kd else "o-",
                            label=f"{model} / {task}" + (" + KD" if kd else ""))
        ax.set(xlabel="sparsity", ylabel="test metric", title="metric against sparsity")
        ax.legend(fontsize=7)
        made.append(out / "accuracy_vs_sparsity.png")
        fig.savefig(made[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    pairs = []
    for (task, model), rs in sorted(groups.items()):
        for r in rs:
            if r.method != "ptq":
                continue
            twin = [q for q in rs if q.method == "qat" and q.weight_bits == r.weight_bits
                    and q.act_bits == r.act_bits and q.sparsity == r.sparsity]
            if twin:
                pairs.append((f"{model}/{task}\nW{r.weight_bits}A{r.act_bits}", r.value,
                              twin[0].value))
    if pairs:
        fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(pairs)), 4))
        xs = range(len(pairs))
        ax.bar([x - 0.2 for x in xs], [p[1] for p in pairs], 0.4, label="PTQ")
        ax.bar([x + 0.2 for x in xs], [p[2] for p in pairs], 0.4, label="QAT")
        ax.set_xticks(list(xs), [p[0] for p in pairs], fontsize=7)
        ax.set(ylabel="test metric", title="QAT against PTQ")
        ax.legend()
        made.append(out / "qat_vs_ptq.png")
        fig.savefig(made[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return made


def _pareto() -> Any:
    """scripts/pareto.py (accuracy against size), loaded beside this file."""
    import importlib.util
    import sys

    if "qat_pareto" not in sys.modules:
        spec = importlib.util.spec_from_file_location("qat_pareto",
                                                      Path(__file__).with_name("pareto.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules["qat_pareto"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["qat_pareto"]


def update_readme(readme: Path, table: str, images: Sequence[Path]) -> bool:
    """Replace the text between the markers (both must exist); True if the file changed."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    i, j = text.find(START), text.find(END)
    if i < 0 or j < 0 or j < i:
        return False
    links = []
    for p in images:
        try:
            rel = p.resolve().relative_to(readme.resolve().parent)
        except ValueError:
            rel = p
        links.append(f"![{p.stem}]({rel.as_posix()})")
    body = "\n\n".join([table, *links]) if links else table
    new = text[: i + len(START)] + "\n" + body + "\n" + text[j:]
    if new != text:
        readme.write_text(new)
    return new != text


def main(argv: Sequence[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="outputs", help="folder searched for results.json")
    p.add_argument("--out", default="results", help="where results.csv/.md and plots go")
    p.add_argument("--readme", default="README.md")
    args = p.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        raise SystemExit(f"--root {root}: no such folder (run the recipes first)")
    rows = collect(root)
    out = Path(args.out)
    csv_path, md_path = write_table(rows, out)
    images = write_plots(rows, out) + _pareto().write_pareto(rows, out)
    note = (f"Generated by `python scripts/report.py --root {args.root}`; the last column is the "
            "command of each run, the size ratio is the quantized model's bytes over the float "
            "model's, the step-time ratio the quantized stage's median training step over the "
            "float stage's (measured inside the run).")
    changed = update_readme(Path(args.readme), markdown(rows) + "\n\n" + note, images)
    print(f"{len(rows)} runs -> {csv_path}, {md_path}, {len(images)} plots"
          + (f"; {args.readme} updated" if changed else ""))
    return rows


if __name__ == "__main__":
    main()
