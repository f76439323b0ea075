"""Benchmark of the exported models: checkpoint size and CPU latency / throughput.

For each model (TextCNN, Transformer d=256 x 2 layers, MiniLM, BiLSTM): prepare W8A8 (8-bit
per-channel weights, 8-bit activations) and W4A8, calibrate on random batches, then report

- size: integer checkpoint / float checkpoint (``torch.save`` of the float state_dict);
- latency (batch 1) and throughput (batch 32), sequence length 128, of PyTorch float,
  onnxruntime float, onnxruntime QDQ of the W8A8 model (uint8 weight codes, the default: u8u8
  kernels; int8 codes: u8s8 kernels) and the PyTorch int8 path (fbgemm, static activations:
  ``torch_int8`` exact, ``torch_int8_fast`` one GEMM per layer, ``torch_int8_w4`` the W4A8
  model), for the BiLSTM also ``ort_qdq_lstm_int8`` (the W8A8 export with ``lstm='int8'``: its
  LSTM as onnxruntime's DynamicQuantizeLSTM on the integer weights), as ratios against PyTorch
  float and onnxruntime float; 2 intra-op threads everywhere,
  idle threads sleep (``OMP_WAIT_POLICY=PASSIVE``, onnxruntime ``allow_spinning=0``): spinning
  threads are very slow on a shared CPU.

Usage: ``python scripts/bench_export.py [--quick] [--models textcnn,transformer,minilm,bilstm]
[--json results/bench_export.json]``. Timings on a shared machine are noisy: compare ratios.

``--agreement``: instead, train each model briefly on real data (20 Newsgroups for TextCNN,
Transformer and BiLSTM with the recipes' hyperparameters; SST-2 for MiniLM), QAT (``--scheme``
w8a8 as in the recipes, or w4a8), freeze, then compare every export format's predictions with the
fake-quant model's on the whole test set (20NG) / dev set (SST-2).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning on a shared CPU
import torch  # noqa: E402
from torch import nn  # noqa: E402

import qat  # noqa: E402
from qat.export import checkpoint_size, export_onnx, make_session, to_int8  # noqa: E402
from qat.quant import freeze  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SEQ = 128
W8A8 = {"weight": {"bits": 8, "granularity": "channel", "axis": 0},
        "activation": {"bits": 8, "symmetric": False, "signed": False, "observer": "ema"}}
W4A8 = {"weight": {"bits": 4, "granularity": "channel", "axis": 0, "estimator": "lsq"},
        "activation": W8A8["activation"]}


def build(name: str) -> tuple[nn.Module, int, bool]:
    """(float model, vocabulary size, uses token_type_ids)."""
    from qat import models

    torch.manual_seed(0)
    if name == "textcnn":
        return models.TextCNN(30000, 20, embed_dim=128, num_filters=100), 30000, False
    if name == "transformer":
        return models.TransformerClassifier(30000, 20, d_model=256, nhead=4, num_layers=2,
                                            dim_feedforward=1024, max_len=512), 30000, True
    if name == "bilstm":
        return models.BiLSTMClassifier(30000, 20, embed_dim=128, hidden_size=128), 30000, False
    if name == "minilm":
        m = models.PretrainedClassifier(num_labels=2, name_or_path="minilm")
        return m, m.model.config.vocab_size, True
    raise ValueError(f"unknown model {name!r}: allowed textcnn, transformer, minilm, bilstm")


def batch(vocab: int, b: int, types: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, SEQ), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if types:
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


def quantized(model: nn.Module, config: dict, vocab: int, types: bool, n: int) -> nn.Module:
    pm = qat.prepare(model, config)[0].eval()
    with torch.no_grad():
        for i in range(n):
            pm(**batch(vocab, 8, types, seed=100 + i))
    return freeze(pm)


def timer(fn: Callable[[], Any], reps: int, budget: float) -> float:
    """Median seconds per call (at least 3 calls, at most ``reps``, about ``budget`` s)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < budget):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def float_onnx(model: nn.Module, example: dict[str, torch.Tensor]) -> bytes:
    from qat.export.onnx import _KwargsWrapper

    buf = io.BytesIO()
    axes = {k: {0: "batch", 1: "sequence"} for k in example}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_KwargsWrapper(model.eval(), list(example)), tuple(example.values()),
                          buf, dynamo=False, opset_version=17, input_names=list(example),
                          output_names=["logits"], dynamic_axes=axes)
    return buf.getvalue()


