"""qat-export: the integer checkpoint, ONNX (QDQ) and int8 models of a qat-train checkpoint."""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["main", "export_checkpoint", "format_record"]

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _test_loaders(dm: Any) -> list[Any]:
    loaders = dm.test_dataloader()
    return loaders if isinstance(loaders, list) else [loaders]


def _split_size(dm: Any) -> int | None:
    """Examples in the run's test split (None when a loader has no length)."""
    try:
        return sum(len(loader.dataset) for loader in _test_loaders(dm))
    except TypeError:
        return None


def _batches(dm: Any, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` test examples (all with ``limit`` <= 0): model inputs and labels."""
    loaders = _test_loaders(dm)

    def rows() -> Iterator[dict[str, Any]]:
        for loader in loaders:
            yield from loader

    out, seen = [], 0
    for batch in rows():
        take = len(batch["input_ids"]) if limit <= 0 else min(limit - seen,
                                                               len(batch["input_ids"]))
        keep = {k: v[:take] for k, v in batch.items() if k in (*INPUT_KEYS, "labels")}
        out.append(keep)
        seen += take
        if 0 < limit <= seen:
            break
    if not out:
        raise ValueError("the run's test set is empty: nothing to compare on")
    return out


def _cached(predict: Any) -> Any:
    """``predict`` computed once per batch (the reference is compared with every format)."""
    memo: dict[int, Any] = {}

    def run(batch: Any) -> Any:
        if id(batch) not in memo:
            memo[id(batch)] = predict(batch)
        return memo[id(batch)]

    return run


def _row(agreement: Any, regression: bool, path: Path | None) -> dict[str, Any]:
    """One export format's record (regression: no agreement, only the largest difference)."""
    return {"file": str(path) if path else None, "bytes": path.stat().st_size if path else None,
            "n": agreement.n, "agreement": None if regression else agreement.agree,
            "acc_fake_quant": agreement.acc_reference, "acc_export": agreement.acc_candidate,
            "max_abs_diff": agreement.max_abs_diff}


def export_checkpoint(ckpt: str | Path, out: str | Path | None = None, onnx: bool = False,
                      int8: bool = False, limit: int = 0) -> dict[str, Any]:
    """Export a qat-train checkpoint into ``out`` (default ``<run>/export``): the integer
    checkpoint (always, round trip checked), ONNX QDQ and int8 PyTorch on request, each compared
    with the fake-quant model on the run's whole test split (its first ``limit`` examples with
    ``limit`` > 0); returns the record also written to ``out/export.json``."""
    import torch

    from ..evaluate import is_float_stage, open_run, run_config_for
    from ..quant import disable_observers
    from ..surgery import prepare
    from ..train import build_model
    from . import (
        compare_predictions,
        export_onnx,
        load_int_checkpoint,
        make_session,
        ort_predict,
        save_int_checkpoint,
        to_int8,
        torch_predict,
    )

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt}: no such file")
    if is_float_stage(ckpt):
        raise ValueError(f"checkpoint {ckpt} is of the float stage: nothing to export as "
                         "integers; pass the run's checkpoints/best.ckpt")
    run_config_for(ckpt)  # not a qat run: a clear error before any data is read
    run = open_run(ckpt)
    if not run.quant or run.quant.config is None:
        raise ValueError(f"checkpoint {ckpt} is of a float-only run (quant.mode="
                         f"{getattr(run.quant, 'mode', None)!r}): nothing to export as integers")
    model = run.restore()
    disable_observers(model)  # as in Trainer.test: the reference must not move its scales
    regression = bool(run.dm.is_regression)
    batches = _batches(run.dm, limit)
    keys = [k for k in INPUT_KEYS if k in batches[0]]
    reference = _cached(torch_predict(model, keys))
    out = Path(out) if out is not None else run.run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)

    def fail(what: str, err: Exception) -> ValueError:
        return ValueError(f"checkpoint {ckpt}: {what} failed: {err}")

    int_path = out / "model.int.pt"
    try:
        float_model = build_model(run.cfg, run.dm)
        # an autoquant run with embedding bands (qat.auto.bands): the size compares with the
        # whole float model, dropped rows included, and the skeleton is banded (in place: the
        # float model has been measured)
        bands = getattr(run.quant, "embedding_bands", None)
        size = save_int_checkpoint(model, int_path, float_model=float_model if bands else None)
        shell = run.quant.banded(float_model) if bands else float_model
        skeleton = prepare(shell, run.quant.config, inplace=True)[0]
        restored = load_int_checkpoint(int_path, skeleton)
    except (ValueError, RuntimeError, KeyError) as err:
        raise fail("the integer checkpoint", err) from err
    record: dict[str, Any] = {
        "checkpoint": str(ckpt), "out": str(out), "examples": sum(len(b[keys[0]]) for b in batches),
        "split_examples": _split_size(run.dm),
        "task": "regression" if regression else "classification",
        "sizes": {"int_bytes": size.int_bytes, "float_bytes": size.float_bytes,
                  "ratio": size.ratio, "lightning_ckpt_bytes": ckpt.stat().st_size},
        "formats": {},
    }
    formats = record["formats"]
    formats["int_checkpoint"] = _row(compare_predictions(
        reference, torch_predict(restored, keys), batches), regression, int_path)
    if onnx:
        onnx_path = out / "model.onnx"
        example = {k: batches[0][k][:2] for k in keys}
        try:
            export_onnx(model, example, onnx_path)
            session = make_session(onnx_path, threads=torch.get_num_threads(), spinning=False)
        except (ValueError, RuntimeError, TypeError, NotImplementedError) as err:
            raise fail("the ONNX export (unsupported model?)", err) from err
        formats["onnx_qdq"] = _row(compare_predictions(reference, ort_predict(session), batches),
                                   regression, onnx_path)
    if int8:
        try:
            q8 = to_int8(copy.deepcopy(model), "static", inplace=True)
        except (ValueError, RuntimeError) as err:
            raise fail("the int8 conversion", err) from err
        formats["torch_int8"] = _row(compare_predictions(
            reference, torch_predict(q8, keys), batches), regression, None)
    (out / "export.json").write_text(json.dumps(record, indent=2))
    return record


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def format_record(record: dict[str, Any]) -> str:
    """The human table of an export record."""
    s = record["sizes"]
    n, total = record["examples"], record.get("split_examples")
    if total is not None and n < total:
        seen = f"the first {n:,} of {total:,} test examples (--limit {n}: not the whole split)"
    else:
        seen = f"all {n:,} test examples"
    lines = [f"qat-export {record['checkpoint']} -> {record['out']}",
             f"compared on {seen}; reference: the fake-quant model",
             f"size: integer checkpoint {s['int_bytes']:,} B vs float {s['float_bytes']:,} B "
             f"({s['ratio']:.3f}x; Lightning checkpoint with optimizer state "
             f"{s['lightning_ckpt_bytes']:,} B)", ""]
    head = f"{'format':<16}{'file':<14}{'agreement':>10}{'acc fq':>9}{'acc export':>11}"
    lines += [head + f"{'max |diff|':>12}", "-" * (len(head) + 12)]
    for name, r in record["formats"].items():
        file = Path(r["file"]).name if r["file"] else "-"
        lines.append(f"{name:<16}{file:<14}{_pct(r['agreement']):>10}"
                     f"{_pct(r['acc_fake_quant']):>9}{_pct(r['acc_export']):>11}"
                     f"{r['max_abs_diff']:>12.3g}")
    if record["task"] == "regression":
        lines.append("regression task: no class predictions to agree on; compare max |diff|")
    lines.append(f"record: {Path(record['out']) / 'export.json'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``qat-export <run>/checkpoints/best.ckpt [--out DIR] [--onnx] [--int8] [--limit N]``."""
    import os

    ap = argparse.ArgumentParser(prog="qat-export", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a checkpoint written by qat-train (e.g. best.ckpt)")
    ap.add_argument("--out", metavar="DIR", help="output folder (default: <run>/export)")
    ap.add_argument("--onnx", action="store_true", help="also export ONNX QDQ (model.onnx) and "
                    "check it in onnxruntime")
    ap.add_argument("--int8", action="store_true", help="also check the PyTorch int8 model")
    ap.add_argument("--limit", type=int, default=0, metavar="N",
                    help="compare on the first N test examples only (default: the whole split)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..errors import reported
    from ..quiet import silence_known_noise

    silence_known_noise()

    with reported(ckpt=args.checkpoint):
        record = export_checkpoint(args.checkpoint, args.out, args.onnx, args.int8, args.limit)
    print(format_record(record))
