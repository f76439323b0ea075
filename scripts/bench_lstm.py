"""Training-step speed of QuantLSTM against float nn.LSTM (and Brevitas' QuantLSTM if installed).

    python scripts/bench_lstm.py            # batch 32, BiLSTM 128 -> 256, seq 128
    python scripts/bench_lstm.py --quick    # seq 32, fewer repeats

Forward + backward of the sum of the outputs, models run in turn within every repeat (so that load
from other processes hits all of them alike); the table shows the median wall-clock step time and
its ratio to float nn.LSTM measured in the same run, and the same for the process CPU time. On a
machine shared with other jobs, 2-thread wall times swing wildly (OpenMP barriers wait for
descheduled threads; PyTorch's fused LSTM kernel suffers most): run ``--threads 1`` as well and
read the CPU-time ratio, which load hardly moves.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from qat.nn.config import W8A8, LayerQuantConfig, default_act_spec
from qat.nn.lstm import QuantLSTM
from qat.quant import QuantSpec

__all__ = ["main", "build_models"]

ACT = default_act_spec()
# W8A8: 8-bit per-channel weights, 8-bit input; ALL8 adds the output and every cell slot
ALL8 = LayerQuantConfig(output=ACT, slots={
    "hidden": QuantSpec(bits=8),
    "gates": ACT,
    "sigmoid": QuantSpec(bits=8, signed=False),  # [0, 1]
    "tanh": QuantSpec(bits=8),
    "cell": ACT,
})


def _brevitas(i: int, h: int) -> nn.Module | str:
    try:
        from brevitas.nn import QuantLSTM as BrevitasLSTM
    except Exception as e:  # noqa: BLE001
        return f"brevitas not importable ({type(e).__name__}: {e}); pip install brevitas"
    try:
        return BrevitasLSTM(i, h, bidirectional=True, batch_first=True)  # all 8-bit by default
    except Exception as e:  # noqa: BLE001
        return f"brevitas QuantLSTM failed to build ({type(e).__name__}: {e})"


def build_models(i: int, h: int, brevitas: bool = True) -> dict[str, nn.Module | str]:
    """The contenders; a string says why one is missing."""
    ref = nn.LSTM(i, h, bidirectional=True, batch_first=True)
    models: dict[str, nn.Module | str] = {
        "nn.LSTM (float)": ref,
        "QuantLSTM fast W8A8": QuantLSTM.from_float(ref, W8A8),
        "QuantLSTM full, all slots 8-bit": QuantLSTM.from_float(ref, ALL8),
    }
    auto = QuantLSTM.from_float(ref, ALL8)
    auto.engine = "autograd"
    models["  (same, autograd engine)"] = auto
    if brevitas:
        models["Brevitas QuantLSTM (8-bit)"] = _brevitas(i, h)
    return models


def _step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        out = model(x)[0]
        out = getattr(out, "value", out)  # a Brevitas QuantTensor
        out.sum().backward()
        model.zero_grad(set_to_none=True)
    return run


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="seq 32, 1 warm-up, 3 repeats")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-brevitas", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, i, h = 32, 128, 256
    seq = args.seq or (32 if args.quick else 128)
    repeats = args.repeats or (3 if args.quick else 7)
    warmup = 1 if args.quick else 2
    models = build_models(i, h, brevitas=not args.no_brevitas)
    x = torch.randn(batch, seq, i, requires_grad=True)
    steps: dict[str, Callable[[], None]] = {}
    for name, m in models.items():
        if isinstance(m, str):
            print(f"skipping {name}: {m}")
            continue
        m.train()
        try:
            for _ in range(warmup):  # also calibrates the QuantLSTM slots
                _step(m, x)()
        except Exception as e:  # noqa: BLE001
            print(f"skipping {name}: it failed to run ({type(e).__name__}: {e})")
            continue
        steps[name] = _step(m, x)
    wall: dict[str, list[float]] = {n: [] for n in steps}
    cpu: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(repeats):
        for name, run in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {n: statistics.median(v) * 1e3 for n, v in wall.items()}
    med_cpu = {n: statistics.median(v) * 1e3 for n, v in cpu.items()}
    base, base_cpu = med["nn.LSTM (float)"], med_cpu["nn.LSTM (float)"]
    print(f"\nforward+backward, batch {batch}, BiLSTM {i}->{h}, seq {seq}, "
          f"{args.threads} threads, median of {repeats}")
    print(f"{'model':<34} {'wall ms':>9} {'x float':>8} {'cpu ms':>9} {'x float':>8}")
    for n, ms in med.items():
        print(f"{n:<34} {ms:>9.1f} {ms / base:>8.2f} {med_cpu[n]:>9.1f} "
              f"{med_cpu[n] / base_cpu:>8.2f}")
    return med


if __name__ == "__main__":
    main()
