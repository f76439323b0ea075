"""Cost of magnitude pruning on a MiniLM-L6-sized BERT (random weights, no download).

Measures the time of one mask update (``compute_masks``) per scope / structure, and the
overhead of the in-place masks on a training step (forward pre-hooks + gradient hooks +
``apply_masks`` after the optimizer step) against the same step without masks.

    python scripts/bench_prune.py --device cpu --batch 8 --seq 128 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from qat.prune import apply_masks, compute_masks, remove_masks, sparsity_report, total_sparsity


def _model(device: str) -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                     num_attention_heads=12, intermediate_size=1536, attn_implementation="eager")
    return BertModel(cfg).to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str, repeat: int) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs after one warm-up."""
    fn()
    _sync(device)
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = args.device
    model = _model(dev)
    n = sum(p.numel() for p in model.encoder.parameters())
    print(f"model: MiniLM-L6-sized BERT, encoder {n / 1e6:.1f}M parameters, device {dev}, "
          f"threads {torch.get_num_threads()}")

    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    print("\nmask update (compute_masks), median of 3:")
    cases = [("unstructured", "layer", ["encoder"]),
             ("unstructured", "global", ["encoder"]),
             ("rows", "layer", ["encoder"]),
             ("heads", "layer", ["type:BertAttention"]),
             ("heads", "global", ["type:BertAttention"])]
    for structure, scope, targets in cases:
        sec = _time(lambda s=structure, c=scope, t=targets: compute_masks(
            model, t, args.sparsity, scope=c, structure=s), dev, 3)
        sp = total_sparsity(sparsity_report(model))
        print(f"  {structure:<12} {scope:<6} {sec * 1e3:9.1f} ms  (achieved {sp:.4f})")
        remove_masks(model)
        model.load_state_dict(dense_state)  # next case starts dense again

    ids = torch.randint(0, 30522, (args.batch, args.seq), device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        model(input_ids=ids).last_hidden_state.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        apply_masks(model)

    dense = _time(step, dev, args.steps)
    compute_masks(model, ["encoder"], args.sparsity)
    masked = _time(step, dev, args.steps)
    print(f"\ntraining step (batch {args.batch} x {args.seq}, AdamW), median of {args.steps}:")
    print(f"  dense  {dense * 1e3:9.1f} ms")
    print(f"  masked {masked * 1e3:9.1f} ms  (overhead {100 * (masked / dense - 1):+.1f}%)")


if __name__ == "__main__":
    main()
