"""Forward+backward time of qat's fake quant on weight-sized tensors, as ratios in one run.

Baselines measured in the same process: (a) a float pass-through (y = x * 1), (b) torch.ao's
FakeQuantize with the same setting (its learnable variant for LSQ), and (c) qat's quantizer with
PyTorch's fused fake-quant kernels (``torch.fake_quantize_per_*_affine``) in place of qat's
plain-op autograd function: the measurement behind qat's choice of the plain ops; and (d) qat's
quantizer in tensor ops (``QAT_CPU_KERNEL=0``) against its one-pass CPU kernel (the default).

With the observer on, the batch always fits its own range, so qat skips clamp and clipping mask
(``grid_holds``); the ``+clip`` rows freeze every quantizer on half the range first, so values
clip and qat takes the full path (clamp, mask, masked gradient), like the fused kernels.

    python scripts/bench_fake_quant.py [--repeats 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable
from unittest import mock

import torch

from qat.quant import FakeQuantizer, QuantSpec
from qat.quant import functional as F

warnings.filterwarnings("ignore")


def step_time(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int) -> float:
    """Median seconds of forward + backward of sum(fn(x) * g)."""
    g = torch.randn_like(x)
    for _ in range(3):
        x.grad = None
        (fn(x) * g).sum().backward()
    times = []
    for _ in range(repeats):
        x.grad = None
        t0 = time.perf_counter()
        (fn(x) * g).sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ops_time(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int) -> float:
    """:func:`step_time` of ``fn`` with fake quant in tensor ops instead of the one-pass CPU
    kernel (the switch set once, outside the timed calls)."""
    with mock.patch.dict(os.environ, {"QAT_CPU_KERNEL": "0"}):
        return step_time(fn, x, repeats)


def fused_kernels(spec: QuantSpec, shape: tuple[int, ...],
                  fq: FakeQuantizer | None = None) -> Callable:
    """qat's quantizer (observer included) with PyTorch's fused fake-quant kernels."""
    fq = fq if fq is not None else FakeQuantizer(spec, shape)

    def fn(x: torch.Tensor) -> torch.Tensor:
        fq.observe(x)
        return F.fake_quantize_affine_fused(x, fq.scale, fq.zero_point, spec)

    return fn


def frozen_on_half(fq: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """``fq`` after observing 0.5 * x, observer off: about half of x's range clips."""
    with torch.no_grad():
        fq(x.detach() * 0.5)
    if isinstance(fq, FakeQuantizer):
        return fq.enable_observer(False)
    fq.disable_observer()  # torch.ao FakeQuantize
    return fq


def ao_fake_quant(kind: str) -> Callable | None:
    from torch.ao.quantization import (
        FakeQuantize,
        MinMaxObserver,
        MovingAverageMinMaxObserver,
        PerChannelMinMaxObserver,
    )
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    if kind == "tensor":
        return FakeQuantize(observer=MinMaxObserver, quant_min=-128, quant_max=127,
                            dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    if kind == "channel":
        return FakeQuantize(observer=PerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                            dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    if kind == "act":
        return FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                            dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                            averaging_constant=0.01)
    if kind == "lsq":
        fq = _LearnableFakeQuantize(observer=MinMaxObserver, quant_min=-128, quant_max=127,
                                    dtype=torch.qint8, qscheme=torch.per_tensor_symmetric,
                                    use_grad_scaling=True)
        fq.enable_param_learning()
        return fq
    return None  # torch.ao has no per-group fake quant


SETTINGS = {
    "per-tensor": (QuantSpec(bits=8), "tensor"),
    "per-channel": (QuantSpec(bits=8, granularity="channel"), "channel"),
    "per-group128": (QuantSpec(bits=8, granularity="group", group_size=128), "group"),
    "lsq": (QuantSpec(bits=8, estimator="lsq"), "lsq"),
}
# activations: 8-bit asymmetric unsigned, EMA observer, per tensor
ACT = {"act-asym-ema": (QuantSpec(bits=8, symmetric=False, signed=False, observer="ema"),
                        "act")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}; "
          "forward+backward, observer on; ratios: time / baseline time")
    head = (f"{'shape':<10} {'setting':<17} {'float ms':>8} {'qat ms':>8} {'qat/float':>9} "
            f"{'fused ms':>8} {'qat/fused':>9} {'ao ms':>8} {'qat/ao':>7} {'ops ms':>8} "
            f"{'qat/ops':>7}")
    print(head)
    print("-" * len(head))
    cases = [((1024, 1024), SETTINGS), ((4096, 1024), SETTINGS), ((12800, 128), ACT),
             ((4096, 256), ACT)]  # activations: (batch 32 x 400 tokens, 128), (32 x 128, 256)
    for shape, settings in cases:
        x = torch.randn(*shape, requires_grad=True)
        t_float = step_time(lambda t: t * 1.0, x, args.repeats)
        for name, (spec, kind) in settings.items():
            t_ours = step_time(FakeQuantizer(spec, shape), x, args.repeats)
            t_ops = ops_time(FakeQuantizer(spec, shape), x, args.repeats)
            fixed = spec.estimator in ("ste", "clipped_ste")
            t_fused = (step_time(fused_kernels(spec, shape), x, args.repeats) if fixed
                       else float("nan"))
            ao = ao_fake_quant(kind)
            t_ao = step_time(ao, x, args.repeats) if ao is not None else float("nan")
            row(shape, name, t_float, t_ours, t_fused, t_ao, t_ops)
            if not fixed:
                continue
            ours = frozen_on_half(FakeQuantizer(spec, shape), x)
            t_ours = step_time(ours, x, args.repeats)
            t_ops = ops_time(ours, x, args.repeats)
            t_fused = step_time(fused_kernels(spec, shape, ours), x, args.repeats)
            ao = ao_fake_quant(kind)
            t_ao = step_time(frozen_on_half(ao, x), x, args.repeats) if ao is not None else nan
            row(shape, name + "+clip", t_float, t_ours, t_fused, t_ao, t_ops)


nan = float("nan")


def row(shape: tuple[int, ...], name: str, t_float: float, t_ours: float, t_fused: float,
        t_ao: float, t_ops: float) -> None:
    print(f"{shape[0]}x{shape[1]:<5} {name:<17} {t_float * 1e3:>8.2f} "
          f"{t_ours * 1e3:>8.2f} {t_ours / t_float:>9.2f} {t_fused * 1e3:>8.2f} "
          f"{t_ours / t_fused:>9.2f} {t_ao * 1e3:>8.2f} {t_ours / t_ao:>7.2f} "
          f"{t_ops * 1e3:>8.2f} {t_ours / t_ops:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
