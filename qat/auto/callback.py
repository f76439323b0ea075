"""AutoQuantCallback: QAT whose per-layer formats come from :func:`qat.autoquant` and a budget.

A :class:`~qat.callbacks.QuantizationCallback` with a ``budget``: before the model is prepared,
:meth:`AutoQuantCallback.allocate` measures the float model's sensitivity on the first
``calibration_batches`` batches and chooses the formats; the base ``weight`` / ``activation``
specs (granularity, estimators, observers) stay, only widths change. ``qat-train`` calls it on
the float model (the ``init_from`` checkpoint or the float stage's result) with the training
data, writes the choice into the run directory (``autoquant.yaml``: a ``conf/quant`` file to
read, edit, commit and train with; ``autoquant.md`` / ``autoquant.json``: the report) and reads
it back when the run is resumed or its checkpoint evaluated / exported. In another Lightning
project, call ``allocate(model, dataloader)`` before ``fit``, or let ``setup`` do it with the
trainer's datamodule.

``embedding_bands`` (``{module: embedding, bounds: [10000, 25000]}``) splits that embedding's
rows into frequency bands that the allocation treats as layers of their own and drops the rows
from the last bound on (:mod:`qat.auto.bands`); the budget stays a fraction of the whole float
model. ``budget: null`` allocates nothing: the ``weight`` / ``overrides`` given are used as
they are (the file an allocation with bands writes is such a config).

Under DDP every process computes the same choice from the same batches (CPU: deterministic);
on GPUs, allocate once and pass the written ``autoquant.yaml`` as the ``quant`` config.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from ..callbacks.quantization import QuantizationCallback
from ..callbacks.quantization import _to_plain as _plain
from ..surgery import QATConfig
from .allocate import KINDS
from .bands import band_embedding, check_bands
from .sensitivity import ESTIMATORS, METHODS, OBJECTIVES, ZEROS

__all__ = ["AutoQuantCallback", "allocate_for_run", "restore_allocation", "expected_sparsity",
           "ALLOCATION_FILE"]

log = logging.getLogger("qat")
ALLOCATION_FILE = "autoquant.yaml"
_SCHEDULE = ("unit", "start", "freeze_observers", "freeze_norm", "calibration_batches",
             "log_every_n_steps")


class AutoQuantCallback(QuantizationCallback):
    """QuantizationCallback whose formats are chosen for ``budget`` (see the module doc).

    ``budget``: a number for ``budget_kind`` (``size``: fraction of the float model's bytes;
    ``bytes``; ``bits``: average weight bits; ``bitops``: fraction of the float bit-operations)
    or a mapping ``{kind: value}``. ``weight_bits`` / ``act_bits``: candidate widths (2 =
    ternary). ``sensitivity``: ``measured`` or ``hessian`` (with ``estimator`` and
    ``hutchinson_samples``); ``objective``: ``kl`` or ``task``; ``groups``: name patterns whose
    layers get one format; ``zeros``: which zeros sizes count (``structural``: the trained model
    never exceeds the budget; ``codes``). Every other argument is QuantizationCallback's.
    """

    def __init__(self, budget: float | Mapping[str, float] | None = 0.25,
                 budget_kind: str = "size",
                 weight_bits: Sequence[int] = (2, 4, 8), act_bits: Sequence[int] = (8,),
                 sensitivity: str = "measured", objective: str = "kl", estimator: str = "ggn",
                 hutchinson_samples: int = 16, groups: Sequence[str] = (),
                 zeros: str = "structural", embedding_bands: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        budget, weight_bits, act_bits, groups, embedding_bands = map(
            _plain, (budget, weight_bits, act_bits, groups, embedding_bands))
        self.embedding_bands = check_bands(embedding_bands)
        items = {} if budget is None else \
            dict(budget) if isinstance(budget, Mapping) else {budget_kind: budget}
        for kind, value in items.items():
            if kind not in KINDS:
                raise ValueError(f"budget_kind={kind!r} is invalid: allowed {list(KINDS)}")
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0 or (
                    kind in ("size", "bitops") and value > 1):
                allowed = "a fraction in (0, 1]" if kind in ("size", "bitops") else "a number > 0"
                raise ValueError(f"budget={value!r} is invalid for budget_kind={kind!r}: "
                                 f"allowed {allowed}")
        for key, value, allowed in (("sensitivity", sensitivity, METHODS),
                                    ("objective", objective, OBJECTIVES),
                                    ("estimator", estimator, ESTIMATORS),
                                    ("zeros", zeros, ZEROS)):
            if value not in allowed:
                raise ValueError(f"{key}={value!r} is invalid: allowed {list(allowed)}")
        for key, widths, lo in (("weight_bits", weight_bits, 1), ("act_bits", act_bits, 2)):
            if not widths or any(not isinstance(w, int) or not lo <= w <= 8 for w in widths):
                raise ValueError(f"{key}={widths!r} is invalid: allowed a non-empty list of "
                                 f"widths from {lo} to 8" + (" (2 = ternary, 1 = binary)"
                                                             if key == "weight_bits" else ""))
        if not isinstance(hutchinson_samples, int) or hutchinson_samples < 1:
            raise ValueError(f"hutchinson_samples={hutchinson_samples!r} is invalid: allowed an "
                             "integer >= 1")
        if self.mode == "fp32":
            raise ValueError("mode='fp32' quantizes nothing: allowed 'qat' or 'ptq' with a budget")
        self.budget = {k: float(v) for k, v in items.items()}
        self.weight_bits, self.act_bits = tuple(weight_bits), tuple(act_bits)
        self.sensitivity, self.objective, self.estimator = sensitivity, objective, estimator
        self.hutchinson_samples, self.groups = hutchinson_samples, tuple(groups or ())
        self.zeros = zeros
        self.base_config = self.config
        self.allocation: Any = None  # the AutoQuantReport, once allocated here
        self.allocated = budget is None  # no budget: the given formats as they are

    # ---- allocation ---------------------------------------------------------------------------
    def allocate(self, model: nn.Module, dataloader: Iterable[Any],
                 out_dir: str | Path | None = None,
                 sparsity: Mapping[str, float] | None = None) -> Any:
        """Choose the formats for the float ``model`` on ``dataloader``'s first batches and use
        them; with ``out_dir``, write ``autoquant.yaml`` / ``.md`` / ``.json`` there. Returns
        the report."""
        from ..summary import model_size
        from .api import autoquant

        float_bytes = model_size(model)  # before any rows are dropped
        model = self.banded(model, inplace=False)
        config, report = autoquant(
            model, dataloader, self.budget, config=self.base_config,
            weight_bits=self.weight_bits, act_bits=self.act_bits, method=self.sensitivity,
            objective=self.objective, estimator=self.estimator,
            calibration_batches=self.calibration_batches, sparsity=sparsity,
            groups=self.groups, hutchinson_samples=self.hutchinson_samples, zeros=self.zeros,
            float_bytes=float_bytes)
        self.use(config)
        self.allocation = report
        log.info("autoquant:\n%s", report)
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            keys = {k: getattr(self, k) for k in _SCHEDULE}
            if self.embedding_bands:  # formats for bands: only this callback can band
                keys.update({"_target_": f"{__name__.rsplit('.', 1)[0]}.AutoQuantCallback",
                             "budget": None, "embedding_bands": self.embedding_bands})
            (out / ALLOCATION_FILE).write_text(report.yaml(config, mode=self.mode, **keys))
            (out / "autoquant.md").write_text(f"# autoquant\n\n{report.markdown()}")
            (out / "autoquant.json").write_text(json.dumps(
                {"config": config, "report": report.to_dict()}, indent=2, default=str))
        return report

    def banded(self, model: nn.Module, inplace: bool = True) -> nn.Module:
        """``model`` with ``embedding_bands`` applied (a copy unless ``inplace``)."""
        if not self.embedding_bands:
            return model
        return band_embedding(model, self.embedding_bands["module"],
                              self.embedding_bands["bounds"], inplace=inplace)

    def prepare(self, pl_module: L.LightningModule) -> nn.Module:
        self.banded(self.target(pl_module))
        return super().prepare(pl_module)

    def use(self, config: QATConfig | Mapping[str, Any]) -> None:
        """Quantize with ``config`` (a QATConfig or its mapping) instead of allocating."""
        self.config = config if isinstance(config, QATConfig) else QATConfig.from_dict(config)
        self.allocated = True

    def load(self, path: str | Path) -> None:
        """Use the formats of an ``autoquant.yaml`` (or any ``conf/quant`` file) at ``path``."""
        import yaml

        path = Path(path)
        try:
            node = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"{path}: not a readable quant config ({err})") from None
        if not isinstance(node, dict):
            raise ValueError(f"{path}: not a quant config (a mapping)")
        keys = ("weight", "activation", "output", "attention", "overrides", "skip",
                "share_inputs")
        try:
            self.use({k: node[k] for k in keys if k in node})
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.allocated:
            dm = getattr(trainer, "datamodule", None)
            if dm is None:
                raise ValueError("AutoQuantCallback needs calibration data: call "
                                 "allocate(model, dataloader) before fit, or fit with a "
                                 "datamodule")
            self.allocate(self.target(pl_module), dm.train_dataloader())
        super().setup(trainer, pl_module, stage)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "budget": self.budget}


def expected_sparsity(prune: Any, model: nn.Module) -> dict[str, float] | None:
    """The final sparsity a pruning config (``prune`` node / mapping) will give each module it
    targets, as ``{name pattern: fraction}`` (None without pruning)."""
    node = _plain(prune)
    if not isinstance(node, Mapping) or "_target_" not in node:
        return None
    sched = node.get("schedule") or {}
    s = sched.get("final_sparsity", sched.get("sparsity"))
    if not isinstance(s, int | float) or s <= 0:
        return None
    from ..prune import match_modules

    names = [n for n, _ in match_modules(model, node.get("targets") or ["type:Linear"])]
    out: dict[str, float] = {}
    for n in names:
        out[n or "*"] = float(s)
        out[f"{n}.*" if n else "*"] = float(s)
    return out


def allocate_for_run(quant: Any, model: nn.Module, dm: Any, cfg: Any, out: Path) -> None:
    """qat-train's hook: with an :class:`AutoQuantCallback`, choose the formats on the float
    ``model`` and the training batches (a resumed run reuses its ``autoquant.yaml``)."""
    if not isinstance(quant, AutoQuantCallback) or not quant.budget:
        return
    saved = Path(out) / ALLOCATION_FILE
    if cfg.get("ckpt_path") and saved.is_file():
        quant.load(saved)
        log.info("autoquant: resumed run, formats from %s", saved)
        return
    quant.allocate(model, dm.train_dataloader(), out,
                   sparsity=expected_sparsity(cfg.get("prune"), model))


def restore_allocation(quant: Any, run_dir: Path) -> None:
    """For a checkpoint of an autoquant run: use the formats its run chose."""
    if isinstance(quant, AutoQuantCallback):
        path = Path(run_dir) / ALLOCATION_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the run chose its formats with autoquant but the "
                                    "file with the choice is missing")
        quant.load(path)