def run_model(name: str, quick: bool, threads: int) -> dict[str, Any]:
    fm, vocab, types = build(name)
    fm.eval()
    calib = 2 if quick else 8
    row: dict[str, Any] = {"model": name}
    m8 = quantized(fm, W8A8, vocab, types, calib)
    m4 = quantized(fm, W4A8, vocab, types, calib)
    row["size_int8"] = checkpoint_size(m8).ratio
    row["size_int4"] = checkpoint_size(m4).ratio
    keys = ["input_ids", "attention_mask"] + (["token_type_ids"] if types else [])
    example = {k: v for k, v in batch(vocab, 2, types).items() if k in keys}
    sessions = {"ort_float": make_session(float_onnx(fm, example), threads, spinning=False)}
    for wd in ("int8", "uint8"):
        buf = io.BytesIO()
        proto = export_onnx(m8, example, buf, weight_dtype=wd)
        sessions[f"ort_qdq_{wd}"] = make_session(proto, threads, spinning=False)
    if name == "bilstm":  # the LSTM as onnxruntime's DynamicQuantizeLSTM (integer weights)
        proto = export_onnx(m8, example, io.BytesIO(), lstm="int8")
        sessions["ort_qdq_lstm_int8"] = make_session(proto, threads, spinning=False)
    torch_models = {"torch_float": fm, "torch_int8": to_int8(m8, "static"),
                    "torch_int8_fast": to_int8(m8, "fast"), "torch_int8_w4": to_int8(m4)}
    reps, budget = (5, 3.0) if quick else (30, 15.0)
    for bsz, tag in ((1, "lat"), (32, "thr")):
        inputs = {k: v for k, v in batch(vocab, bsz, types, seed=7).items() if k in keys}
        feeds = {k: v.numpy() for k, v in inputs.items()}
        for key, m in torch_models.items():
            with torch.inference_mode():
                row[f"{tag}_{key}"] = timer(lambda m=m, x=inputs: m(**x), reps, budget)
        for key, s in sessions.items():
            row[f"{tag}_{key}"] = timer(lambda s=s, f=feeds: s.run(None, f), reps, budget)
    return row


# named as conf/quant/ names them
SCHEMES = {"w8a8_per_tensor": {"weight": {"bits": 8, "granularity": "tensor"},
                               "activation": W8A8["activation"]},
           "w8a8_per_channel": W8A8, "w4a8_per_channel_lsq": W4A8}


def _data(name: str, data_dir: str | None, limit: int) -> Any:
    from qat.data import GlueDataModule, NewsgroupsDataModule

    if name == "minilm":
        dm = GlueDataModule("sst2", data_dir, batch_size=32, max_length=128, tokenizer="minilm",
                            limit_train=limit)
    else:
        dm = NewsgroupsDataModule(data_dir, batch_size=32, max_length=400, min_freq=2,
                                  max_vocab=30000, limit_train=limit)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _model(name: str, dm: Any) -> nn.Module:
    from qat import models

    v, c = dm.vocab_size, dm.num_labels
    if name == "textcnn":
        return models.TextCNN(v, c, dm.pad_id, embed_dim=128, num_filters=100)
    if name == "transformer":
        return models.TransformerClassifier(v, c, dm.pad_id, d_model=128, nhead=4,
                                            dim_feedforward=256, pooling="mean")
    if name == "bilstm":
        return models.BiLSTMClassifier(v, c, dm.pad_id, embed_dim=128, hidden_size=128)
    return models.PretrainedClassifier(num_labels=c, name_or_path="minilm")


