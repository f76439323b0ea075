"""Per-group sensitivity to each candidate format, measured on a few calibration batches.

Both scores are the increase of an objective over the float model, in the objective's units:

- ``measured``: the objective with that group alone quantized (weights at the candidate width,
  activations it reads at the candidate width with observers calibrated on the same batches),
  every other layer in float. Cost: one forward pass over the calibration batches per
  (group, candidate), no backward.
- ``hessian`` (HAWQ-v2): ``1/2 * Tr(H_W) / n * ||Q(W) - W||^2`` per weight tensor, plus the same
  for the activations the group reads (``Tr(H_x) / numel(x) * ||Q(x) - x||^2`` per batch, ``H_x``
  the Hessian with respect to the layer's input, reached through a zero tensor added to it).
  Traces come from Hutchinson's estimator ``E[v^T H v]``, every block's at once, with one of
  two estimators. ``ggn`` (default): probes through the Gauss-Newton factorisation
  ``J^T H_out J`` (one backward per sample; never negative; no noise from the other blocks); it
  is the exact Hessian of the ``kl`` objective at the float model. ``hvp``: Rademacher probes
  and Hessian-vector products by double backward (the true Hessian of either objective; the
  other blocks' curvature makes small blocks' estimates noisy, even negative: raise
  ``samples``). Cost: ``samples`` backward passes (``hvp``: double backward) per batch,
  independent of the number of candidates.

Objectives: ``kl`` (default) is the KL divergence from the float model's predicted distribution
(mean squared difference of the outputs for a one-output regression model): label-free,
never negative, zero at the float model; its Hessian there is the Fisher information, positive
semi-definite, so Hutchinson's per-block estimates are never negative. ``task`` is the task loss
(cross-entropy, or MSE for regression) on the calibration labels.

Everything runs on a private prepared copy of the model (every quantizer off computes the float
model bit for bit), so the caller's model is left untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence

from ..export.qweight import IntWeight, quantize_weight
from ..export.sparse import int_weight_nbytes
from ..quant.fake_quantizer import FakeQuantizer
from .layers import Candidate, Group, Layer, act_format, weight_format

__all__ = ["METHODS", "OBJECTIVES", "ESTIMATORS", "ZEROS", "Calibration", "Probe", "Scores",
           "output_logits"]

METHODS = ("measured", "hessian")
OBJECTIVES = ("kl", "task")
ESTIMATORS = ("ggn", "hvp")
ZEROS = ("structural", "codes")
NON_INPUTS = ("labels", "idx")
LossFn = Callable[[nn.Module, Any], Tensor]


def output_logits(out: Any) -> Tensor:
    """The logits of a model output: a tensor, ``.logits`` or the first element of a tuple."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ValueError(f"cannot find the logits in a model output of type {type(out).__name__}: "
                     "pass loss_fn")


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_to(v, device) for v in x)
    return x


@dataclass
class Calibration:
    """The calibration batches: model inputs, labels (or None) and example counts."""

    batches: list[Any]
    inputs: list[tuple[tuple, dict]] = field(init=False)
    labels: list[Tensor | None] = field(init=False)
    sizes: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.inputs, self.labels, self.sizes = [], [], []
        for b in self.batches:
            if isinstance(b, dict):
                args, kw = (), {k: v for k, v in b.items() if k not in NON_INPUTS}
                y = b.get("labels")
                first = next((v for v in kw.values() if isinstance(v, Tensor)), None)
            elif isinstance(b, list | tuple) and len(b) == 2:
                args, kw, y = (b[0],), {}, b[1]
                first = b[0] if isinstance(b[0], Tensor) else None
            else:
                args, kw, y, first = (b,), {}, None, b if isinstance(b, Tensor) else None
            self.inputs.append((args, kw))
            self.labels.append(y)
            self.sizes.append(int(first.shape[0]) if first is not None and first.dim() else 1)

    @classmethod
    def take(cls, data: Iterable[Any], n: int, device: torch.device) -> Calibration:
        batches = [_to(b, device) for b in islice(data, n)]
        if not batches:
            raise ValueError("autoquant: the calibration data yielded no batch")
        return cls(batches)

    @property
    def examples(self) -> int:
        return sum(self.sizes)

    def __iter__(self) -> Iterator[tuple[int, tuple, dict, Tensor | None, int]]:
        for i, ((args, kw), y, n) in enumerate(zip(self.inputs, self.labels, self.sizes,
                                                   strict=True)):
            yield i, args, kw, y, n


