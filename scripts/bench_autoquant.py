"""Time qat.autoquant's sensitivity on a real model and calibration set; compare both methods.

Prints, for each method, the wall time of sensitivity + allocation (and its parts), the report
table, and the Spearman rank correlation between the two methods' scores over every
(group, candidate). The model is the pretrained one (MiniLM) or a freshly initialised one
(TextCNN / BiLSTM, optionally loaded from ``--ckpt``, e.g. a float run's best.ckpt).

Usage::

    QAT_DATA_DIR=../shared/data python scripts/bench_autoquant.py --model minilm --task sst2 \\
        --examples 64 --batch-size 32 --budget 0.25
    QAT_DATA_DIR=../shared/data python scripts/bench_autoquant.py --model textcnn \\
        --task 20newsgroups --ckpt outputs/20ng_textcnn_fp32/<run>/checkpoints/best.ckpt
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def _data(task: str, model: str, examples: int, batch_size: int):  # noqa: ANN202
    from qat.data import GlueDataModule, NewsgroupsDataModule

    data_dir = os.environ.get("QAT_DATA_DIR")
    tok = "minilm" if model == "minilm" else "word"
    if task == "20newsgroups":
        dm = NewsgroupsDataModule(data_dir=data_dir, batch_size=batch_size, tokenizer=tok,
                                  limit_train=max(examples, 512), max_length=400)
    else:
        dm = GlueDataModule(task=task, data_dir=data_dir, batch_size=batch_size, tokenizer=tok,
                            limit_train=max(examples, 512), max_length=128)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _model(name: str, dm, ckpt: str | None) -> torch.nn.Module:  # noqa: ANN001
    from qat import models

    if name == "minilm":
        m = models.PretrainedClassifier(num_labels=dm.num_labels)
    elif name == "textcnn":
        m = models.TextCNN(dm.vocab_size, dm.num_labels, pad_id=dm.pad_id)
    elif name == "bilstm":
        m = models.BiLSTMClassifier(dm.vocab_size, dm.num_labels, pad_id=dm.pad_id)
    else:
        raise SystemExit(f"--model {name}: allowed minilm, textcnn, bilstm")
    if ckpt:
        from qat.config_check import check_checkpoint

        m.load_state_dict(check_checkpoint(ckpt, "--ckpt", m, raw_ok=True), strict=False)
    return m.eval()


def _spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().float()
    rb = torch.tensor(b).argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--methods", default="measured,hessian")
    ap.add_argument("--samples", type=int, default=16, help="Hutchinson samples per batch")
    ap.add_argument("--estimator", default="ggn", help="hessian method: ggn or hvp")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from qat.auto import autoquant

    torch.manual_seed(0)
    dm = _data(args.task, args.model, args.examples, args.batch_size)
    model = _model(args.model, dm, args.ckpt)
    batches = -(-args.examples // args.batch_size)
    print(f"{args.model} on {args.task}: {args.examples} calibration examples in {batches} "
          f"batches of {args.batch_size}, {torch.get_num_threads()} threads")
    scores = {}
    for method in args.methods.split(","):
        t = time.perf_counter()
        _, report = autoquant(model, dm.train_dataloader(), budget=args.budget, method=method,
                              calibration_batches=batches, hutchinson_samples=args.samples,
                              estimator=args.estimator)
        wall = time.perf_counter() - t
        print(f"\n== {method}: {wall:.1f} s wall (sensitivity "
              f"{report.seconds['sensitivity']:.1f} s)\n{report}")
        scores[method] = [r.sensitivity[c] for r in report.rows for c in report.labels]
    if len(scores) == 2:
        a, b = scores.values()
        print(f"\nSpearman rank correlation of the two methods' scores: {_spearman(a, b):.3f}")


if __name__ == "__main__":
    main()
