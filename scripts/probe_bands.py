"""Where to put an embedding's frequency bands: validation accuracy of a trained float model with
its rarer rows dropped and its bands fake-quantized after training (no QAT), on the validation
split only (choose bounds here, report on test after QAT).

    python scripts/probe_bands.py outputs/20ng_textcnn_fp32/seed42/checkpoints/best.ckpt

Rows are kept by frequency rank (qat's vocabularies are most-frequent first) or, for
comparison, by L2 norm; kept rows are quantized per band (symmetric, one max-abs scale per band;
ternary: TWN's 0.7 mean |w| threshold).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_PLANS = (
    "float:50000", "float:30000", "float:20000", "float:10000", "norm:20000",
    "4:50000", "4:20000", "4:10000,2:25000", "4:10000,2:20000", "8:10000,4:25000",
)


def quantize_rows(w: Tensor, bits: int) -> Tensor:
    """``w`` fake-quantized with one scale: int ``bits`` (symmetric max-abs) or ternary (2)."""
    if bits >= 32:
        return w
    if bits == 2:
        delta = 0.7 * w.abs().mean()
        keep = (w.abs() > delta).to(w.dtype)
        alpha = (w.abs() * keep).sum() / keep.sum().clamp(min=1)
        return alpha * torch.sign(w) * keep
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().max().clamp(min=1e-12) / qmax
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


def apply_plan(table: Tensor, plan: str) -> Tensor:
    """``plan``: ``float:K`` (the K most frequent rows, float), ``norm:K`` (the K rows of largest
    norm, float) or ``b1:K1,b2:K2,...`` (rows [0, K1) at b1 bits, [K1, K2) at b2, ...; 2 =
    ternary); the other rows become zeros."""
    out = torch.zeros_like(table)
    head, _, first = plan.split(",")[0].partition(":")
    if head in ("float", "norm"):
        k = int(first)
        rows = torch.topk(table.norm(dim=1), k).indices if head == "norm" else torch.arange(k)
        out[rows] = table[rows]
        return out
    lo = 0
    for part in plan.split(","):
        bits, _, hi = part.partition(":")
        out[lo:int(hi)] = quantize_rows(table[lo:int(hi)], int(bits))
        lo = int(hi)
    return out


@torch.no_grad()
def accuracy(model: torch.nn.Module, batches: Sequence[dict[str, Tensor]]) -> float:
    right = seen = 0
    for b in batches:
        logits = model(**{k: v for k, v in b.items() if k not in ("labels", "idx")})
        right += int((logits.argmax(-1) == b["labels"]).sum())
        seen += len(b["labels"])
    return right / seen


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a float run's checkpoint (qat-train, e.g. best.ckpt)")
    ap.add_argument("--module", default="embedding", help="the embedding's module name")
    ap.add_argument("--plans", nargs="*", default=list(DEFAULT_PLANS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from qat.evaluate import open_run

    run = open_run(args.checkpoint)
    model = run.restore()
    run.dm.setup("fit")
    batches = list(run.dm.val_dataloader())
    emb = dict(model.named_modules())[args.module]
    table = emb.weight.detach().clone()
    print(f"{args.checkpoint}: {args.module} {tuple(table.shape)}, "
          f"{sum(len(b['labels']) for b in batches)} validation examples")
    for plan in args.plans:
        emb.weight.data.copy_(apply_plan(table, plan))
        print(f"  {plan:<22} validation accuracy {accuracy(model, batches):.4f}", flush=True)
    emb.weight.data.copy_(table)


if __name__ == "__main__":
    main()
