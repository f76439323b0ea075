"""Step time of QAT inside real runs: a recipe's training step, float stage vs quantized stage.

Each case composes a recipe exactly as ``qat-train`` does and trains its LightningModule with
the recipe's own Trainer, callbacks and logger on batches from its DataModule (bucketed lengths,
padding masks): the float stage (the float model, ``quant=fp32``), the quantized stage (the
recipe's ``QuantizationCallback``) and, as a peer, torch.ao eager ``prepare_qat`` on the same
float model (no quantized attention matmuls, no LSTM: it has none). Steps are timed by the same
:class:`qat.callbacks.StepTimer` that writes ``timing.step_time_ratio`` into ``results.json``
(batch arrival to the end of its optimizer step). Variants run in short fits that alternate
(round-robin, a different order and a different batch order each round: every variant sees the
same batches), so load drift hits all alike; the figures are ratios of medians over all rounds.

    python scripts/bench_recipes.py                 # full: every case, 5 rounds of 20 steps
    python scripts/bench_recipes.py --short         # 2 rounds of 6 steps, smaller data: minutes
    python scripts/bench_recipes.py --only textcnn minilm --profile   # + torch.profiler tables
    python scripts/bench_recipes.py --kernel-peer   # + QAT with fake quant in tensor ops
    python scripts/bench_recipes.py --check-run outputs/20ng_textcnn_w8a8/<run_id>
    python scripts/bench_recipes.py --json bench.json   # every figure and the machine load
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from qat.callbacks.timing import sync_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    """One row: a quantized recipe and the overrides that shape it."""

    name: str
    recipe: str
    overrides: list[str] = field(default_factory=list)
    target: float | None = None  # qat step / float step goal
    ao: bool = True  # torch.ao prepare_qat applies (no LSTM)
    attention: bool = False  # also time qat with attention matmuls left in float (as torch.ao)


def _quant_group(*words: str) -> str | None:
    """The conf/quant group whose name holds every word (names may change between versions)."""
    names = sorted(p.stem for p in (ROOT / "conf" / "quant").glob("*.yaml"))
    hits = [n for n in names if all(w in n for w in words)]
    return min(hits, key=len) if hits else None


def cases() -> list[Case]:
    full = _quant_group("lstm", "full")
    out = [
        Case("textcnn", "20ng_textcnn_w8a8", target=1.15),
        Case("transformer", "20ng_transformer_w8a8", target=1.15, attention=True),
        Case("minilm", "rte_minilm_w8a8", target=1.20, attention=True),
        Case("bilstm_fast", "20ng_bilstm_w8a8", target=1.10, ao=False),
    ]
    if full is not None:
        out.append(Case("bilstm_full", "20ng_bilstm_w8a8", [f"quant={full}"], 2.0, ao=False))
    return out


# ---- composing and building, as qat-train does ------------------------------------------------
def compose(recipe: str, overrides: list[str], out: Path):
    from qat.configs import compose_train

    return compose_train([f"recipe={recipe}", *overrides], out)


def _float_checkpoint(cfg, init: str | None) -> str | None:
    """``--init``: a path, ``auto`` (the float recipe's run under outputs/, if any) or None."""
    if init in (None, "none"):
        return None
    if init != "auto":
        return init
    ref = str(cfg.get("init_from") or "")
    if not ref.startswith("recipe:"):
        return None
    base = Path(os.environ.get("QAT_OUTPUT_DIR", ROOT / "outputs")) / ref[len("recipe:"):]
    found = sorted(base.glob(f"seed{cfg.seed}*/checkpoints/best.ckpt"))
    return str(found[0]) if found else None


def ao_prepare(model: nn.Module) -> nn.Module | None:
    """torch.ao eager QAT (fbgemm): Linear / Conv1d weights and outputs, Embedding weights;
    None where eager torch.ao has no QAT module (LSTM)."""
    from torch.ao import quantization as tq

    if any(isinstance(m, nn.LSTM) for m in model.modules()):
        return None
    m = copy.deepcopy(model).train()
    m.qconfig = tq.get_default_qat_qconfig("fbgemm")
    for sub in m.modules():
        if isinstance(sub, nn.Embedding):
            sub.qconfig = tq.default_embedding_qat_qconfig
        elif isinstance(sub, nn.MultiheadAttention | nn.LayerNorm):
            sub.qconfig = None  # eager torch.ao swaps neither (nor any attention matmul)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tq.prepare_qat(m, inplace=False)


class _Loop(L.Callback):
    """Wall time from one batch's start to the next one's (data, logging, everything)."""

    def __init__(self, warmup: int, clock: str = "wall") -> None:
        self.warmup, self.times, self._t, self._n = warmup, [], None, 0
        self._now = time.process_time if clock == "cpu" else time.perf_counter

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync_device(pl_module)
        now = self._now()
        if self._t is not None and self._n > self.warmup:
            self.times.append(now - self._t)
        self._t, self._n = now, self._n + 1

    def on_train_end(self, trainer, pl_module) -> None:
        self._t, self._n = None, 0


@dataclass
class Variant:
    """One way of training the case's model: its LightningModule and the callbacks it adds."""

    name: str
    lit: Any
    extra: list[L.Callback]
    steps: list[float] = field(default_factory=list)
    loops: list[float] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)  # per-round medians
    compile_s: float | None = None
    env: dict[str, str] = field(default_factory=dict)  # set during its fits only


