"""``qat.autoquant``: per-layer formats for the most accurate model that fits a budget.

::

    config, report = qat.autoquant(model, train_loader, budget=0.10)   # 10 % of float bytes
    print(report)                      # layer, sensitivity per format, chosen format, bytes
    model, _ = qat.prepare(model, config)   # ... then QAT as usual (KD from the float model)
    Path("conf/quant/my_auto.yaml").write_text(report.yaml(config))   # read, edit, commit

Budgets (``kind``, or a mapping ``{kind: value}`` for several at once):

- ``size``: a fraction of the float model's bytes (:func:`qat.summary.model_size`), e.g. 0.10;
- ``bytes``: model bytes (weights at their width, pruned weights sparse, the rest float32);
- ``bits``: average weight bits over the quantized layers (ternary counts 2);
- ``bitops``: a fraction of the float model's bit-operations per example (``MACs * w * a``
  against ``MACs * 32 * 32``; the attention matmuls, which have no weights, are not counted).

Sensitivity (:mod:`qat.auto.sensitivity`) is ``measured`` by default: each group is quantized
alone at each candidate and the KL divergence from the float model's predictions is measured on
``calibration_batches`` batches. It is the quantity the allocation adds up, activation
quantization and the large errors of ternary formats included, where a second-order estimate
is least reliable (TextCNN on 20NG: the ``hessian`` scores are within 10 % of the measured ones
at int8 / int4 but 3-7x below them at ternary; a layer whose small weights a coarse grid zeroes
is measured 8x worse than estimated). It costs one forward pass per (group, candidate) and no
backward (MiniLM, 29 groups x 3 widths on 64 sentences: 3 min on a busy 2-core CPU; the
``hessian`` method took 1.6 min there and 3x the measured time on TextCNN's long documents).
``hessian`` (HAWQ-v2) is there for models with many more groups than candidates, and to compare.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..quant.control import quantizers
from ..surgery import QATConfig, prepare
from .allocate import KINDS, InfeasibleBudget, Problem, solve
from .config import build_config, quant_yaml
from .cost import FLOAT_BITS, count_macs, fixed_bytes
from .layers import Candidate, act_format, candidates, find_layers, group_layers, weight_format
from .sensitivity import METHODS, ZEROS, Calibration, Probe

__all__ = ["autoquant", "AutoQuantReport", "GroupRow"]

_USAGE = {"size": "bytes", "bytes": "bytes", "bits": "bits", "bitops": "bitops"}


@dataclass
class GroupRow:
    """One group of the report."""

    group: str
    layers: list[str]
    why: str
    params: int
    macs: float
    sensitivity: dict[str, float]  # candidate label -> score
    nbytes: dict[str, int]  # candidate label -> bytes of the group's weights
    chosen: str
    chosen_bytes: int


@dataclass
class AutoQuantReport:
    """What :func:`autoquant` measured and chose; ``str()`` is the table."""

    rows: list[GroupRow]
    labels: list[str]
    budget: dict[str, float]
    caps: dict[str, float]
    used: dict[str, float]
    float_bytes: int
    fixed_bytes: int
    predicted_bytes: int
    float_bitops: float
    total_sensitivity: float
    uniform: dict[str, dict[str, float]]  # label -> bytes, size ratio, sensitivity, bitops
    method: str
    objective: str
    examples: int
    batches: int
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """The budget, the chosen totals, uniform formats for comparison and timings."""
        ratio = self.predicted_bytes / self.float_bytes
        lines = [
            "budget: " + ", ".join(_budget_text(k, v) for k, v in self.budget.items()),
            f"chosen: {self.predicted_bytes:,} B ({ratio:.4f}x of {self.float_bytes:,} B float), "
            f"avg weight bits {self.used.get('avg_bits', float('nan')):.3g}, bit-ops "
            f"{self.used.get('bitops_ratio', float('nan')):.4g}x float; total sensitivity "
            f"{self.total_sensitivity:.4g} ({self.method}, {self.objective})",
        ]
        for label, u in self.uniform.items():
            lines.append(f"uniform {label}: {int(u['bytes']):,} B ({u['ratio']:.4f}x), "
                         f"sensitivity {u['sensitivity']:.4g}")
        t = self.seconds
        lines.append(f"calibration: {self.examples} examples in {self.batches} batches; "
                     f"sensitivity {t.get('sensitivity', 0):.1f} s, allocation "
                     f"{t.get('allocation', 0):.2f} s, total {t.get('total', 0):.1f} s")
        return "\n".join(lines)

    def table(self) -> str:
        """Group, parameters, sensitivity per candidate, chosen candidate and its bytes."""
        head = ["group", "params", *self.labels, "chosen", "bytes"]
        body = [[r.group, f"{r.params:,}",
                 *(f"{r.sensitivity[c]:.3g}" if c in r.sensitivity else "-" for c in self.labels),
                 r.chosen, f"{r.chosen_bytes:,}"] for r in self.rows]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
        fmt = lambda row: "  ".join(  # noqa: E731
            str(x).ljust(w) if i == 0 else str(x).rjust(w)
            for i, (x, w) in enumerate(zip(row, widths, strict=True)))
        return "\n".join([fmt(head), "-" * (sum(widths) + 2 * (len(widths) - 1)),
                          *map(fmt, body)])

    def markdown(self) -> str:
        head = ["group", "layers", "params", *self.labels, "chosen", "bytes"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [r.group, ", ".join(r.layers), f"{r.params:,}",
                     *(f"{r.sensitivity[c]:.3g}" if c in r.sensitivity else "-"
                       for c in self.labels), f"**{r.chosen}**", f"{r.chosen_bytes:,}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n\n" + self.summary().replace("\n", "  \n") + "\n"

    def __str__(self) -> str:
        return self.table() + "\n" + self.summary()

    def yaml(self, config: Mapping[str, Any], **callback: Any) -> str:
        """``config`` as a ``conf/quant`` file, with this allocation summarised on top."""
        return quant_yaml(config, "automatic mixed precision (qat.autoquant)\n" + self.summary(),
                          **callback)


def _budget_text(kind: str, value: float) -> str:
    return {"size": f"size <= {value:g}x float", "bytes": f"<= {value:,.0f} B",
            "bits": f"<= {value:g} average weight bits",
            "bitops": f"bit-ops <= {value:g}x float"}[kind]


def _budgets(budget: float | Mapping[str, float], kind: str) -> dict[str, float]:
    items = dict(budget) if isinstance(budget, Mapping) else {kind: budget}
    if not items:
        raise ValueError("autoquant budget is empty: give a number (with kind) or {kind: value}")
    for k, v in items.items():
        if k not in KINDS:
            raise ValueError(f"autoquant budget kind {k!r} is invalid: allowed {list(KINDS)}")
        if not isinstance(v, int | float) or isinstance(v, bool) or not v > 0:
            raise ValueError(f"autoquant budget {k}={v!r} is invalid: allowed a number > 0")
        if k in ("size", "bitops") and v > 1:
            raise ValueError(f"autoquant budget {k}={v!r} is a fraction of the float model: "
                             "allowed (0, 1]")
        if k == "bits" and v > FLOAT_BITS:
            raise ValueError(f"autoquant budget bits={v!r} is invalid: allowed (0, 32]")
    return {k: float(v) for k, v in items.items()}


def _sparsity(layers: Sequence[Any], value: float | Mapping[str, float] | None) -> dict[str, float]:
    if value is None:
        return {}
    rules = value.items() if isinstance(value, Mapping) else [("*", value)]
    out: dict[str, float] = {}
    for pattern, s in rules:
        if not isinstance(s, int | float) or not 0.0 <= s < 1.0:
            raise ValueError(f"autoquant sparsity {pattern!r}: {s!r} is invalid: allowed [0, 1)")
        for layer in layers:
            if fnmatch.fnmatchcase(layer.name, pattern):
                out[layer.name] = float(s)
    return out


def _check_widths(weight_bits: Sequence[int], act_bits: Sequence[int]) -> None:
    if not weight_bits:
        raise ValueError("autoquant weight_bits is empty: allowed widths 1 (binary), "
                         "2 (ternary), 3-8")
    if not act_bits:
        raise ValueError("autoquant act_bits is empty: allowed widths 2-8")
    from ..quant.spec import QuantSpec

    for w in weight_bits:
        weight_format(QuantSpec(), int(w))  # raises with the allowed widths
    for a in act_bits:
        act_format(QuantSpec(), int(a))


def autoquant(
    model: nn.Module,
    dataloader: Iterable[Any],
    budget: float | Mapping[str, float],
    kind: str = "size",
    config: QATConfig | Mapping[str, Any] | None = None,
    weight_bits: Sequence[int] = (2, 4, 8),
    act_bits: Sequence[int] = (8,),
    method: str = "measured",
    objective: str = "kl",
    calibration_batches: int = 8,
    sparsity: float | Mapping[str, float] | None = None,
    groups: Sequence[str] = (),
    hutchinson_samples: int = 16,
    estimator: str = "ggn",
    zeros: str = "structural",
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    seed: int = 0,
    float_bytes: int | None = None,
) -> tuple[dict[str, Any], AutoQuantReport]:
    """Choose a format per layer group for the least total sensitivity within ``budget``.

    ``model``: the float model (left untouched); ``dataloader``: batches as the model takes
    them (dicts of inputs with ``labels``, or ``(inputs, labels)``), of which the first
    ``calibration_batches`` are the calibration set. ``config``: the base QATConfig (specs,
    granularity, estimators, skip patterns; each candidate changes only the width). Candidates
    are ``weight_bits`` (2 = ternary, 1 = binary) times ``act_bits`` for groups that read their
    own quantized input. ``sparsity``: the fraction of each layer's weights a later pruning will
    remove (a number or ``{pattern: fraction}``): sizes and sensitivities are taken with the
    weights magnitude-pruned so. ``groups``: name patterns whose layers must get one format.
    ``zeros``: which zeros the sizes count (``structural``: weights exactly zero in float, so
    the trained model never exceeds the budget; ``codes``: every zero code of the weights as
    they are now, exact for this model, e.g. ternary zeros, which QAT may move).
    ``float_bytes``: the float size that a ``size`` budget and the reported ratios refer to
    (default: ``model``'s; a model whose rarest embedding rows were dropped
    (:mod:`qat.auto.bands`) passes the size of the model before).

    Returns ``(config, report)``: the QATConfig mapping (top-level specs plus name-pattern
    overrides, for :func:`qat.prepare` or a ``conf/quant`` file via ``report.yaml(config)``)
    and the report table.
    """
    t0 = time.perf_counter()
    budgets = _budgets(budget, kind)
    if method not in METHODS:
        raise ValueError(f"autoquant method={method!r} is invalid: allowed {list(METHODS)}")
    if zeros not in ZEROS:
        raise ValueError(f"autoquant zeros={zeros!r} is invalid: allowed {list(ZEROS)}")
    if not isinstance(calibration_batches, int) or calibration_batches < 1:
        raise ValueError(f"autoquant calibration_batches={calibration_batches!r} is invalid: "
                         "allowed an integer >= 1")
    _check_widths(weight_bits, act_bits)
    base = config if isinstance(config, QATConfig) else QATConfig.from_dict(config)
    probe_model, _ = prepare(model, base)  # a private copy
    probe_model.eval()
    for _, q in quantizers(probe_model):
        q.enable_observer(False).enable_fake_quant(False)
    device = next(probe_model.parameters()).device
    calib = Calibration.take(dataloader, calibration_batches, device)
    probe = Probe(probe_model, [], [], calib, objective, loss_fn)
    macs = count_macs(probe_model, probe.reference, calib.examples)  # first forward: ties
    layers = find_layers(probe_model)
    if not layers:
        raise ValueError("autoquant: the config quantizes no weight: nothing to allocate")
    grouped = group_layers(probe_model, layers, groups)
    probe.layers, probe.groups = layers, grouped
    probe.sparsity = _sparsity(layers, sparsity)
    probe.zeros = zeros
    widths = sorted({int(w) for w in weight_bits})
    acts = sorted({int(a) for a in act_bits})
    cands = {g: candidates(group, widths, acts) for g, group in enumerate(grouped)}
    for group in grouped:
        group.macs = sum(macs.get(layer.name, 0.0) for layer in group.layers)
    if any(group.act_choice for group in grouped):
        probe.calibrate_acts(acts)
    t1 = time.perf_counter()
    with torch.no_grad() if method == "measured" else nullcontext():
        scores = probe.measured(cands, widths) if method == "measured" else \
            probe.hessian(cands, widths, hutchinson_samples, seed, estimator)
    t2 = time.perf_counter()

    if float_bytes is None:
        float_bytes = fixed_bytes(probe_model, [])
    elif not isinstance(float_bytes, int) or isinstance(float_bytes, bool) or float_bytes <= 0:
        raise ValueError(f"autoquant float_bytes={float_bytes!r} is invalid: allowed bytes > 0")
    fixed = fixed_bytes(probe_model, layers)
    layer_names = {layer.name for layer in layers}
    float_bitops = sum(macs.values()) * FLOAT_BITS**2
    fixed_bitops = sum(v for k, v in macs.items() if k not in layer_names) * FLOAT_BITS**2
    numel = sum(group.numel for group in grouped)

    def act_of(group: Any, c: Candidate) -> int:
        a = c.a if c.a is not None else next((ly.act_base.bits for ly in group.layers
                                              if ly.act_base is not None), FLOAT_BITS)
        return a

    usage = {
        "bytes": [[scores.nbytes[g, c.w] for c in cands[g]] for g in range(len(grouped))],
        "bits": [[c.w * group.numel for c in cands[g]] for g, group in enumerate(grouped)],
        "bitops": [[group.macs * c.w * act_of(group, c) for c in cands[g]]
                   for g, group in enumerate(grouped)],
    }
    caps: dict[str, float] = {}
    for k, v in budgets.items():
        res = _USAGE[k]
        cap = {"size": v * float_bytes - fixed, "bytes": v - fixed, "bits": v * numel,
               "bitops": v * float_bitops - fixed_bitops}[k]
        cap = float(math.floor(cap)) if res in ("bytes", "bits") else cap  # integral usages
        caps[res] = min(caps.get(res, cap), cap)
    problem = Problem([[scores.sensitivity[g, c] for c in cands[g]] for g in range(len(grouped))],
                      {k: usage[k] for k in caps}, caps)
    try:
        choice = solve(problem)
    except InfeasibleBudget as err:
        least = fixed + sum(min(r) for r in usage["bytes"])
        hint = (f"; the smallest choice is {least:,} B ({least / float_bytes:.4f}x float), of "
                f"which {fixed:,} B stay float (parameters not quantized)"
                if "bytes" in caps else "")
        raise ValueError(f"autoquant budget {_budgets_text(budgets)} cannot be met: "
                         f"{err}{hint}") from None
    t3 = time.perf_counter()

    targets = {}
    for g, group in enumerate(grouped):
        c = cands[g][choice[g]]
        for layer in group.layers:
            a = act_format(layer.act_base, c.a) if c.a is not None and layer.act_base else None
            targets[layer.name] = (weight_format(layer.weight_base, c.w), a)
    out = build_config(base, layers, targets, probe_model)

    multi = len(acts) > 1
    columns = [(w, a) for w in reversed(widths) for a in reversed(acts)]
    label = {col: Candidate(col[0]).wlabel + (f"/a{col[1]}" if multi else "") for col in columns}

    def pick(g: int, col: tuple[int, int]) -> int:  # the group's option for a column
        return next(i for i, c in enumerate(cands[g]) if c.w == col[0] and c.a in (col[1], None))

    rows = []
    for g, group in enumerate(grouped):
        c = cands[g][choice[g]]
        rows.append(GroupRow(group.name, group.names, group.why, group.numel, group.macs,
                             {label[col]: scores.sensitivity[g, cands[g][pick(g, col)]]
                              for col in columns},
                             {label[col]: scores.nbytes[g, col[0]] for col in columns},
                             c.label if multi else c.wlabel, scores.nbytes[g, c.w]))
    predicted = fixed + sum(usage["bytes"][g][c] for g, c in enumerate(choice))
    chosen_bitops = sum(usage["bitops"][g][c] for g, c in enumerate(choice)) + fixed_bitops
    uniform = {}
    for col in columns:
        ids = [pick(g, col) for g in range(len(grouped))]
        nbytes = fixed + sum(usage["bytes"][g][i] for g, i in enumerate(ids))
        name = label[col] if multi else f"{label[col]}/a{col[1]}"
        uniform[name] = {"bytes": nbytes, "ratio": nbytes / float_bytes,
                         "sensitivity": problem.total(ids)}
    t4 = time.perf_counter()
    report = AutoQuantReport(
        rows=rows, labels=[label[col] for col in columns], budget=budgets, caps=caps,
        used={"bytes": predicted, "size_ratio": predicted / float_bytes,
              "avg_bits": sum(usage["bits"][g][c] for g, c in enumerate(choice)) / max(numel, 1),
              "bitops_ratio": chosen_bitops / float_bitops if float_bitops else float("nan")},
        float_bytes=float_bytes, fixed_bytes=fixed, predicted_bytes=predicted,
        float_bitops=float_bitops, total_sensitivity=problem.total(choice), uniform=uniform,
        method=method, objective=objective if loss_fn is None else "loss_fn",
        examples=calib.examples, batches=len(calib.batches),
        seconds={"setup": t1 - t0, "sensitivity": t2 - t1, "allocation": t3 - t2,
                 "total": t4 - t0})
    return out, report


def _budgets_text(budgets: Mapping[str, float]) -> str:
    return ", ".join(_budget_text(k, v) for k, v in budgets.items())