def _train(model: nn.Module, loader: Any, steps: int, lr: float) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    done = 0
    while done < steps:
        for b in loader:
            kw = {k: v for k, v in b.items() if k not in ("labels", "idx")}
            loss = nn.functional.cross_entropy(model(**kw), b["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break


def _one_by_one(predict: Callable[[dict], Any]) -> Callable[[dict], Any]:
    import numpy as np

    def run(batch: dict) -> Any:
        n = len(batch["input_ids"])
        return np.concatenate([predict({k: v[i:i + 1] for k, v in batch.items()})
                               for i in range(n)])

    return run


def agreement_run(name: str, scheme: str, steps: int, data_dir: str | None) -> list[dict]:
    """Train briefly, QAT, then compare each export format with the fake-quant model."""
    from qat.export import (
        compare_predictions,
        load_int_checkpoint,
        ort_predict,
        save_int_checkpoint,
        torch_predict,
    )

    dm = _data(name, data_dir, limit=steps * 32)
    torch.manual_seed(0)
    fm = _model(name, dm)
    lr = 3e-5 if name == "minilm" else 1e-3
    _train(fm, dm.train_dataloader(), steps, lr)
    if scheme == "recipe":  # as measured for the README: per-tensor W8 for the 20NG models
        scheme = "w8a8_per_channel" if name == "minilm" else "w8a8_per_tensor"
    pm = qat.prepare(fm, SCHEMES[scheme])[0]
    _train(pm, dm.train_dataloader(), max(steps // 2, 1), lr / 2)
    freeze(pm.eval())
    test = [{k: v for k, v in b.items() if k != "idx"} for b in dm.test_dataloader()]
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in test[0]]
    ref = torch_predict(pm, keys)
    buf = io.BytesIO()
    save_int_checkpoint(pm, buf)
    candidates = {"int_checkpoint": torch_predict(load_int_checkpoint(buf, copy.deepcopy(pm)),
                                                  keys)}
    example = {k: test[0][k][:2] for k in keys}
    for wd in ("int8", "uint8"):
        proto = export_onnx(pm, example, io.BytesIO(), weight_dtype=wd)
        candidates[f"ort_qdq_{wd}"] = ort_predict(make_session(proto, 2, spinning=False))
    if name == "bilstm":
        proto = export_onnx(pm, example, io.BytesIO(), lstm="int8")
        candidates["ort_qdq_lstm_int8"] = ort_predict(make_session(proto, 2, spinning=False))
    for mode in ("static", "fast", "dynamic"):
        candidates[f"torch_int8_{mode}"] = torch_predict(to_int8(pm, mode), keys)
    # the float noise floor: the fake-quant model itself, one example at a time (other GEMM
    # blocking, so other float rounding, which flips a few codes of the later quantizers)
    candidates["fake_quant_batch1"] = _one_by_one(ref)
    rows = []
    for key, pred in candidates.items():
        a = compare_predictions(ref, pred, test)
        rows.append({"model": name, "scheme": scheme, "format": key, "n": a.n,
                     "agree": a.agree, "acc_fq": a.acc_reference, "acc_export": a.acc_candidate,
                     "ok": a.ok()})
        print(f"{name} {scheme} {key}: {a}", flush=True)
    return rows


FORMATS = ("torch_float", "ort_float", "torch_int8", "torch_int8_fast", "torch_int8_w4",
           "ort_qdq_uint8", "ort_qdq_int8", "ort_qdq_lstm_int8")


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: sizes per model, then latency / throughput per model and format."""
    lines = ["| model | int8 checkpoint / float | int4 checkpoint / float |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['size_int8']:.3f}x | {r['size_int4']:.3f}x |" for r in rows]
    lines += ["", "| model | format | batch-1 latency ms | vs torch fp32 | vs ort fp32 | "
              "batch-32 examples/s | vs torch fp32 | vs ort fp32 |", "|---" * 8 + "|"]
    for r in rows:
        for f in (f for f in FORMATS if f"lat_{f}" in r):  # ort_qdq_lstm_int8: BiLSTM only
            lat, thr = r[f"lat_{f}"], r[f"thr_{f}"]
            lines.append(
                f"| {r['model']} | {f} | {lat * 1e3:.1f} | {r['lat_torch_float'] / lat:.2f}x | "
                f"{r['lat_ort_float'] / lat:.2f}x | {32 / thr:.0f} | "
                f"{r['thr_torch_float'] / thr:.2f}x | {r['thr_ort_float'] / thr:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer calibration batches and reps")
    p.add_argument("--models", default="textcnn,transformer,minilm,bilstm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--agreement", action="store_true", help="prediction agreement on real data")
    p.add_argument("--scheme", default="recipe", choices=["recipe", *sorted(SCHEMES)])
    p.add_argument("--steps", type=int, default=150, help="float training steps (agreement)")
    p.add_argument("--data-dir", default=os.environ.get("QAT_DATA_DIR", "../shared/data"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    if args.agreement:
        for name in args.models.split(","):
            rows += agreement_run(name.strip(), args.scheme, args.steps, args.data_dir)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return
    for name in args.models.split(","):
        t = time.perf_counter()
        rows.append(run_model(name.strip(), args.quick, args.threads))
        print(f"{name}: done in {time.perf_counter() - t:.0f} s", flush=True)
    print(table(rows))
    print("sizes: integer checkpoint / float checkpoint; speed: baseline time / exported time "
          "(>1 is faster); batch 1 = latency, batch 32 = throughput, sequence length 128")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