def build_variants(cfg, ckpt: str | None, which: set[str], compile_mode: str | None,
                   attention_off: bool = False,
                   kernel_peer: bool = False) -> tuple[Any, dict[str, Variant]]:
    from hydra.utils import instantiate

    from qat.callbacks import QuantizationCallback
    from qat.train import build_datamodule, build_model, build_module

    dm = build_datamodule(cfg)
    L.seed_everything(cfg.seed, workers=True)
    model = build_model(cfg, dm)
    if ckpt:
        from qat.config_check import check_checkpoint

        model.load_state_dict(check_checkpoint(ckpt, "--init", model, raw_ok=True,
                                               complete=False), strict=False)
    variants: dict[str, Variant] = {}
    if "float" in which:
        variants["float"] = Variant("float", build_module(cfg, copy.deepcopy(model), dm),
                                    [QuantizationCallback(mode="fp32")])
    if "qat" in which:
        variants["qat"] = Variant("qat", build_module(cfg, copy.deepcopy(model), dm),
                                  [instantiate(cfg.quant)])
    if attention_off and "qat" in which:  # the coverage of torch.ao's eager prepare_qat
        variants["qat-attn"] = Variant("qat-attn", build_module(cfg, copy.deepcopy(model), dm),
                                       [instantiate(cfg.quant, attention=False)])
    if kernel_peer and "qat" in which:  # the same QAT with fake quant in tensor ops
        variants["qat-ops"] = Variant("qat-ops", build_module(cfg, copy.deepcopy(model), dm),
                                      [instantiate(cfg.quant)], env={"QAT_CPU_KERNEL": "0"})
    if compile_mode and "qat" in which:
        from qat.callbacks import CompileModel

        mode = None if compile_mode == "default" else compile_mode
        variants["qat+compile"] = Variant(
            "qat+compile", build_module(cfg, copy.deepcopy(model), dm),
            [instantiate(cfg.quant), CompileModel(mode=mode)])
    if "ao" in which:
        ao = ao_prepare(model)
        if ao is not None:
            variants["torch.ao"] = Variant("torch.ao", build_module(cfg, ao, dm),
                                           [QuantizationCallback(mode="fp32")])
    return dm, variants