@dataclass
class Scores:
    """Sensitivity, bytes and bit-operation factors of every (group, candidate)."""

    sensitivity: dict[tuple[int, Candidate], float] = field(default_factory=dict)
    nbytes: dict[tuple[int, int], int] = field(default_factory=dict)  # (group, w) -> bytes
    seconds: float = 0.0


def _prune(w: Tensor, sparsity: float) -> Tensor:
    """``w`` with its ``round(sparsity * n)`` smallest magnitudes set to zero."""
    k = int(round(sparsity * w.numel()))
    if k <= 0:
        return w
    flat = w.detach().reshape(-1).clone()
    flat[flat.abs().argsort(stable=True)[:k]] = 0
    return flat.view_as(w)


class Probe:
    """A prepared private copy of the model with every quantizer off, its layers and groups,
    and the calibration batches; measures what the allocation needs."""

    def __init__(self, model: nn.Module, layers: list[Layer], groups: list[Group],
                 calib: Calibration, objective: str = "kl", loss_fn: LossFn | None = None,
                 sparsity: dict[str, float] | None = None) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r} is invalid: allowed {list(OBJECTIVES)}")
        self.model, self.layers, self.groups, self.calib = model, layers, groups, calib
        self.objective, self.loss_fn = objective, loss_fn
        self.sparsity = sparsity or {}
        self.zeros = "structural"
        self.refs: list[Tensor | None] = []
        self.acts: dict[int, dict[int, FakeQuantizer]] = {}  # bits -> id(base quantizer) -> q
        self.base_loss = 0.0

    # ---- objective ------------------------------------------------------------------------
    def _batch_loss(self, i: int, args: tuple, kw: dict, y: Tensor | None,
                    own_ref: bool = False) -> Tensor:
        """The objective on batch ``i``. ``own_ref``: the ``kl`` reference is this forward's
        own (detached) prediction, so that ``p - p_ref`` is exactly zero in the graph and the
        Hessian is exactly the Gauss-Newton / Fisher matrix (no rounding-noise term)."""
        if self.loss_fn is not None:
            return self.loss_fn(self.model, self.calib.batches[i])
        logits = output_logits(self.model(*args, **kw)).float()
        regression = logits.shape[-1] == 1
        ref = self.refs[i] if self.refs else None
        if own_ref:
            ref = (logits if regression else F.log_softmax(logits, -1)).detach()
        if self.objective == "kl" and ref is not None:
            if regression:
                return F.mse_loss(logits, ref)
            return F.kl_div(F.log_softmax(logits, -1), ref, log_target=True, reduction="batchmean")
        if y is None:
            raise ValueError("autoquant objective='task' needs labels in the calibration batches")
        if regression:
            return F.mse_loss(logits.squeeze(-1), y.float())
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def loss(self) -> float:
        """The objective over the calibration batches (example-weighted mean)."""
        total = 0.0
        for i, args, kw, y, n in self.calib:
            total += n * float(self._batch_loss(i, args, kw, y))
        return total / self.calib.examples

    @torch.no_grad()
    def reference(self) -> None:
        """Float outputs of every batch (the ``kl`` reference) and the float objective."""
        self.refs = []
        for _, args, kw, _, _ in self.calib:
            if self.objective == "kl" and self.loss_fn is None:
                logits = output_logits(self.model(*args, **kw)).float()
                self.refs.append(logits if logits.shape[-1] == 1 else F.log_softmax(logits, -1))
            else:
                self.model(*args, **kw)
        self.base_loss = self.loss() if (self.objective == "task" or self.loss_fn) else 0.0

    # ---- quantized weights and activations ------------------------------------------------
    def _float_weight(self, layer: Layer, pname: str) -> Tensor:
        w = layer.param(pname)
        s = self.sparsity.get(layer.name, 0.0)
        return _prune(w, s) if s > 0 else w

    def quantized(self, layer: Layer, w: int) -> list[tuple[str, IntWeight]]:
        """Each weight of ``layer`` at width ``w`` (after the expected pruning)."""
        out = []
        for pname, q in layer.weights:
            t = self._float_weight(layer, pname).detach()
            fresh = FakeQuantizer(weight_format(q.spec, w), tuple(t.shape)).to(t.device)
            out.append((pname, quantize_weight(fresh, t, name=f"{layer.name}.{pname}")))
        return out

    @contextmanager
    def _weights(self, values: dict[Tensor, Tensor]) -> Iterator[None]:
        """Weights replaced in place (LSTM flat weights keep their storage), then restored."""
        saved = {p: p.detach().clone() for p in values}
        try:
            with torch.no_grad():
                for p, v in values.items():
                    p.copy_(v.to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for p, v in saved.items():
                    p.copy_(v)

    @contextmanager
    def _inputs(self, layers: Iterable[Layer], qs: dict[int, FakeQuantizer]) -> Iterator[None]:
        """The layers read their input through ``qs[id(base quantizer)]``."""
        swapped = [(layer.module, layer.input_quant) for layer in layers
                   if layer.input_quant is not None]
        try:
            for module, base in swapped:
                module.input_quant = qs[id(base)]
            yield
        finally:
            for module, base in swapped:
                module.input_quant = base

    @torch.no_grad()
    def calibrate_acts(self, bits: Sequence[int]) -> None:
        """One input quantizer per base quantizer and width, calibrated on the batches (a tied
        quantizer stays one quantizer: it observes its tensor once per forward)."""
        base = {id(layer.input_quant): layer.input_quant for layer in self.layers
                if layer.input_quant is not None}
        for b in bits:
            qs = {}
            for key, q in base.items():
                new = FakeQuantizer(act_format(q.spec, b)).to(q.scale.device)
                new.shared = q.shared
                qs[key] = new.enable_observer(True).enable_fake_quant(False)
            with self._inputs(self.layers, qs):
                for _, args, kw, _, _ in self.calib:
                    self.model(*args, **kw)
            for q in qs.values():
                q.enable_observer(False).enable_fake_quant(True)
            self.acts[b] = qs

    # ---- sizes and scores -----------------------------------------------------------------
    def group_bytes(self, g: int, w: int,
                    cache: dict[str, list[tuple[str, IntWeight]]]) -> int:
        """Bytes of the group's weights at width ``w``. ``zeros='codes'``: every zero code of
        the weights as they are (exact now); ``'structural'``: only weights that are exactly
        zero in float (pruned, padding rows) count as zeros, which training cannot undo, so
        the trained model is never larger."""
        total = 0
        for layer in self.groups[g].layers:
            for pname, iw in cache[layer.name]:
                nnz = None
                if self.zeros == "structural":
                    nnz = int(self._float_weight(layer, pname).count_nonzero())
                total += int_weight_nbytes(iw, nnz)
        return total

    def measured(self, cands: dict[int, list[Candidate]], widths: Sequence[int]) -> Scores:
        """Quantize each group alone at each candidate and measure the objective's increase."""
        scores = Scores()
        for g, group in enumerate(self.groups):
            for w in widths:
                cache = {layer.name: self.quantized(layer, w) for layer in group.layers}
                scores.nbytes[g, w] = self.group_bytes(g, w, cache)
                values = {layer.param(p): iw.dequantize() for layer in group.layers
                          for p, iw in cache[layer.name]}
                with self._weights(values):
                    for c in (c for c in cands[g] if c.w == w):
                        qs = self.acts[c.a] if c.a is not None else {}
                        with self._inputs(group.layers if c.a is not None else (), qs):
                            scores.sensitivity[g, c] = self.loss() - self.base_loss
        return scores

    def hessian(self, cands: dict[int, list[Candidate]], widths: Sequence[int],
                samples: int = 16, seed: int = 0, estimator: str = "ggn") -> Scores:
        """HAWQ-v2 scores from Hutchinson traces (see the module docstring)."""
        if samples < 1:
            raise ValueError(f"hutchinson_samples={samples} must be >= 1")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator={estimator!r} is invalid: allowed {list(ESTIMATORS)}")
        if estimator == "ggn" and self.loss_fn is not None:
            raise ValueError("estimator='ggn' needs the model's logits: with loss_fn use "
                             "estimator='hvp'")
        tr_w, act_terms = self._traces(samples, seed, estimator)
        scores = Scores()
        for g, group in enumerate(self.groups):
            for w in widths:
                cache = {layer.name: self.quantized(layer, w) for layer in group.layers}
                scores.nbytes[g, w] = self.group_bytes(g, w, cache)
                weight_term = 0.0
                for layer in group.layers:
                    for pname, iw in cache[layer.name]:
                        t = layer.param(pname).detach().float()
                        err = float((iw.dequantize().to(t.device) - t).pow(2).sum())
                        weight_term += 0.5 * tr_w[layer.name, pname] / t.numel() * err
                for c in (c for c in cands[g] if c.w == w):
                    act = 0.0
                    if c.a is not None:
                        act = sum(0.5 * act_terms.get(layer.name, {}).get(c.a, 0.0)
                                  for layer in group.layers)
                    scores.sensitivity[g, c] = weight_term + act
        return scores

    def _traces(self, samples: int, seed: int, estimator: str
                ) -> tuple[dict[tuple[str, str], float], dict[str, dict[int, float]]]:
        """Per weight tensor: the estimated Hessian trace of the objective; per layer and
        activation width: sum over batches of (n_b / N) Tr(H_x) / numel(x) ||Q(x) - x||^2."""
        params = [(layer.name, p, layer.param(p)) for layer in self.layers for p, _ in
                  layer.weights]
        flags = [t.requires_grad for _, _, t in params]
        for _, _, t in params:
            t.requires_grad_(True)
        dev = params[0][2].device
        gen = torch.Generator(device=dev).manual_seed(seed)
        tr_w = {(ln, p): 0.0 for ln, p, _ in params}
        act_terms: dict[str, dict[int, float]] = {}
        total = self.calib.examples
        act_layers = [layer for layer in self.layers if layer.input_quant is not None]
        trace = _ggn_traces if estimator == "ggn" else _hvp_traces
        try:
            for i, args, kw, y, n in self.calib:
                deltas: dict[str, tuple[Tensor, int, dict[int, float]]] = {}
                hooks = [layer.module.register_forward_pre_hook(_Perturb(self, layer, deltas))
                         for layer in act_layers]
                try:
                    with torch.enable_grad():
                        if estimator == "ggn":
                            out = output_logits(self.model(*args, **kw)).float()
                        else:
                            out = self._batch_loss(i, args, kw, y, own_ref=True)
                finally:
                    for h in hooks:
                        h.remove()
                names = list(deltas)
                tensors = [t for _, _, t in params] + [deltas[k][0] for k in names]
                est = trace(out, tensors, samples, gen)
                for j, (ln, p, _) in enumerate(params):
                    tr_w[ln, p] += n / total * est[j]
                for k, name in enumerate(names):
                    _, numel, errs = deltas[name]
                    curv = est[len(params) + k] / max(numel, 1)
                    row = act_terms.setdefault(name, {})
                    for b, e in errs.items():
                        row[b] = row.get(b, 0.0) + n / total * curv * e
        finally:
            for (_, _, t), f in zip(params, flags, strict=True):
                t.requires_grad_(f)
        return tr_w, act_terms


def _rademacher(shape: torch.Size, gen: torch.Generator, like: Tensor) -> Tensor:
    v = torch.randint(0, 2, shape, generator=gen, device=like.device)
    return v.to(like.dtype) * 2 - 1


def _hvp_traces(loss: Tensor, tensors: list[Tensor], samples: int,
                gen: torch.Generator) -> list[float]:
    """Hutchinson with Hessian-vector products (double backward): ``E[v_j . (H v)_j]`` per
    block j, ``v`` Rademacher over all blocks at once. Unbiased; the other blocks add noise
    (``v_j . H_jk v_k``) that is large for blocks of small curvature."""
    with torch.enable_grad():
        grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
    used = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]
    est = [0.0] * len(tensors)
    for s in range(samples):
        vs = [_rademacher(tensors[j].shape, gen, tensors[j]) for j in used]
        hv = torch.autograd.grad([grads[j] for j in used], [tensors[j] for j in used],
                                 grad_outputs=vs, retain_graph=s < samples - 1,
                                 allow_unused=True)
        for j, v, h in zip(used, vs, hv, strict=True):
            if h is not None:
                est[j] += float((v * h).sum()) / samples
    return est


