"""Accuracy against model size: one Pareto plot per task and model, from report.py's rows.

Each run is a point at (size ratio = quantized bytes / float bytes, test metric), drawn by
family: the float model (at 1.0), uniform QAT formats (W8 / W4 / ternary ..., joined by a line),
PTQ, pruned variants, hand-written mixed precision and the automatic allocation (``qat-train
recipe=..._auto quant.budget=b``, joined by a line). The dashed line is the Pareto front: the
best metric reached at each size or below. Sizes are :func:`qat.summary.model_size` (pruned
weights as stored: bitmask plus non-zero codes).

``python scripts/pareto.py --root outputs --out results`` writes
``results/pareto_<task>_<model>.png`` (``python scripts/report.py`` calls :func:`write_pareto`).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["family", "pareto_front", "write_pareto", "main"]

FAMILIES = ("float", "uniform", "ptq", "pruned", "mixed", "auto", "auto-bands")
_STYLE = {"float": ("*", "black"), "uniform": ("o", "tab:blue"), "ptq": ("x", "tab:gray"),
          "pruned": ("s", "tab:orange"), "mixed": ("^", "tab:purple"), "auto": ("D", "tab:red"),
          "auto-bands": ("P", "tab:green")}
_LINKED = ("uniform", "auto", "auto-bands")


def family(row: Any) -> str:
    """Which series a report row belongs to."""
    if row.method == "fp32":
        return "float"
    if row.scheme.startswith("auto"):  # with embedding frequency bands: a series of its own
        return "auto-bands" if "-bands" in row.scheme else "auto"
    if row.method == "ptq":
        return "ptq"
    if row.sparsity > 0:
        return "pruned"
    if row.scheme.startswith("mixed"):
        return "mixed"
    return "uniform"


def _size(row: Any) -> float | None:
    return 1.0 if row.method == "fp32" else row.size_ratio


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats (smaller or equal size and a higher metric), by size."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def _label(row: Any) -> str:
    return row.scheme.replace("+kd", " KD")


def write_pareto(rows: Sequence[Any], out: Path) -> list[Path]:
    """One ``pareto_<task>_<model>.png`` per task and model with at least two sized runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str], list[Any]] = {}
    for r in rows:
        if r.value is not None and _size(r):
            groups.setdefault((r.task, r.model), []).append(r)
    made = []
    for (task, model), rs in sorted(groups.items()):
        if len(rs) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for fam in FAMILIES:
            pts = sorted((_size(r), r.value, _label(r)) for r in rs if family(r) == fam)
            if not pts:
                continue
            marker, color = _STYLE[fam]
            style = "-" if fam in _LINKED and len(pts) > 1 else ""
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=style,
                    color=color, label=fam, markersize=7 if fam != "float" else 11)
            for x, y, text in pts:
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=6, color=color)
        front = pareto_front([(_size(r), r.value) for r in rs])
        if len(front) > 1:
            xs, ys = zip(*front, strict=True)
            ax.step(xs, ys, where="post", linestyle="--", color="0.6", linewidth=1,
                    label="Pareto front", zorder=0)
        ax.set_xscale("log")
        metric = rs[0].metric
        ax.set(xlabel="model size / float model size (log)", ylabel=f"test {metric}",
               title=f"{model} on {task}: {metric} against size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        path = out / f"pareto_{task}_{model}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        made.append(path)
    return made


def _report() -> Any:
    if "qat_report" in sys.modules:
        return sys.modules["qat_report"]
    spec = importlib.util.spec_from_file_location("qat_report", Path(__file__).with_name(
        "report.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["qat_report"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def main(argv: Sequence[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="outputs", help="folder searched for results.json")
    p.add_argument("--out", default="results", help="where the plots go")
    args = p.parse_args(argv)
    if not Path(args.root).is_dir():
        raise SystemExit(f"--root {args.root}: no such folder (run the recipes first)")
    report = _report()
    made = write_pareto(report.rows_of(report.collect([Path(args.root)])), Path(args.out))
    print(f"{len(made)} Pareto plots in {args.out}")
    return made


if __name__ == "__main__":
    main()