def fit_block(cfg, out: Path, v: Variant, dm, steps: int, warmup: int, clock: str = "wall",
              profiler: Any = None) -> None:
    """Train ``v`` for ``warmup + steps`` optimizer steps with the recipe's Trainer."""
    from qat.callbacks import StepTimer
    from qat.lit import QATModule
    from qat.train import build_trainer

    timer, loop = StepTimer(warmup=warmup, clock=clock), _Loop(warmup, clock)
    extra = [*v.extra, timer, loop]
    if profiler is not None:
        extra.append(profiler)
    monitor = f"{QATModule.prefixes('val', dm.val_names)[0]}/{dm.main_metric}"
    trainer = build_trainer(cfg, out / v.name, extra, monitor, max_steps=warmup + steps,
                            max_epochs=-1, limit_val_batches=0, enable_model_summary=False,
                            num_sanity_val_steps=0)
    with mock.patch.dict(os.environ, v.env):
        trainer.fit(v.lit, datamodule=dm)
    comp = next((c for c in v.extra if hasattr(c, "compile_s")), None)
    if comp is not None and comp.compile_s is not None:  # compiled once, recompiles added
        v.compile_s = (v.compile_s or 0.0) + comp.compile_s
    v.steps += timer.times
    v.loops += loop.times
    if timer.times:
        v.rounds.append(statistics.median(timer.times))


# ---- profiling -----------------------------------------------------------------------------------
@contextlib.contextmanager
def labelled() -> Iterator[None]:
    """Label quantizer work and callback hooks in profiler traces (only while profiling)."""
    from torch.profiler import record_function

    from qat.quant import fake_quantizer, observer

    patched: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, attr: str, label: str) -> None:
        fn = getattr(owner, attr)

        def inner(*a: Any, **k: Any) -> Any:
            with record_function(label):
                return fn(*a, **k)

        patched.append((owner, attr, fn))
        setattr(owner, attr, inner)

    wrap(observer.Observer, "forward", "qat::observer")
    wrap(fake_quantizer.FakeQuantizer, "_sync_from_observer", "qat::qparams")
    wrap(fake_quantizer.FakeQuantizer, "_quantize", "qat::fake_quant")
    wrap(fake_quantizer.FakeQuantizer, "_record_clipping", "qat::clip_tracking")
    wrap(fake_quantizer.FakeQuantizer, "forward", "qat::quantizer")
    try:
        yield
    finally:
        for owner, attr, fn in reversed(patched):
            setattr(owner, attr, fn)


HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
         "on_before_optimizer_step", "on_before_zero_grad")


