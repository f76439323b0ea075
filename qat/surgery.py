"""Model surgery: ``prepare`` swaps float layers for quantized wrappers, ``convert`` folds weights.

Pattern rules (``QATConfig.overrides`` and ``skip``) are shell-style ``fnmatch`` patterns (case
sensitive; ``*`` also crosses dots) matched against a module's qualified name *or any of its
ancestors' names*, so ``"bert.encoder"`` covers every layer inside the encoder and
``"bert.encoder.layer.1"`` covers layer 1 but not layer 10. Later override rules win.

Mixed precision, e.g. a 4-bit encoder with 8-bit embeddings and classifier::

    config = QATConfig(overrides={"bert.encoder": {"bits": 4}}, skip=["classifier"])
    model, report = qat.prepare(model, config)   # report: swapped / skipped / unsupported
    print(report)
    ...  # train
    deployable = qat.convert(model)              # weights folded onto their grid

``prepare`` swaps every module whose exact type is in the wrapper registry
(:mod:`qat.nn.base`: nn.Linear, nn.Conv1d, nn.Embedding, nn.MultiheadAttention,
nn.TransformerEncoderLayer, nn.LSTM and the Hugging Face attention modules of
:mod:`qat.nn.hf`); subclasses of these with their own forward are left alone and reported as
unsupported, like any other module that owns parameters (nn.GRU, nn.Conv2d, ...).
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from .nn.attention import ATTN_SLOTS, QuantTransformerEncoderLayer, attn_prob_spec
from .nn.base import QuantModule, check_prunable, quant_class_for, quant_layers
from .nn.config import LayerQuantConfig, default_act_spec, default_weight_spec
from .nn.lstm_cell import SLOTS as LSTM_SLOTS
from .nn.sharing import share_inputs
from .quant.fake_quantizer import FakeQuantizer
from .quant.spec import QuantSpec

__all__ = ["QATConfig", "PrepareReport", "SwapRecord", "prepare", "convert", "LSTM_SLOTS"]

_RULE_KEYS = ("weight", "activation", "output", "attention", "bits", "slots")
_FLOAT_ONLY = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)


# ---- configuration ------------------------------------------------------------------------------
def _spec(key: str, value: Any, base: QuantSpec | None) -> QuantSpec | None:
    """None, a QuantSpec, or a mapping of fields that updates ``base`` (or the default)."""
    if value is None or isinstance(value, QuantSpec):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{key} must be a QuantSpec, a mapping of QuantSpec fields or None, "
                         f"got {type(value).__name__}")
    known = {f.name for f in fields(QuantSpec)}
    bad = sorted(set(value) - known)
    if bad:
        raise ValueError(f"{key} has no field {bad[0]!r}: allowed {sorted(known)}")
    try:
        return (base or QuantSpec()).replace(**dict(value))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{key}: {e}") from None


def _patterns(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    out = tuple(value or ())
    for p in out:
        if not isinstance(p, str):
            raise ValueError(f"{key} patterns must be strings, got {p!r}")
    return out


def _rule(where: str, rule: Any) -> dict[str, Any]:
    """Validate one override rule (a partial config)."""
    if not isinstance(rule, Mapping):
        raise ValueError(f"{where} must be a mapping with keys from {list(_RULE_KEYS)}")
    rule = dict(rule)
    bad = sorted(set(rule) - set(_RULE_KEYS))
    if bad:
        raise ValueError(f"{where} has no key {bad[0]!r}: allowed {list(_RULE_KEYS)}")
    for k in ("weight", "activation", "output"):
        if k in rule:
            base = default_weight_spec() if k == "weight" else default_act_spec()
            _spec(f"{where}.{k}", rule[k], base)  # validate early; applied per layer later
    if "attention" in rule and not isinstance(rule["attention"], bool):
        raise ValueError(f"{where}.attention must be true or false, got {rule['attention']!r}")
    if "bits" in rule:
        _spec(f"{where}.bits", {"bits": rule["bits"]}, None)
    slots = dict(rule.get("slots") or {})
    for name, value in slots.items():
        if name not in ATTN_SLOTS + LSTM_SLOTS:
            raise ValueError(f"{where}.slots has no slot {name!r}: allowed "
                             f"{list(ATTN_SLOTS + LSTM_SLOTS)}")
        _spec(f"{where}.slots.{name}", value, default_act_spec())
    rule["slots"] = slots
    return rule


def _rules(value: Any) -> tuple[tuple[str, dict[str, Any]], ...]:
    """Overrides as (pattern, rule) pairs from a mapping, pairs, or mappings with 'pattern'."""
    if isinstance(value, Mapping):
        items = list(value.items())
    else:
        items = []
        for i, item in enumerate(value or ()):
            if isinstance(item, Mapping):
                if "pattern" not in item:
                    raise ValueError(f"overrides[{i}] needs a 'pattern' key")
                item = dict(item)
                items.append((item.pop("pattern"), item))
            elif isinstance(item, list | tuple) and len(item) == 2:
                items.append(tuple(item))
            else:
                raise ValueError(f"overrides[{i}] must be (pattern, rule) or a mapping with "
                                 f"'pattern', got {item!r}")
    out = []
    for pattern, rule in items:
        if not isinstance(pattern, str):
            raise ValueError(f"override pattern must be a string, got {pattern!r}")
        out.append((pattern, _rule(f"overrides[{pattern!r}]", rule)))
    return tuple(out)


@dataclass
class QATConfig:
    """What ``prepare`` quantizes.

    ``weight`` / ``activation`` / ``output``: QuantSpec, a mapping of QuantSpec fields that
    updates the default spec (8-bit per-channel symmetric weights, 8-bit asymmetric EMA
    activations) or None (off). ``attention``: quantize the inputs of both attention matmuls
    (q, k, v and the softmax probabilities). ``overrides``: (pattern, rule) pairs or a mapping
    pattern -> rule; a rule is a partial config with keys ``weight``, ``activation``, ``output``
    (mappings update the inherited spec, None turns it off), ``attention``, ``bits`` (sets the
    bits of every spec that is on) and ``slots`` (layer-specific quantizers, e.g. LSTM
    ``gates``). ``skip``: patterns of modules to leave in float. ``share_inputs``: layers that
    read the same tensor share one input quantizer, tied during the first forward
    (:mod:`qat.nn.sharing`).
    """

    weight: QuantSpec | Mapping[str, Any] | None = field(default_factory=default_weight_spec)
    activation: QuantSpec | Mapping[str, Any] | None = field(default_factory=default_act_spec)
    output: QuantSpec | Mapping[str, Any] | None = None
    attention: bool = True
    overrides: Any = ()
    skip: Any = ()
    share_inputs: bool = True

    def __post_init__(self) -> None:
        self.weight = _spec("weight", self.weight, default_weight_spec())
        self.activation = _spec("activation", self.activation, default_act_spec())
        self.output = _spec("output", self.output, default_act_spec())
        for key in ("attention", "share_inputs"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        self.overrides = _rules(self.overrides)
        self.skip = _patterns("skip", self.skip)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> QATConfig:
        """Build from a plain mapping or an OmegaConf node; unknown keys raise ValueError."""
        if data is None:
            return cls()
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(data, DictConfig):
                data = OmegaConf.to_container(data, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        if not isinstance(data, Mapping):
            raise ValueError(f"QATConfig.from_dict expects a mapping, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        bad = sorted(set(data) - set(known))
        if bad:
            raise ValueError(f"QATConfig has no key {bad[0]!r}: allowed {known}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for logging): specs as dicts, overrides as [pattern, rule] pairs."""
        spec = lambda v: v.to_dict() if isinstance(v, QuantSpec) else v  # noqa: E731
        rules = [[p, {k: spec(v) if k != "slots" else {n: spec(x) for n, x in v.items()}
                      for k, v in r.items()}] for p, r in self.overrides]
        return {"weight": spec(self.weight), "activation": spec(self.activation),
                "output": spec(self.output), "attention": self.attention, "overrides": rules,
                "skip": list(self.skip), "share_inputs": self.share_inputs}

    def layer_config(self, name: str, slots: tuple[str, ...] = ()) -> LayerQuantConfig:
        """The resolved config of module ``name`` (``slots``: the ones the layer has)."""
        weight, act, out, attention = self.weight, self.activation, self.output, self.attention
        chosen: dict[str, QuantSpec | None] = {}
        for pattern, rule in self.overrides:
            if not _matches(pattern, name):
                continue
            weight = _spec("weight", rule["weight"], weight) if "weight" in rule else weight
            act = _spec("activation", rule["activation"], act) if "activation" in rule else act
            out = _spec("output", rule["output"], out) if "output" in rule else out
            attention = rule.get("attention", attention)
            if "bits" in rule:
                weight, act, out = (_with_bits(s, rule["bits"]) for s in (weight, act, out))
            for k, v in rule["slots"].items():
                base = chosen.get(k) or (attn_prob_spec(act) if k == "attn" else act)
                chosen[k] = _spec(f"slots.{k}", v, base)
        picked = {k: v for k, v in chosen.items() if k in slots}
        if set(slots) == set(ATTN_SLOTS) and not attention:
            picked = dict.fromkeys(ATTN_SLOTS)
        return LayerQuantConfig(weight=weight, input=act, output=out, slots=picked)

    def attention_on(self, name: str) -> bool:
        on = self.attention
        for pattern, rule in self.overrides:
            if "attention" in rule and _matches(pattern, name):
                on = rule["attention"]
        return on