def _ggn_traces(logits: Tensor, tensors: list[Tensor], samples: int,
                gen: torch.Generator) -> list[float]:
    """Hutchinson on the Gauss-Newton factorisation ``H = J^T H_out J`` of a mean loss over N
    output rows: with per-row probes ``r_i`` of covariance ``H_out,i`` (softmax: ``onehot(y) - p``,
    ``y ~ p``; one output: ``sqrt(2) * Rademacher``), ``g = J^T r / N`` (one backward) gives
    ``N * E||g_j||^2 = Tr(H_jj)`` for every block j, never negative, without cross-block terms.
    This is the exact Hessian of the ``kl`` objective at the float model (and the Gauss-Newton
    part of the task loss's)."""
    z = logits.reshape(-1, logits.shape[-1])  # (N, C)
    rows = z.shape[0]
    p = torch.softmax(z.detach(), -1)
    est = [0.0] * len(tensors)
    for s in range(samples):
        if z.shape[-1] == 1:
            r = _rademacher(z.shape, gen, z) * 2**0.5
        else:
            y = torch.multinomial(p, 1, generator=gen).squeeze(1)  # (N,)
            r = F.one_hot(y, z.shape[-1]).to(z.dtype) - p
        with torch.enable_grad():
            g = torch.autograd.grad((r * z).sum() / rows, tensors, retain_graph=s < samples - 1,
                                    allow_unused=True)
        for j, gj in enumerate(g):
            if gj is not None:
                est[j] += rows * float(gj.float().pow(2).sum()) / samples
    return est


class _Perturb:
    """Forward pre-hook: records ``||Q_b(x) - x||^2`` of the layer's input for every calibrated
    width ``b`` and adds a zero tensor ``delta`` (requires grad) to it, so that the Hessian with
    respect to the input is reachable. Every argument that is the input itself (self-attention's
    query / key / value) gets the same perturbed tensor."""

    def __init__(self, probe: Probe, layer: Layer, out: dict) -> None:
        self.probe, self.layer, self.out = probe, layer, out

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        if not args or self.layer.name in self.out:
            return None
        x0 = args[0]
        x = x0.data if isinstance(x0, PackedSequence) else x0
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return None
        errs = {}
        with torch.no_grad():
            for b, qs in self.probe.acts.items():
                q = qs[id(self.layer.input_quant)]
                errs[b] = float((q(x.detach()) - x.detach()).float().pow(2).sum())
        delta = torch.zeros_like(x, requires_grad=True)
        self.out[self.layer.name] = (delta, x.numel(), errs)
        new = x0._replace(data=x + delta) if isinstance(x0, PackedSequence) else x + delta
        return tuple(new if a is x0 else a for a in args)

