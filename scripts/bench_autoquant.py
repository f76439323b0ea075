"""Time qat.autoquant's sensitivity on a real model and calibration set; compare both methods.

Prints, for each method, the wall time of sensitivity + allocation (and its parts), the report
table, and the Spearman rank correlation between the two methods' scores over every
(group, candidate). The model is the pretrained one (MiniLM), a freshly initialised one
(TextCNN / BiLSTM), or the trained model of a qat-train checkpoint (``--ckpt``, with its run's
data). ``--compare N``: post-training accuracy and KL of the allocation against uniform int4 on
N validation batches (a cheap proxy; QAT results come from qat-train runs).

Usage::

    QAT_DATA_DIR=../shared/data python scripts/bench_autoquant.py --model minilm --task sst2 \\
        --examples 64 --batch-size 32 --budget 0.25
    QAT_DATA_DIR=../shared/data python scripts/bench_autoquant.py --budget 0.135 --compare 20 \\
        --ckpt outputs/20ng_textcnn_fp32/teacher/checkpoints/best.ckpt
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


def _model(name: str, dm) -> torch.nn.Module:  # noqa: ANN001
    from qat import models

    if name == "minilm":
        return models.PretrainedClassifier(num_labels=dm.num_labels).eval()
    if name == "textcnn":
        return models.TextCNN(dm.vocab_size, dm.num_labels, pad_id=dm.pad_id).eval()
    if name == "bilstm":
        return models.BiLSTMClassifier(dm.vocab_size, dm.num_labels, pad_id=dm.pad_id).eval()
    raise SystemExit(f"--model {name}: allowed minilm, textcnn, bilstm")


@torch.no_grad()
def _ptq_eval(model: torch.nn.Module, config: dict, calib: list, val) -> tuple[float, float]:  # noqa: ANN001
    """Accuracy and KL from the float model on ``val`` of ``model`` prepared with ``config`` and
    calibrated on ``calib`` (post-training: a cheap proxy of how the formats compare)."""
    import qat
    from qat.lit.ptq import calibrate

    qm = qat.prepare(model, config)[0].eval()
    calibrate(qm, calib, len(calib))
    hits = n = 0
    kl = 0.0
    for b in val:
        x = {k: v for k, v in b.items() if k not in ("labels", "idx")}
        ref, out = model(**x).float(), qm(**x).float()
        hits += int((out.argmax(-1) == b["labels"]).sum())
        n += len(b["labels"])
        kl += float(torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1),
                                               log_target=True, reduction="sum"))
    return hits / n, kl / n


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
    ap.add_argument("--compare", type=int, default=0, metavar="N",
                    help="also compare the allocation with uniform int4 after PTQ on N "
                    "validation batches")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from qat.auto import autoquant

    torch.manual_seed(0)
    if args.ckpt:  # a qat-train checkpoint: its run's data (vocabulary) and trained weights
        from qat.evaluate import open_run

        parts = open_run(args.ckpt)
        dm, model = parts.dm, parts.restore()
        args.model = parts.cfg.model._target_.split(".")[-1]
        args.task = dm.task_info.name
    else:
        dm = _data(args.task, args.model, args.examples, args.batch_size)
        model = _model(args.model, dm)
    batches = -(-args.examples // args.batch_size)
    print(f"{args.model} on {args.task}: {args.examples} calibration examples in {batches} "
          f"batches of {args.batch_size}, {torch.get_num_threads()} threads")
    scores = {}
    for method in args.methods.split(","):
        t = time.perf_counter()
        config, report = autoquant(model, dm.train_dataloader(), budget=args.budget,
                                   method=method,
                                   calibration_batches=batches,
                                   hutchinson_samples=args.samples, estimator=args.estimator)
        wall = time.perf_counter() - t
        print(f"\n== {method}: {wall:.1f} s wall (sensitivity "
              f"{report.seconds['sensitivity']:.1f} s)\n{report}")
        scores[method] = [r.sensitivity[c] for r in report.rows for c in report.labels]
        if args.compare:
            from itertools import islice

            calib = list(islice(dm.train_dataloader(), batches))
            val = list(islice(dm.val_dataloader(), args.compare))
            uni = {"weight": {"bits": 4, "estimator": "lsq"}}
            for name, cfg in (("autoquant", config), ("uniform int4", uni)):
                acc, kl = _ptq_eval(model, cfg, calib, val)
                import qat
                from qat.summary import model_size

                size = model_size(qat.prepare(model, cfg)[0]) / report.float_bytes
                print(f"PTQ {name:<12}: size {size:.4f}x, val accuracy {acc:.4f}, "
                      f"KL from float {kl:.4g}")
    if len(scores) == 2:
        a, b = scores.values()
        print(f"\nSpearman rank correlation of the two methods' scores: {_spearman(a, b):.3f}")


if __name__ == "__main__":
    main()
