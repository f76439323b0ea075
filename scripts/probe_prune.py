"""Which layers a trained model can lose: its validation metric with one group of layers
magnitude-pruned at a time, one-shot, no retraining (``qat.prune.prune_sensitivity``), on the
validation split only (choose what to exclude or prune less here; report on test after
training).

    python scripts/probe_prune.py outputs/stsb_minilm_fp32/seed42/checkpoints/best.ckpt
    python scripts/probe_prune.py <ckpt> --sparsities 0.5 0.8 --targets type:Linear --limit 512

Groups: the Linear / Conv1d / LSTM / attention layers that share a name once their indices are
replaced by ``*`` (every layer's query projection, every layer's FFN input, ...), then all of
them together (``all``: what ``prune.scope=layer`` does at that sparsity).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["type:Linear?", "type:Conv1d?", "type:LSTM?", "type:MultiheadAttention?"]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a float run's checkpoint (qat-train, e.g. best.ckpt)")
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7, 0.8])
    ap.add_argument("--targets", nargs="+", default=TARGETS, help="what may be pruned")
    ap.add_argument("--exclude", nargs="*", default=["*classifier?"],
                    help="left out of every group (default: the output head)")
    ap.add_argument("--limit", type=int, default=None, help="the first N validation batches")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import lightning.pytorch as pl

    from qat.evaluate import open_run
    from qat.prune.sensitivity import format_sensitivity, layer_groups, prune_sensitivity

    run = open_run(args.checkpoint)
    if not run.float_stage and str(run.cfg.quant.get("mode", "fp32")) != "fp32":
        print(f"{args.checkpoint}: a quantized run's checkpoint; probing it with its fake quant",
              file=sys.stderr)
    model = run.restore()
    run.dm.setup("fit")
    batches = list(run.dm.val_dataloader())[: args.limit]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=len(batches))
    key = f"val/{run.dm.main_metric}"

    def evaluate(_: torch.nn.Module) -> float:
        rows = trainer.validate(run.lit, dataloaders=run.dm.val_dataloader(), verbose=False)
        return float(next(v for r in rows for k, v in r.items() if k.endswith(key)))

    groups = layer_groups(model, args.targets, args.exclude)
    groups["all"] = [n for names in groups.values() for n in names]
    n = sum(len(b["labels"]) for b in batches)
    print(f"{args.checkpoint}: {len(groups) - 1} groups, {n} validation examples", flush=True)
    rows = prune_sensitivity(model, evaluate, groups, args.sparsities)
    print(format_sensitivity(rows, key))


if __name__ == "__main__":
    main()
