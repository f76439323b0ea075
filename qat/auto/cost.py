"""What a format costs: multiply-accumulates per example and the bytes outside the allocation.

Bit-operations of a layer are its multiply-accumulates times the weight width times the width of
the activations it reads (``MACs * w * a``); the float model's are ``MACs * 32 * 32``. MACs are
counted with forward hooks over the calibration batches and averaged per example: Linear
``rows * in * out``, Conv1d ``outputs * in / groups * kernel``, LSTM ``tokens * directions *
sum over layers of 4H (in + H)``, MultiheadAttention its q / k / v projections (``out_proj`` is a
Linear of its own); embeddings are lookups (0 MACs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..quant.fake_quantizer import FakeQuantizer
from .layers import Layer

__all__ = ["count_macs", "fixed_bytes", "FLOAT_BITS"]

FLOAT_BITS = 32


def _rows(x: Any) -> int:
    if isinstance(x, PackedSequence):
        return int(x.data.shape[0])
    return int(x.numel() // x.shape[-1]) if isinstance(x, torch.Tensor) and x.dim() else 0


def _macs(module: nn.Module, args: tuple, out: Any) -> int:
    if isinstance(module, nn.Linear):
        y = out if isinstance(out, torch.Tensor) else None
        return 0 if y is None else int(y.numel()) * module.in_features
    if isinstance(module, nn.Conv1d):
        k = module.kernel_size[0]
        return int(out.numel()) * (module.in_channels // module.groups) * k
    if isinstance(module, nn.LSTM) and args:
        x = args[0]
        if isinstance(x, PackedSequence):
            tokens = int(x.data.shape[0])
        else:  # (B, T, I) / (T, B, I), or unbatched (T, I)
            tokens = int(x.shape[0] * x.shape[1]) if x.dim() == 3 else int(x.shape[0])
        dirs = 2 if module.bidirectional else 1
        h = module.hidden_size
        per = sum(4 * h * ((module.input_size if i == 0 else h * dirs) + h)
                  for i in range(module.num_layers))
        return tokens * dirs * per
    if isinstance(module, nn.MultiheadAttention) and len(args) >= 3:
        q, k, v = args[:3]
        e = module.embed_dim
        return _rows(q) * e * e + _rows(k) * module.kdim * e + _rows(v) * module.vdim * e
    return 0


@torch.no_grad()
def count_macs(model: nn.Module, run: Any, examples: int) -> dict[str, float]:
    """Multiply-accumulates per example of every Linear / Conv1d / LSTM / MultiheadAttention
    module (by name) while ``run()`` makes the model's forwards over ``examples`` examples."""
    totals: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear | nn.Conv1d | nn.LSTM | nn.MultiheadAttention):
            def hook(mod: nn.Module, args: tuple, out: Any, name: str = name) -> None:
                totals[name] = totals.get(name, 0) + _macs(mod, args, out)
            hooks.append(m.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return {k: v / max(examples, 1) for k, v in totals.items()}


def fixed_bytes(model: nn.Module, layers: list[Layer]) -> int:
    """Bytes of the parameters the allocation does not choose for, counted as
    :func:`qat.summary.model_size` counts them (float32; quantizer state left out)."""
    chosen = {(id(layer.module), p) for layer in layers for p, _ in layer.weights}
    total = 0
    for module in model.modules():
        if isinstance(module, FakeQuantizer):
            continue
        for name, p in module.named_parameters(recurse=False):
            if (id(module), name) not in chosen:
                total += p.numel() * p.element_size()
    return total
