"""Model size (float vs quantized storage) and the end-of-run results table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .nn.base import QuantModule
from .quant import FakeQuantizer

__all__ = ["model_size", "print_results", "compare_line"]


def model_size(model: nn.Module) -> int:
    """Bytes to store the model's parameters: quantized weights at their bit width, or as a
    bitmask plus the non-zero codes when that is smaller (pruned weights, as the integer
    checkpoint stores them: :mod:`qat.export.sparse`), plus a float32 scale and an 8-bit zero
    point per row; everything else as float32. Quantizer parameters (learned scales) count as
    the scales they are."""
    from .export.qweight import quantize_weight
    from .export.sparse import int_weight_nbytes

    total = 0
    for module in model.modules():
        if isinstance(module, FakeQuantizer):
            continue
        wq = module.weight_quantizers() if isinstance(module, QuantModule) else {}
        for name, p in module.named_parameters(recurse=False):
            q = wq.get(name)
            if q is not None and q.is_fake_quant:
                total += int_weight_nbytes(quantize_weight(q, p, check=False))
            else:
                total += p.numel() * p.element_size()
    return total


def _stage_label(stage: str, results: dict[str, Any]) -> str:
    """What a stage is: the float model (and where it comes from) or the quantized stage."""
    if stage != "fp32":
        scheme = results.get("name", "")
        return f"{stage.upper()} ({scheme})" if scheme else stage.upper()
    up = results.get("float_run") or {}
    if up.get("recipe"):
        return f"float: {up['recipe']} ({Path(up['run_dir']).name})"
    if up.get("checkpoint"):
        return "float: init_from checkpoint"
    if len(results.get("stages", {})) > 1:
        return "float: this run's float warm-up stage"
    return "float"


def compare_line(results: dict[str, Any]) -> str | None:
    """``quantized vs the float model it started from: metric a -> b (+d points)``."""
    stages = results.get("stages", {})
    quant = [s for s in stages if s != "fp32"]
    metric = results.get("monitor", "").replace("val", "test", 1)
    if "fp32" not in stages or not quant:
        return None
    a, b = stages["fp32"].get(metric), stages[quant[-1]].get(metric)
    if a is None or b is None:
        return None
    return (f"quantized vs the float model it started from: {metric} {a:.4f} -> {b:.4f} "
            f"({100 * (b - a):+.2f} points)")


def print_results(results: dict[str, Any], out: Path | None = None) -> None:
    """Print each stage's test metrics and the model sizes as a short table."""
    from rich.console import Console
    from rich.table import Table

    stages = results.get("stages", {})
    keys = sorted({k for m in stages.values() for k in m if not k.endswith("/loss")})
    table = Table(title=f"qat results: {results.get('name', '')}")
    table.add_column("model")
    for k in keys:
        table.add_column(k, justify="right")
    table.add_column("size MB", justify="right")
    size = results.get("size", {})
    for stage, metrics in stages.items():
        b = size.get("fp32_bytes") if stage == "fp32" else size.get("quantized_bytes")
        cells = [f"{metrics[k]:.4f}" if k in metrics else "" for k in keys]
        table.add_row(_stage_label(stage, results), *cells, f"{b / 2**20:.2f}" if b else "")
    console = Console()
    console.print(table)
    line = compare_line(results)
    if line:
        console.print(line)
    if size.get("fp32_bytes") and size.get("quantized_bytes"):
        ratio = size["quantized_bytes"] / size["fp32_bytes"]
        console.print(f"model size: {size['fp32_bytes'] / 2**20:.2f} MB float -> "
                      f"{size['quantized_bytes'] / 2**20:.2f} MB quantized ({ratio:.3f}x)")
    timing = results.get("timing") or {}
    if timing.get("step_time_ratio"):
        console.print(f"training step: {1e3 * timing['fp32_step_s']:.1f} ms float -> "
                      f"{1e3 * timing['quant_step_s']:.1f} ms quantized "
                      f"({timing['step_time_ratio']:.2f}x, medians)")
    if out is not None:
        console.print(f"run directory: {out}")
