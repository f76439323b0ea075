"""Collect the runs' results into one table, plots and the README's results section.

Every run folder holds ``results.json`` (written by ``qat/train.py`` or ``scripts/baselines.py``:
test metrics per stage, sizes, timing, command, commit, numerics fingerprint, hardware) and
``config.yaml`` (the resolved config). Runs that differ only in their seed form one row: the
value is the mean (± standard deviation over seeds), the delta the mean of each seed's change
against the float model that seed started from. Each row is checked against its target (the
float accuracy goals and the retention goals of the results issue) and says by how much it
misses. The collected results.json files are copied to ``<out>/runs/`` so the table can be
rebuilt from the repository alone (``--root results/runs``).

Writes ``<out>/results.csv``, ``<out>/results.md``, plots ``<out>/*.png`` (metric against weight
bits, against sparsity, QAT against PTQ; accuracy against size per task and model, with the
Pareto front: ``scripts/pareto.py``) and replaces the text between
``<!-- results:start -->`` and ``<!-- results:end -->`` in the README.

Usage: ``python scripts/report.py [--root outputs] [--out results] [--readme README.md]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

START, END = "<!-- results:start -->", "<!-- results:end -->"
__all__ = ["Run", "Row", "load_run", "collect", "rows_of", "markdown", "write_table",
           "write_plots", "update_readme", "main", "FLOAT_TARGETS", "RETENTION_TARGETS"]

# float goals (task, model) -> minimum test metric; retention goals scheme -> minimum delta
FLOAT_TARGETS = {
    ("20newsgroups", "textcnn"): 0.82, ("20newsgroups", "bilstm"): 0.80,
    ("20newsgroups", "transformer"): 0.78, ("20newsgroups", "embbag"): 0.85,
    ("20newsgroups", "minilm"): 0.83, ("sst2", "minilm"): 0.90, ("cola", "minilm"): 0.40,
    ("mrpc", "minilm"): 0.88, ("stsb", "minilm"): 0.85, ("rte", "minilm"): 0.62,
}
RETENTION_TARGETS = {"w8a8": -0.005, "w4a8+kd": -0.015, "w4a8": -0.015, "w2a8-ternary+kd": -0.03,
                     "w8a8+prune0.5": -0.005, "w8a8+prune0.5+kd": -0.005,
                     "w8a8+prune0.8+kd": -0.015}


@dataclass
class Run:
    """One results.json, reduced to what the table needs."""

    name: str
    task: str
    model: str
    scheme: str
    method: str  # fp32 | qat | ptq
    weight_bits: int
    act_bits: int | None
    sparsity: float
    seed: int | None
    metric: str
    value: float | None
    float_value: float | None  # the float model this run started from (same seed)
    size_ratio: float | None
    step_time_ratio: float | None
    hardware: str
    commit: str
    command: str
    path: str
    stale: str = ""  # why this run is not what the current code and config make ("" if it is)


@dataclass
class Row:
    """Runs that differ only in their seed."""

    task: str
    model: str
    scheme: str
    method: str
    weight_bits: int
    act_bits: int | None
    sparsity: float
    metric: str
    value: float | None
    std: float | None
    float_value: float | None
    delta: float | None
    size_ratio: float | None
    step_time_ratio: float | None
    seeds: list[int] = field(default_factory=list)
    target: str = ""
    hardware: str = ""
    commit: str = ""
    command: str = ""
    stale: str = ""  # why some of its runs are not what the current code and config make


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
    return {"binary": 1, "ternary": 2}.get(spec.get("mode", "int"), int(spec.get("bits", 8)))


def _scheme(quant: dict[str, Any], sparsity: float, distill: bool, lstm_full: bool,
            criterion: str = "magnitude") -> tuple[str, str, int, int | None]:
    """(scheme label, method, weight bits, activation bits) from the ``quant`` config (and the
    pruning's final sparsity and criterion)."""
    method = str(quant.get("mode", "fp32")) if quant else "fp32"
    if method == "fp32":
        label, wb, ab = "fp32", 32, None
    elif quant.get("budget") is not None:  # qat.autoquant: formats chosen per layer
        budget = quant["budget"]
        items = budget.items() if isinstance(budget, dict) else [
            (quant.get("budget_kind", "size"), budget)]
        label, wb, ab = "auto-" + "-".join(f"{k}{v:g}" for k, v in items), 0, None  # 0: mixed
        bands = (quant.get("embedding_bands") or {}).get("bounds")
        if bands:  # the embedding's frequency bands (qat.auto.bands): 10k/25k
            label += "-bands" + "/".join(f"{b // 1000}k" if b % 1000 == 0 else str(b)
                                         for b in bands)
    else:
        wb = _weight_bits(quant.get("weight")) or 32
        act = quant.get("activation")
        ab = int(act.get("bits", 8)) if isinstance(act, dict) else None
        mode = (quant.get("weight") or {}).get("mode", "int")
        label = f"w{wb}a{ab if ab is not None else 32}"
        if mode in ("ternary", "binary"):
            label += f"-{mode}"
        if quant.get("overrides") and not lstm_full:
            label = f"mixed-{label}"
        if lstm_full:
            label += "-lstm-full"
        if method == "ptq":
            label = f"ptq-{label}"
    if sparsity > 0:
        label += f"+prune{sparsity:g}" + ("-movement" if criterion == "movement" else "")
    if distill:
        label += "+kd"
    return label, method, wb, ab


def _metric(results: dict[str, Any], stage: dict[str, float] | None) -> tuple[str, float | None]:
    """The monitored metric's name and its test value in ``stage``."""
    name = str(results.get("monitor", "val/accuracy")).split("/")[-1]
    for key, value in (stage or {}).items():
        if key.split("/")[-1] == name and key.startswith("test"):
            return name, float(value)
    return name, None


def _hardware(results: dict[str, Any]) -> str:
    hw = results.get("hardware") or {}
    if hw.get("gpu"):
        return str(hw["gpu"]).replace("NVIDIA ", "")
    if hw.get("cpu_count"):
        return f"{hw['cpu_count']}-core CPU"
    return ""


def _model_name(cfg: dict[str, Any], results: dict[str, Any]) -> str:
    if results.get("model"):
        return str(results["model"])
    target = str((cfg.get("model") or {}).get("_target_", "?")).split(".")[-1]
    names = {"TextCNN": "textcnn", "BiLSTMClassifier": "bilstm", "EmbeddingBagMLP": "embbag",
             "TransformerClassifier": "transformer", "PretrainedClassifier": "minilm"}
    return names.get(target, target.lower())


def _float_alone(results: dict[str, Any], path: Path) -> bool:
    """Whether the float run a quantized run started from (``float_run``) ran alone: its
    step time is the denominator of the quantized run's ratio. True without a float run (the
    float stage ran in this run); False when it cannot be found
    (:func:`qat.provenance.float_run_dir`)."""
    from qat.provenance import float_run_dir

    if not (results.get("float_run") or {}).get("run_dir"):
        return True
    up = float_run_dir(path.parent, results)
    try:
        prior = json.loads((up / "results.json").read_text()) if up is not None else {}
    except (OSError, json.JSONDecodeError):
        return False
    return (prior.get("timing") or {}).get("concurrent_jobs") == 1


def load_run(path: Path) -> Run | None:
    """A run from its results.json (and the config.yaml beside it), None if unusable."""
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    run = path.parent
    cfg = results.get("config") or _load_yaml(run / "config.yaml") or _load_yaml(
        run / ".hydra" / "config.yaml")
    quant = cfg.get("quant") or {}
    prune = cfg.get("prune") or {}
    sparsity = float(((prune.get("schedule") or {}).get("final_sparsity", 0.0))
                     if "_target_" in prune else 0.0)
    distill = "_target_" in (cfg.get("distill") or {})
    lstm_full = any("slots" in (r or {}) for r in (quant.get("overrides") or {}).values()) if (
        isinstance(quant.get("overrides"), dict)) else False
    scheme, method, wb, ab = _scheme(quant, sparsity, distill, lstm_full,
                                     str(prune.get("criterion", "magnitude")))
    stages = results.get("stages") or {}
    stage = stages.get(method) or (stages.get("fp32") if method == "fp32" else None)
    if not stage:
        return None
    metric, value = _metric(results, stage)
    float_value = _metric(results, stages.get("fp32"))[1] if method != "fp32" else None
    size = results.get("size") or {}
    ratio = None
    if size.get("fp32_bytes") and size.get("quantized_bytes") and method != "fp32":
        ratio = size["quantized_bytes"] / size["fp32_bytes"]
    timing = dict(results.get("timing") or {})
    shared = timing.get("concurrent_jobs")
    gpu = bool((results.get("hardware") or {}).get("gpu"))
    if (shared is not None and shared != 1) or (shared is None and gpu) or not _float_alone(
            results, path):
        # other jobs shared the machine, in this run or in the float run whose step it divides
        # by (GPU sweeps run many at once; runs that predate the record of it were all such):
        # the in-run ratio is not a clean figure
        timing["step_time_ratio"] = None
    task = str((results.get("data") or {}).get("task") or "?").lower()
    seed = cfg.get("seed", (results.get("data") or {}).get("seed"))
    return Run(str(results.get("name") or run.parent.name), task, _model_name(cfg, results),
               scheme, method, wb, ab, sparsity, seed, metric, value, float_value, ratio,
               timing.get("step_time_ratio"), _hardware(results),
               str(results.get("commit") or "")[:10], str(results.get("command") or ""),
               str(path))


def _command_key(command: str) -> str:
    """The command without its seed, run id, resume and display flags: runs of one row share
    it (a run resumed with ``ckpt_path=last`` is the run it continues)."""
    return re.sub(r"\s(seed|run_id|ckpt_path|trainer\.enable_progress_bar)=\S+", "",
                  command).strip()


def collect(roots: Sequence[Path]) -> list[Run]:
    """Every run under ``roots``; for one command and seed, the newest results.json wins; each
    says why it is stale, if it is (:func:`qat.provenance.stale_reason`)."""
    found: dict[tuple, tuple[float, Run]] = {}
    for root in roots:
        for path in sorted(Path(root).rglob("results.json")) + sorted(
                Path(root).rglob("*.results.json")):
            run = load_run(path)
            if run is None or run.value is None:
                continue
            key = (run.name, run.scheme, _command_key(run.command), run.seed)
            stamp = path.stat().st_mtime
            if key not in found or stamp > found[key][0]:
                found[key] = (stamp, run)
    from qat.provenance import numerics_parts, stale_reason

    runs = [r for _, r in found.values()]
    parts, cache = numerics_parts(), {}
    for r in runs:
        r.stale = stale_reason(Path(r.path).parent, parts, None, cache) or ""
    return runs


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _target(row: Row) -> str:
    if row.value is None:
        return ""
    if row.method == "fp32":
        goal = FLOAT_TARGETS.get((row.task, row.model))
        if goal is None:
            return ""
        gap = row.value - goal
        return f"≥ {goal:.2f}: met" if gap >= 0 else f"≥ {goal:.2f}: misses by {-100 * gap:.1f}"
    goal = RETENTION_TARGETS.get(re.sub(r"-lstm-full|-movement", "", row.scheme))
    if goal is None or row.delta is None:
        return ""
    gap = row.delta - goal
    want = f"≥ {100 * goal:+.1f}"
    return f"{want}: met" if gap >= 0 else f"{want}: misses by {-100 * gap:.2f}"


def rows_of(runs: Sequence[Run]) -> list[Row]:
    """One row per (task, model, scheme, command without seed): means over seeds."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.task, r.model, r.scheme, _command_key(r.command)), []).append(r)
    rows = []
    for (task, model, scheme, cmd), rs in groups.items():
        rs = sorted(rs, key=lambda r: (r.seed is None, r.seed))
        vals = [r.value for r in rs if r.value is not None]
        deltas = [r.value - r.float_value for r in rs
                  if r.value is not None and r.float_value is not None]
        floats = [r.float_value for r in rs if r.float_value is not None]
        steps = [r.step_time_ratio for r in rs if r.step_time_ratio]
        sizes = [r.size_ratio for r in rs if r.size_ratio]
        seeds = [r.seed for r in rs if r.seed is not None]
        r0 = rs[0]
        if len(seeds) > 1:
            cmd = f"{cmd} seed={','.join(map(str, seeds))}"
        elif seeds and r0.method != "fp32" or (seeds and seeds[0] != 42):
            cmd = f"{cmd} seed={seeds[0]}"
        row = Row(task, model, scheme, r0.method, r0.weight_bits, r0.act_bits, r0.sparsity,
                  r0.metric, _mean(vals), statistics.stdev(vals) if len(vals) > 1 else None,
                  _mean(floats), _mean(deltas), _mean(sizes),
                  statistics.median(steps) if steps else None, seeds,
                  hardware=", ".join(sorted({r.hardware for r in rs if r.hardware})),
                  commit=", ".join(sorted({r.commit for r in rs if r.commit})), command=cmd,
                  stale="; ".join(sorted({r.stale for r in rs if r.stale})))
        row.target = _target(row)
        rows.append(row)
    order = {"fp32": 0, "qat": 1, "ptq": 2}
    return sorted(rows, key=lambda r: (r.task != "20newsgroups", r.task, r.model != "tfidf-linear",
                                       r.model, order.get(r.method, 3), -r.weight_bits, r.scheme))


def _fmt(v: float | None, std: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def markdown(rows: Sequence[Row]) -> str:
    head = ("| task | model | scheme | metric | float | value | delta (points) | target | "
            "size | step time | seeds | hardware | command |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        delta = f"{100 * r.delta:+.2f}" if r.delta is not None else ""
        size = f"{r.size_ratio:.3f}x" if r.size_ratio is not None else ""
        step = f"{r.step_time_ratio:.2f}x" if r.step_time_ratio is not None else ""
        seeds = str(len(r.seeds)) if r.seeds else ""
        mark = " †" if r.stale else ""
        lines.append(f"| {r.task} | {r.model} | {r.scheme} | {r.metric} | {_fmt(r.float_value)} "
                     f"| {_fmt(r.value, r.std)}{mark} | {delta} | {r.target} | {size} | {step} | "
                     f"{seeds} | {r.hardware} | `{r.command}` |")
    stale = sorted({r.stale for r in rows if r.stale})
    if stale:
        lines += ["", "† not what the code and configs on this commit make (rerun: "
                  "`python scripts/sweep.py`): " + "; ".join(stale) + "."]
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


def archive(runs: Sequence[Run], out: Path) -> int:
    """Copy each run's results.json (and config.yaml) to ``<out>/runs/<name>/``."""
    n = 0
    for r in runs:
        src = Path(r.path)
        if src.name != "results.json":
            continue  # already an archived copy
        dest = out / "runs" / r.name / src.parent.name
        dest.mkdir(parents=True, exist_ok=True)
        data = json.loads(src.read_text())
        cfg = _load_yaml(src.parent / "config.yaml")
        if cfg and "config" not in data:
            data["config"] = cfg
        (dest / "results.json").write_text(json.dumps(data, indent=1, default=str))
        n += 1
    return n


def write_plots(rows: Sequence[Row], out: Path) -> list[Path]:
    """Metric against weight bits, against sparsity, QAT against PTQ, and against size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    made = []
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.value is not None and r.model != "tfidf-linear":
            groups.setdefault((r.task, r.model), []).append(r)

    def save(fig, name: str) -> None:
        made.append(out / name)
        fig.savefig(made[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for (task, model), rs in sorted(groups.items()):
        pts = sorted({(r.weight_bits, r.value) for r in rs if r.method in ("qat", "fp32")
                      and r.sparsity == 0 and "mixed" not in r.scheme
                      and "lstm-full" not in r.scheme and not r.scheme.startswith("auto")})
        if len(pts) > 1:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{model} / {task}")
            drawn = True
    if drawn:
        ax.set_xscale("log", base=2)
        ax.set(xlabel="weight bits (32 = float)", ylabel="test metric",
               title="QAT: metric against weight bit width")
        ax.legend(fontsize=6, ncol=2)
        save(fig, "accuracy_vs_bits.png")
    else:
        plt.close(fig)
    pruned = [r for r in rows if r.sparsity > 0 and r.value is not None]
    if pruned:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (task, model), rs in sorted(groups.items()):
            pts = sorted({(r.sparsity, r.value) for r in rs
                          if r.sparsity > 0 or r.method == "fp32"})
            if any(p[0] > 0 for p in pts):
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{model} / {task}")
        ax.set(xlabel="sparsity (W8A8; 80 % with KD)", ylabel="test metric",
               title="metric against sparsity")
        ax.legend(fontsize=6, ncol=2)
        save(fig, "accuracy_vs_sparsity.png")
    pairs = []
    for (task, model), rs in sorted(groups.items()):
        for r in rs:
            if r.method != "ptq":
                continue
            twin = [q for q in rs if q.method == "qat" and q.weight_bits == r.weight_bits
                    and q.act_bits == r.act_bits and q.sparsity == 0]
            if twin:
                pairs.append((f"{model}/{task}\nW{r.weight_bits}A{r.act_bits}", r.value,
                              twin[0].value))
    if pairs:
        fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(pairs)), 4))
        xs = range(len(pairs))
        ax.bar([x - 0.2 for x in xs], [p[1] for p in pairs], 0.4, label="PTQ")
        ax.bar([x + 0.2 for x in xs], [p[2] for p in pairs], 0.4, label="QAT")
        ax.set_xticks(list(xs), [p[0] for p in pairs], fontsize=6, rotation=90)
        ax.set(ylabel="test metric", title="QAT against PTQ")
        ax.legend()
        save(fig, "qat_vs_ptq.png")
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


NOTE = ("Generated by `python scripts/report.py`. value: test metric (GLUE: the official dev "
        "set; models are selected on a validation split carved from train), mean ± standard "
        "deviation over the seeds; float: the float model each quantized run started from "
        "(`init_from`), delta: the mean per-seed change against it; size: quantized bytes over "
        "float bytes; step time: the quantized stage's median training step over the float "
        "run's (measured inside the runs); hardware and commit per row in results/results.csv.")


def main(argv: Sequence[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", action="append", default=None,
                   help="folder searched for results.json (repeatable; default outputs and "
                        "results/runs)")
    p.add_argument("--out", default="results", help="where results.csv/.md and plots go")
    p.add_argument("--readme", default="README.md")
    args = p.parse_args(argv)
    out = Path(args.out)
    roots = [Path(r) for r in (args.root or ["outputs", str(out / "runs")])]
    roots = [r for r in roots if r.is_dir()]
    if not roots:
        raise SystemExit("no results: run the sweep first (python scripts/sweep.py)")
    runs = collect(roots)
    archived = archive(runs, out)
    rows = rows_of(runs)
    csv_path, md_path = write_table(rows, out)
    images = write_plots(rows, out) + _pareto().write_pareto(rows, out)
    changed = update_readme(Path(args.readme), markdown(rows) + "\n\n" + NOTE, images)
    print(f"{len(runs)} runs ({archived} archived) -> {len(rows)} rows: {csv_path}, {md_path}, "
          f"{len(images)} plots" + (f"; {args.readme} updated" if changed else ""))
    return rows


if __name__ == "__main__":
    main()
