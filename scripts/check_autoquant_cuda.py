"""Device check: qat.autoquant and the sparse integer checkpoint on CUDA models against CPU.

For each toy model (TextCNN, BiLSTM, Transformer, BERT) and sensitivity method: time on CPU and
on the GPU, predicted bytes on both (they must agree: sizes count structural zeros), model_size
of the prepared model (at most the prediction), same choice, largest relative sensitivity
difference. Then integer checkpoints of pruned CUDA models: codes exact, outputs equal.
Prints ALL OK or FAILURES. Usage: ``PYTHONPATH=. python scripts/check_autoquant_cuda.py``.
"""

from __future__ import annotations

import copy
import io
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _to(bs: list[dict], d: torch.device | str) -> list[dict]:
    return [{k: v.to(d) for k, v in b.items()} for b in bs]


def check_autoquant(dev: torch.device) -> bool:
    from test_export import batches, build, synthetic, train

    import qat
    from qat.auto import autoquant
    from qat.summary import model_size

    ok = True
    for name in ("textcnn", "bilstm", "transformer", "bert"):
        try:
            m = build(name)
            train(m, 15)
            m.eval()
            data = batches(synthetic(128, 3), 32)
            for method, est in (("measured", "ggn"), ("hessian", "ggn"), ("hessian", "hvp")):
                res = {}
                for d in ("cpu", dev):
                    md = copy.deepcopy(m).to(d)
                    t = time.perf_counter()
                    cfg, rep = autoquant(md, _to(data, d), budget=0.2, method=method,
                                         estimator=est, calibration_batches=4,
                                         hutchinson_samples=8,
                                         act_bits=(8, 4) if name == "bilstm" else (8,))
                    res[str(d)] = (rep, model_size(qat.prepare(md, cfg)[0]),
                                   time.perf_counter() - t)
                (rc, sc, tc), (rg, sg, tg) = res["cpu"], res[str(dev)]
                same = [r.chosen for r in rc.rows] == [r.chosen for r in rg.rows]
                diff = max(abs(a.sensitivity[k] - b.sensitivity[k]) / max(abs(a.sensitivity[k]),
                                                                            1e-9)
                           for a, b in zip(rc.rows, rg.rows, strict=True) for k in rc.labels)
                print(f"{name:<12} {method:<9} {est}: cpu {tc:.1f} s, {dev.type} {tg:.1f} s; "
                      f"predicted {rc.predicted_bytes} / {rg.predicted_bytes} B; model_size "
                      f"{sc} / {sg} B; same choice {same}; max rel. sensitivity diff {diff:.1e}")
                ok &= sg <= rg.predicted_bytes and rc.predicted_bytes == rg.predicted_bytes
        except Exception:  # noqa: BLE001 - report and go on
            traceback.print_exc()
            ok = False
    return ok


def check_checkpoint(dev: torch.device) -> bool:
    from test_export import _prune, batches, build, inputs, synthetic

    import qat
    from qat.export import load_int_checkpoint, read_int_weights, save_int_checkpoint
    from qat.nn.base import weight_quantizers
    from qat.quant import freeze
    from qat.summary import model_size

    ok = True
    for scheme in (None, {"weight": {"bits": 4, "estimator": "lsq"}},
                   {"weight": {"bits": 2, "mode": "ternary", "estimator": "ste"}}):
        try:
            m = build("textcnn")
            _prune(m, 0.8)
            pm = qat.prepare(m, scheme)[0].to(dev).eval()
            with torch.no_grad():
                for b in _to(batches(synthetic(64, 2), 32), dev):
                    pm(**inputs(b))
            freeze(pm)
            buf = io.BytesIO()
            size = save_int_checkpoint(pm, buf)
            stored = read_int_weights(buf)
            exact = all(torch.equal(stored[f"{mn}.{p}"].dequantize().to(dev),
                                    q(getattr(mod, p)).detach())
                        for mn, mod, p, q in weight_quantizers(pm))
            loaded = load_int_checkpoint(buf, qat.prepare(build("textcnn"), scheme)[0]).to(dev)
            with torch.no_grad():
                same = all(torch.equal(pm(**inputs(b)), loaded(**inputs(b)))
                           for b in _to(batches(synthetic(64, 5), 32), dev))
            print(f"sparse checkpoint {scheme}: {size.int_bytes} B, codes exact {exact}, "
                  f"outputs equal {same}, model_size {model_size(pm)} B")
            ok &= exact and same
        except Exception:  # noqa: BLE001 - report and go on
            traceback.print_exc()
            ok = False
    return ok


def main() -> None:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print("device", dev, torch.__version__)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ok = check_autoquant(dev)
    ok &= check_checkpoint(dev)
    print("ALL OK" if ok else "FAILURES")


if __name__ == "__main__":
    main()