class _Profile(L.Callback):
    """torch.profiler over ``steps`` steps after the warm-up of one fit; callback hooks and the
    LightningModule's training_step are labelled (``cb::<Callback>.<hook>``, ``lit::...``)."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.n, self.prof = warmup, steps, 0, None
        self._undo: list[tuple[Any, str]] = []

    def setup(self, trainer, pl_module, stage) -> None:
        from torch.profiler import record_function

        def wrap(obj: Any, attr: str, label: str) -> None:
            fn = getattr(obj, attr)

            def inner(*a: Any, **k: Any) -> Any:
                with record_function(label):
                    return fn(*a, **k)

            setattr(obj, attr, inner)
            self._undo.append((obj, attr))

        for cb in trainer.callbacks:
            if cb is self:
                continue
            for hook in HOOKS:
                if getattr(type(cb), hook) is not getattr(L.Callback, hook):  # overridden
                    wrap(cb, hook, f"cb::{type(cb).__name__}.{hook}")
        wrap(pl_module, "training_step", "lit::training_step")

    def teardown(self, trainer, pl_module, stage) -> None:
        for obj, attr in self._undo:
            obj.__dict__.pop(attr, None)
        self._undo = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.n == self.warmup:
            from torch.profiler import profile

            self.prof = profile()
            self.prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.n += 1
        if self.prof is not None and self.n == self.warmup + self.steps:
            self.prof.__exit__(None, None, None)

    def per_step(self) -> dict[str, tuple[float, float, int]]:
        """Op or label -> (self ms, total ms, calls) per step."""
        if self.prof is None:
            return {}
        n = self.steps
        return {e.key: (e.self_cpu_time_total / 1e3 / n, e.cpu_time_total / 1e3 / n,
                        round(e.count / n)) for e in self.prof.key_averages()}


def profile_report(case: str, profiles: dict[str, _Profile], rows: int) -> str:
    """Where the quantized step's extra time goes: qat / callback / Lightning labels, then the
    ops whose self time grew most over the float step."""
    q = profiles.get("qat")
    f = profiles.get("float")
    if q is None or f is None:
        return ""
    qs, fs = q.per_step(), f.per_step()
    lines = [f"--- profile {case}: per step, {q.steps} steps each (CPU ms as the profiler "
             "sees it) ---"]
    labels = sorted((k for k in qs if k.startswith(("qat::", "cb::", "lit::"))),
                    key=lambda k: -qs[k][1])
    for k in labels:
        base = fs.get(k.replace("QuantizationCallback", "QuantizationCallback"), (0, 0, 0))
        extra = f"  (float {base[1]:.2f})" if k.startswith(("cb::", "lit::")) and base[1] else ""
        lines.append(f"  {k:<58} total {qs[k][1]:9.2f}  calls {qs[k][2]:4d}{extra}")
    ops = [k for k in set(qs) | set(fs) if not k.startswith(("qat::", "cb::", "lit::"))]
    diff = sorted(ops, key=lambda k: -(qs.get(k, (0,))[0] - fs.get(k, (0,))[0]))
    lines.append(f"  {'op (self time)':<40} {'qat':>9} {'float':>9} {'diff':>9} {'calls':>11}")
    for k in diff[:rows]:
        a, b = qs.get(k, (0, 0, 0)), fs.get(k, (0, 0, 0))
        lines.append(f"  {k[:40]:<40} {a[0]:9.2f} {b[0]:9.2f} {a[0] - b[0]:+9.2f} "
                     f"{a[2]:5d}/{b[2]:<5d}")
    tq = sum(v[0] for k, v in qs.items() if not k.startswith(("qat::", "cb::", "lit::")))
    tf = sum(v[0] for k, v in fs.items() if not k.startswith(("qat::", "cb::", "lit::")))
    lines.append(f"  {'all ops':<40} {tq:9.2f} {tf:9.2f} {tq - tf:+9.2f}")
    return "\n".join(lines)


# ---- the runs of record -----------------------------------------------------------------------
def check_run(run_dir: Path) -> dict[str, Any]:
    """``timing`` of a run's results.json, with the float run's own timing it was paired with."""
    res = json.loads((run_dir / "results.json").read_text())
    timing = res.get("timing") or {}
    out = {"run": str(run_dir), "name": res.get("name"), **timing}
    fr = (res.get("float_run") or {}).get("run_dir")
    if fr and (Path(fr) / "results.json").is_file():
        out["float_run"] = fr
    return out


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f}/{five:.2f}"


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def run_case(case: Case, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    data = ["data.limit_train=1600"] if args.short else []
    # as the runs of record are launched (scripts/sweep.py): no progress bar
    overrides = ["init_from=null", "trainer.enable_progress_bar=false", *data, *case.overrides,
                 *args.override]
    cfg = compose(case.recipe, overrides, tmp / case.name)
    ckpt = _float_checkpoint(cfg, args.init)
    which = {"float", "qat"} | ({"ao"} if case.ao and not args.no_ao else set())
    if "ao" in which and "16" in str(cfg.trainer.get("precision", "")):
        # torch.fused_moving_avg_obs_fake_quant: "expected scalar type BFloat16 but found Float"
        print(f"  {case.name}: torch.ao peer left out: its fake quant takes no 16-bit "
              f"(autocast) activations", flush=True)
        which.discard("ao")
    load0 = _load()
    t0 = time.perf_counter()
    dm, variants = build_variants(cfg, ckpt, which, args.compile,
                                  case.attention and "ao" in which, args.kernel_peer)
    build_s = time.perf_counter() - t0
    order = list(variants)
    profiles: dict[str, _Profile] = {}
    for r in range(args.rounds):
        dm.seed = int(cfg.seed) + r  # a new batch order each round, the same for every variant
        names = order[r % len(order):] + order[: r % len(order)]  # rotate who goes first
        for name in names:
            prof = None
            if args.profile and r == args.rounds - 1 and name in ("float", "qat"):
                prof = profiles[name] = _Profile(args.warmup, min(args.steps, 10))
            ctx = labelled() if prof is not None else contextlib.nullcontext()
            with ctx:
                fit_block(cfg, tmp / case.name, variants[name], dm, args.steps, args.warmup,
                          args.clock, prof)
        print(f"  {case.name}: round {r + 1}/{args.rounds} done (load {_load()})", flush=True)
    med = {k: _median(v.steps) for k, v in variants.items()}
    loop = {k: _median(v.loops) for k, v in variants.items()}
    f = med.get("float")
    row: dict[str, Any] = {
        "case": case.name, "recipe": case.recipe, "overrides": overrides, "init": ckpt,
        "steps_per_variant": {k: len(v.steps) for k, v in variants.items()},
        "median_step_s": med, "median_loop_s": loop,
        "ratio": {k: (m / f if f and m else None) for k, m in med.items()},
        "loop_ratio": {k: (m / loop["float"] if loop.get("float") and m else None)
                       for k, m in loop.items()},
        "round_ratios": {k: [q / p for q, p in zip(v.rounds, variants["float"].rounds,
                                                   strict=False)]
                         for k, v in variants.items() if k != "float"},
        "target": case.target, "load_before": load0, "load_after": _load(),
        "build_s": build_s,
        "compile_s": {k: v.compile_s for k, v in variants.items() if v.compile_s is not None},
    }
    if med.get("qat") and med.get("torch.ao"):
        row["qat_over_ao"] = med["qat"] / med["torch.ao"]
        # what qat / torch.ao would be if fake quant cost nothing (a QAT step = the float step)
        row["float_over_ao"] = med["float"] / med["torch.ao"]
    if med.get("qat") and med.get("qat-ops"):  # the kernel's share of the QAT step
        row["kernel_over_ops"] = med["qat"] / med["qat-ops"]
    if med.get("qat-attn") and med.get("torch.ao"):  # the same layers quantized as torch.ao
        row["qat_attn_off_over_ao"] = med["qat-attn"] / med["torch.ao"]
    if profiles:
        print(profile_report(case.name, profiles, args.profile_rows), flush=True)
    del dm, variants
    return row


def _fmt(x: float | None, unit: str = "x") -> str:
    return "n/a" if x is None else f"{x:.2f}{unit}"


def _met(x: float | None, target: float | None) -> str:
    if x is None or target is None:
        return "n/a"
    return "yes" if x <= target else f"no (+{100 * (x / target - 1):.0f}%)"


def print_table(rows: list[dict[str, Any]], clock: str) -> None:
    print(f"\nin-run step ({clock} clock; StepTimer: batch arrival to the end of its optimizer "
          "step), medians over all rounds; ratios against the float step of the same run;\n"
          "rounds: qat / float per round; loop: batch start to next batch start (data, "
          "logging, everything); load: 1-min/5-min load average before -> after;\n"
          "float/ao: the qat/ao of a QAT step that cost no more than the float step (above 0.9, "
          "the 0.9 goal needs QAT faster than float)")
    head = (f"{'case':<12} {'float ms':>9} {'qat ms':>8} {'qat':>6} {'target':>6} "
            f"{'met':>9} {'loop':>6} {'torch.ao':>8} {'qat/ao':>7} {'met 0.9':>9} "
            f"{'float/ao':>8} {'attn off/ao':>11} {'rounds':<16} {'load':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        med, ratio = r["median_step_s"], r["ratio"]
        q = ratio.get("qat")
        rr = ",".join(f"{x:.2f}" for x in r["round_ratios"].get("qat", []))
        print(f"{r['case']:<12} {1e3 * (med['float'] or 0):>9.1f} "
              f"{1e3 * (med.get('qat') or 0):>8.1f} {_fmt(q):>6} {_fmt(r['target']):>6} "
              f"{_met(q, r['target']):>9} {_fmt(r['loop_ratio'].get('qat')):>6} "
              f"{_fmt(ratio.get('torch.ao')):>8} {_fmt(r.get('qat_over_ao')):>7} "
              f"{_met(r.get('qat_over_ao'), 0.9 if r.get('qat_over_ao') else None):>9} "
              f"{_fmt(r.get('float_over_ao')):>8} "
              f"{_fmt(r.get('qat_attn_off_over_ao')):>11} {rr:<16} "
              f"{r['load_before']:>5}->{r['load_after']:<5}")
        if "qat-ops" in ratio:
            ops_ao = (med["qat-ops"] / med["torch.ao"]) if med.get("torch.ao") else None
            print(f"{'  tensor ops':<12} {'':>9} {1e3 * med['qat-ops']:>8.1f} "
                  f"{_fmt(ratio['qat-ops']):>6}  (fake quant in tensor ops, QAT_CPU_KERNEL=0; "
                  f"qat/ao {_fmt(ops_ao)}; one-pass kernel / tensor ops "
                  f"{_fmt(r.get('kernel_over_ops'))})")
        if "qat+compile" in ratio:
            print(f"{'  compiled':<12} {'':>9} {1e3 * (med['qat+compile'] or 0):>8.1f} "
                  f"{_fmt(ratio['qat+compile']):>6}  (torch.compile of the qat model; "
                  f"{r['compile_s'].get('qat+compile', 0):.0f} s compiling)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", action="store_true",
                    help="2 rounds of 6 steps (after 3 warm-up), 1600 training examples")
    ap.add_argument("--only", nargs="*", default=None,
                    help="cases: " + " ".join(c.name for c in cases()))
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per fit")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps at each fit start")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time per step (steadier on a shared machine; with "
                         "several threads it also counts their waiting)")
    ap.add_argument("--init", default="auto",
                    help="float weights: auto (the float recipe's run under outputs/ if "
                         "present), none, or a checkpoint path")
    ap.add_argument("--no-ao", action="store_true", help="leave out the torch.ao peer")
    ap.add_argument("--compile", nargs="?", const="default", default=None,
                    help="also time the quantized stage under torch.compile (mode)")
    ap.add_argument("--kernel-peer", action="store_true",
                    help="also time QAT with fake quant in tensor ops (QAT_CPU_KERNEL=0)")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler table of the float and qat steps (last round)")
    ap.add_argument("--profile-rows", type=int, default=20)
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides")
    ap.add_argument("--check-run", nargs="*", default=[], type=Path,
                    help="run folders whose results.json timing to print beside")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (2 if args.short else 5)
    args.steps = args.steps or (6 if args.short else 20)
    args.warmup = args.warmup if args.warmup is not None else 3
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = [c for c in cases() if args.only is None or c.name in args.only]
    if args.only and len(chosen) != len(args.only):
        known = [c.name for c in cases()]
        print(f"--only: unknown case in {args.only}: allowed {known}", file=sys.stderr)
        return 2
    busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    if busy and torch.get_num_threads() > 1 and "OMP_WAIT_POLICY" not in os.environ:
        print(f"note: load {_load()} on {os.cpu_count()} CPUs with {torch.get_num_threads()} "
              "threads: OpenMP threads spin while they wait for a descheduled peer, so every "
              "parallel op can cost a time slice and ratios follow the op count, not the work; "
              "compare with --threads 1, --clock cpu or OMP_WAIT_POLICY=PASSIVE", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_recipes_") as tmp:
        for case in chosen:
            print(f"{case.name}: recipe={case.recipe} {' '.join(case.overrides)}", flush=True)
            rows.append(run_case(case, args, Path(tmp)))
    print_table(rows, args.clock)
    from qat.provenance import provenance

    runs = [check_run(p) for p in args.check_run]
    for r in runs:
        print(f"results.json {r['run']}: fp32 {_fmt(r.get('fp32_step_s'), ' s')}, quant "
              f"{_fmt(r.get('quant_step_s'), ' s')}, step_time_ratio "
              f"{_fmt(r.get('step_time_ratio'))}")
    info = {"machine": platform.machine(), "cpu": provenance()["hardware"]["cpu"],
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "clock": args.clock,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
            "torch": torch.__version__, "rounds": args.rounds, "steps": args.steps,
            "warmup": args.warmup, "mode": "short" if args.short else "full"}
    print(f"\n{info}")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "cases": rows, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
