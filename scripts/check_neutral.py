"""Check that a change to numerics code left every number as it was.

Runs the same small ``qat-train`` jobs (every model family, the quantization schemes and the
features: LSQ + KD, ternary, pruning, PTQ, the LSTM full path, autoquant) once with the code of
``--base`` (a git worktree) and once with the working tree, one thread, deterministic, and
compares the test metrics, the sizes and every tensor of the checkpoints bit for bit. When all
agree it prints the :data:`qat.provenance.NEUTRAL` entries (part: fingerprint before -> after)
that let the runs made before count as made by the code now::

    python scripts/check_neutral.py --base HEAD~1            # all cases
    python scripts/check_neutral.py --base HEAD~1 --only textcnn_w8a8

Exit status 0 when every case agrees, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = ["data.limit_train=96", "data.limit_eval=48", "data.batch_size=16",
        "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2", "trainer.max_epochs=2", "baseline_epochs=1",
        "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "init_from=null",
        "trainer.deterministic=true"]
NG = ["data=ng20", "data.max_length=64", "data.max_vocab=2000"]
CASES: dict[str, list[str]] = {
    "textcnn_w8a8": ["recipe=20ng_textcnn_w8a8", *NG, "model=textcnn"],
    "textcnn_w4a8_lsq_kd": ["recipe=20ng_textcnn_w8a8", *NG, "model=textcnn",
                            "quant=w4a8_per_channel_lsq", "distill=kd"],
    "textcnn_ternary_prune": ["recipe=20ng_textcnn_w8a8", *NG, "model=textcnn",
                              "quant=w2a8_ternary_per_channel", "prune=gradual"],
    "textcnn_ptq_w4a8": ["recipe=20ng_textcnn_w8a8", *NG, "model=textcnn",
                         "quant=ptq_w4a8_per_channel_mse"],
    "textcnn_auto": ["recipe=20ng_textcnn_w8a8", *NG, "model=textcnn",
                     "quant=auto_per_channel_lsq", "quant.budget=0.2",
                     "quant.calibration_batches=1"],
    "bilstm_full": ["recipe=20ng_bilstm_w8a8", *NG, "model=bilstm",
                    "quant=w8a8_per_channel_lstm_full"],
    "transformer_w8a8": ["recipe=20ng_transformer_w8a8", *NG, "model=transformer"],
    "embbag_w8a8": ["recipe=20ng_embbag_w8a8", "data.max_vocab=2000"],
    "minilm_w8a8": ["recipe=stsb_minilm_w8a8", "data.max_length=32"],
    "minilm_mean_w4a8_kd": ["recipe=mrpc_minilm_w8a8", "data.max_length=32", "model.pooling=mean",
                            "quant=w4a8_per_channel_lsq", "distill=kd"],
}


def _run(tree: Path, name: str, overrides: list[str], out: Path) -> Path:
    env = {**os.environ, "QAT_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(tree), "QAT_FULL_ERROR": "1"}
    cmd = [sys.executable, "-c", "from qat.cli import train; train()", *overrides, *TINY,
           f"run_id={name}"]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{name} failed in {tree}:\n{proc.stderr[-3000:]}")
    found = sorted(out.glob(f"*/{name}/results.json"))
    if not found:
        raise RuntimeError(f"{name}: no results.json under {out}")
    return found[0].parent


def _tensors(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the run's checkpoints (``best.ckpt``, and ``last.ckpt`` with the
    optimizer's state; a PTQ run has none), by checkpoint and name."""
    out = {}
    for path in sorted((run / "checkpoints").glob("*.ckpt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        out.update({f"{path.name}:{k}": v for k, v in ckpt["state_dict"].items()
                    if isinstance(v, torch.Tensor)})
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit: same dtype, shape and bytes (a NaN equals the same NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if torch.equal(a, b):
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                       b.contiguous().reshape(-1).view(torch.uint8))


def compare(a: Path, b: Path) -> str | None:
    """None when the two runs agree bit for bit, else the first difference."""
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (a, b))
    for key in ("stages", "size"):
        if ra.get(key) != rb.get(key):
            return f"{key}: {ra.get(key)} != {rb.get(key)}"
    ta, tb = _tensors(a), _tensors(b)
    if ta.keys() != tb.keys():
        return f"state_dict keys differ: {sorted(set(ta) ^ set(tb))[:5]}"
    bad = [k for k in ta if not _same(ta[k], tb[k])]
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        return f"tensor {', '.join(bad[:3])}{more} differs"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the commit before the change")
    ap.add_argument("--only", nargs="*", choices=sorted(CASES), help="these cases only")
    args = ap.parse_args(argv)
    from qat.provenance import numerics_parts

    names = args.only or list(CASES)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="qat-neutral-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            for name in names:
                runs = [_run(tree, name, CASES[name], Path(tmp) / label)
                        for tree, label in ((base, "before"), (ROOT, "after"))]
                diff = compare(*runs)
                failed += diff is not None
                print(f"{name:24s} {'same' if diff is None else 'DIFFERENT: ' + diff}",
                      flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT,
                           capture_output=True)
    before, after = numerics_parts(args.base), numerics_parts()
    changed = {k: (before[k], after[k]) for k in after if before.get(k) != after[k]}
    if failed:
        print(f"{failed} of {len(names)} cases differ: the change is not numerics-neutral")
        return 1
    print(f"all {len(names)} cases agree bit for bit; NEUTRAL entries (qat/provenance.py):")
    for part, (old, new) in changed.items():
        print(f'    "{part}": {{"{old}": "{new}"}},')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