def _with_bits(spec: QuantSpec | None, bits: int) -> QuantSpec | None:
    return spec if spec is None or spec.mode != "int" else spec.replace(bits=bits)


def _matches(pattern: str, name: str) -> bool:
    """fnmatch on the name or any ancestor's name ('a.b.c' -> 'a', 'a.b', 'a.b.c')."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    parts = name.split(".") if name else []
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts)))


# ---- report -----------------------------------------------------------------------------------
@dataclass
class SwapRecord:
    name: str
    source: str
    target: str
    weight_bits: int | None
    act_bits: int | None

    @property
    def bits(self) -> str:
        return f"W{self.weight_bits or '-'}A{self.act_bits or '-'}"


@dataclass
class PrepareReport:
    """What ``prepare`` did: swapped, skipped (name, type, pattern), unsupported (name, type:
    modules with parameters no wrapper handles, left in float), already prepared, and
    ``float_attention`` (name, type, reason): every attention module whose matmuls (Q K^T, P V)
    stay in float, because attention quantization is off for it or no wrapper handles its type
    (an attention module is one whose class name contains "Attention" and holds no other one)."""

    swapped: list[SwapRecord] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    unsupported: list[tuple[str, str]] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    float_attention: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} modules:"]
        lines += [f"  {r.name or '<root>'}: {r.source} -> {r.target} ({r.bits})"
                  for r in self.swapped]
        lines += [f"skipped {n or '<root>'} ({t}) by pattern {p!r}" for n, t, p in self.skipped]
        lines += [f"unsupported, left in float: {n} ({t})" for n, t in self.unsupported]
        lines += [f"already prepared: {n or '<root>'}" for n in self.already]
        lines += [f"attention matmuls left in float: {n or '<root>'} ({t}): {r}"
                  for n, t, r in self.float_attention]
        return "\n".join(lines)


# ---- prepare ----------------------------------------------------------------------------------
def _load_wrappers() -> None:
    """Register the Hugging Face wrappers (the torch ones register on ``import qat.nn``): only
    when transformers is already imported (a model cannot hold its modules otherwise), so that
    ``import qat`` stays light."""
    import sys

    if "transformers" in sys.modules:
        from .nn import hf, hf_deberta, hf_interface  # noqa: F401


class _Preparer:
    def __init__(self, config: QATConfig) -> None:
        self.config = config
        self.report = PrepareReport()
        self.memo: dict[int, nn.Module] = {}

    def walk(self, module: nn.Module, name: str) -> nn.Module:
        if id(module) in self.memo:
            return self.memo[id(module)]
        if isinstance(module, QuantModule):
            self.report.already.append(name)
            return module
        hit = next((p for p in self.config.skip if _matches(p, name)), None)
        if hit is not None:
            self.report.skipped.append((name, type(module).__name__, hit))
            return module
        for child_name, child in list(module._modules.items()):
            if child is not None:
                new = self.walk(child, f"{name}.{child_name}" if name else child_name)
                if new is not child:
                    setattr(module, child_name, new)
        new = self.swap(module, name)
        self.memo[id(module)] = new
        return new

    def swap(self, m: nn.Module, name: str) -> nn.Module:
        cls, cfg = quant_class_for(m), self.config
        if cls is None or (cls.attention_module and not cfg.attention_on(name)):
            return self.leave(m, name)
        try:
            new = cls.from_float(m, cfg.layer_config(name, cls.quant_slots),
                                 convert_children=False)
        except ValueError as e:
            raise ValueError(f"cannot prepare {name or '<root>'} ({type(m).__name__}): {e}") \
                from None
        for pname in new.weight_quantizers():
            if isinstance(getattr(new, f"{pname}_mask", None), torch.Tensor):  # pruned before
                check_prunable(new, pname, name or "<root>")
        weights = list(new.weight_quantizers().values())
        act = new.activation_quantizers().get("input")
        self.report.swapped.append(SwapRecord(
            name, type(m).__name__, type(new).__name__, weights[0].spec.bits if weights else None,
            act.spec.bits if act is not None else None))
        return new

    def leave(self, m: nn.Module, name: str) -> nn.Module:
        if isinstance(m, nn.TransformerEncoder) and any(
                isinstance(layer, QuantTransformerEncoderLayer) for layer in m.layers):
            m.use_nested_tensor = False  # the nested fast path would bypass the quantizers
        own = [n for n, _ in m.named_parameters(recurse=False)]
        if own and not isinstance(m, _FLOAT_ONLY + (FakeQuantizer,)):
            self.report.unsupported.append((name, type(m).__name__))
        return m


def _is_attention(m: nn.Module) -> bool:
    return "attention" in type(m).__name__.lower()


def _float_attention(model: nn.Module, config: QATConfig) -> list[tuple[str, str, str]]:
    """(name, type, reason) of every innermost attention module whose matmuls are not
    quantized (modules under a skip pattern are reported as skipped, not here)."""
    out = []
    for name, m in model.named_modules():
        if not _is_attention(m) or any(_matches(p, name) for p in config.skip):
            continue
        if any(_is_attention(c) for c in m.modules() if c is not m):
            continue  # a container (BertAttention, DebertaV2Attention): its inner one counts
        if isinstance(m, QuantModule) and set(ATTN_SLOTS) & set(m.activation_quantizers()):
            continue
        if not config.attention_on(name):
            reason = "attention quantization is off (attention=false)"
        elif isinstance(m, QuantModule) or quant_class_for(m) is not None:
            reason = "its attention slots are off (quant.overrides slots / activation=None)"
        else:
            reason = "no quantized wrapper for this type"
        out.append((name, type(m).__name__, reason))
    return out


def _warn_unmatched(model: nn.Module, config: QATConfig) -> None:
    names = [n for n, _ in model.named_modules()]
    for kind, patterns in (("override", [p for p, _ in config.overrides]), ("skip", config.skip)):
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                warnings.warn(f"QAT {kind} pattern {p!r} matches no module", stacklevel=3)


def prepare(model: nn.Module, config: QATConfig | Mapping[str, Any] | None = None,
            inplace: bool = False) -> tuple[nn.Module, PrepareReport]:
    """Swap every supported float layer for its quantized wrapper.

    Returns ``(model, report)``; with ``inplace=False`` the input model is left untouched (it is
    deep-copied first). Already-prepared modules are left alone, so preparing twice is a no-op.
    Create the optimizer after ``prepare`` (learned scales are new parameters).
    """
    if config is None or isinstance(config, Mapping):
        config = QATConfig.from_dict(config)
    if not isinstance(config, QATConfig):
        raise ValueError(f"config must be a QATConfig or a mapping, got {type(config).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    _warn_unmatched(model, config)
    _load_wrappers()
    preparer = _Preparer(config)
    model = preparer.walk(model, "")
    preparer.report.float_attention = _float_attention(model, config)
    if config.share_inputs:
        share_inputs(model)
    return model, preparer.report


# ---- convert ----------------------------------------------------------------------------------
@torch.no_grad()
def convert(model: nn.Module, inplace: bool = False, freeze: bool = True) -> nn.Module:
    """Fold weight fake quant into the weights and remove the weight quantizers.

    Each weight becomes its fake-quantized value (on the integer grid) computed by its quantizer
    in its current state (a quantizer that never observed observes the weight once first).
    Activation quantizers stay; with ``freeze`` their observers are turned off so that the
    converted model computes exactly what the fake-quant model computes in eval mode with frozen
    observers.
    """
    if not inplace:
        model = copy.deepcopy(model)
    folded: set[int] = set()
    for name, module in list(quant_layers(model)):
        pairs = list(module.weight_quantizers().items())
        for pname, q in pairs:
            w = getattr(module, pname)
            if id(w) in folded:
                warnings.warn(f"{name}.{pname} is shared with another quantized module and was "
                              "already folded; it is folded again", stacklevel=2)
            observing = q.is_observing
            q.enable_observer(observing and int(q.observer.count) == 0)
            w.copy_(q(w.detach()))
            q.enable_observer(observing)
            folded.add(id(w))
        if pairs:
            module.drop_weight_quantizers()
    if freeze:
        for _, q in model.named_modules():
            if isinstance(q, FakeQuantizer):
                q.enable_observer(False)
    return model
