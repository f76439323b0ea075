"""The chosen formats as a readable ``quant`` config: a top-level spec and name-pattern overrides.

The most common weight format becomes the top-level ``weight`` spec; every other choice is an
override rule in the format of :class:`qat.QATConfig` (and ``conf/quant/*.yaml``) that changes
only the fields that differ (``{weight: {bits: 4}}``). Rules are made as general as they can be
while meaning the same thing: a pattern with numbered parts as ``*`` (``encoder.layer.*.output``)
or a common ancestor covers several layers when every quantizable layer it matches needs the
same change. The result is checked: every layer resolves to its chosen specs, and wrapped layers
whose weights the base config leaves in float stay so.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from torch import nn

from ..nn.base import quant_layers
from ..nn.config import default_act_spec, default_weight_spec
from ..quant.spec import QuantSpec
from ..surgery import QATConfig, _matches
from .layers import Layer

__all__ = ["build_config", "spec_fields", "quant_yaml"]

_DIGITS = re.compile(r"^\d+$")


def _escape(part: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", part)


def spec_fields(spec: QuantSpec | None, default: QuantSpec) -> dict[str, Any] | None:
    """A spec as the mapping a config holds: ``bits`` and every field that differs from
    :class:`QuantSpec`'s or ``default``'s value (the mapping updates ``default``)."""
    if spec is None:
        return None
    plain = QuantSpec()
    out: dict[str, Any] = {"bits": spec.bits}
    for f in fields(QuantSpec):
        v = getattr(spec, f.name)
        if v != getattr(plain, f.name) or v != getattr(default, f.name):
            out[f.name] = v
    return out


def _diff(target: QuantSpec, current: QuantSpec | None) -> dict[str, Any]:
    if current is None:
        return spec_fields(target, QuantSpec()) or {}
    return {f.name: getattr(target, f.name) for f in fields(QuantSpec)
            if getattr(target, f.name) != getattr(current, f.name)}


Target = tuple[QuantSpec, QuantSpec | None]  # weight, activation (None: not chosen)


class _Builder:
    def __init__(self, base: QATConfig, layers: list[Layer], targets: dict[str, Target],
                 model: nn.Module) -> None:
        self.base, self.layers, self.targets = base, layers, targets
        self.user = list(base.overrides)
        self.rules: list[tuple[str, dict[str, Any]]] = []
        self.names = [layer.name for layer in layers]
        self.own_input = {layer.name: layer.input_quant is not None for layer in layers}
        chosen = set(self.names)
        self.float_wrapped = [  # wrapped layers whose weights the base config leaves float
            n for n, m in quant_layers(model) if n not in chosen
            and any(p.dim() > 1 for p in m.parameters(recurse=False))]
        counts = Counter(targets[n][0] for n in self.names)
        most = max(counts.values())
        first = next(targets[n][0] for n in self.names if counts[targets[n][0]] == most)
        self.top = first if base.weight is not None else None  # None: every layer by rule

    def config(self, rules: list[tuple[str, dict[str, Any]]]) -> QATConfig:
        b = self.base
        return QATConfig(weight=self.top, activation=b.activation, output=b.output,
                         attention=b.attention, overrides=self.user + rules, skip=b.skip,
                         share_inputs=b.share_inputs)

    def current(self, cfg: QATConfig, name: str) -> Target:
        lc = cfg.layer_config(name)
        return lc.weight, lc.input if self.own_input[name] else None

    def wanted(self, name: str) -> Target:
        w, a = self.targets[name]
        return w, a if self.own_input[name] else None

    def change(self, cfg: QATConfig, name: str) -> dict[str, Any]:
        (w, a), (cw, ca) = self.wanted(name), self.current(cfg, name)
        rule: dict[str, Any] = {}
        if w != cw:
            rule["weight"] = _diff(w, cw)
        if a is not None and a != ca:
            rule["activation"] = _diff(a, ca)
        return rule

    def keeps_float(self, cfg: QATConfig) -> bool:
        return all((cfg.layer_config(n).weight is None) ==
                   (self.base.layer_config(n).weight is None) for n in self.float_wrapped)

    def patterns(self, todo: list[str]) -> list[str]:
        """Candidate patterns covering the layers in ``todo``: every ancestor prefix, with and
        without numbered parts as ``*``."""
        out: set[str] = set()
        for name in todo:
            parts = name.split(".")
            for d in range(1, len(parts) + 1):
                head = parts[:d]
                out.add(".".join(_escape(p) for p in head))
                if any(_DIGITS.match(p) for p in head):
                    out.add(".".join("*" if _DIGITS.match(p) else _escape(p) for p in head))
        return sorted(out)

    def build(self) -> list[tuple[str, dict[str, Any]]]:
        rules: list[tuple[str, dict[str, Any]]] = []
        while True:
            cfg = self.config(rules)
            todo = [n for n in self.names if self.change(cfg, n)]
            if not todo:
                return rules
            best = None
            for pat in self.patterns(todo):
                hit = [n for n in self.names if _matches(pat, n)]
                if len(hit) < 2 or not set(hit) <= set(todo):
                    continue
                change = self.change(cfg, hit[0])
                if any(self.change(cfg, n) != change or self.current(cfg, n) !=
                       self.current(cfg, hit[0]) for n in hit[1:]):
                    continue
                if not self.keeps_float(self.config(rules + [(pat, change)])):
                    continue
                key = (len(hit), -len(pat))
                if best is None or key > best[0]:
                    best = (key, pat, change)
            if best is None:  # the rest one by one, in model order
                for n in todo:
                    rules.append((_escape_name(n), self.change(self.config(rules), n)))
                return rules
            rules.append((best[1], best[2]))


def _escape_name(name: str) -> str:
    return ".".join(_escape(p) for p in name.split("."))


def _plain_rule(rule: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in rule.items():
        if k == "slots" and not v:
            continue
        out[k] = v.to_dict() if isinstance(v, QuantSpec) else (
            {n: s.to_dict() if isinstance(s, QuantSpec) else s for n, s in v.items()}
            if k == "slots" else v)
    return out


def build_config(base: QATConfig, layers: list[Layer], targets: dict[str, Target],
                 model: nn.Module) -> dict[str, Any]:
    """The :class:`QATConfig` mapping that gives every layer its target (weight, activation)
    specs; raises RuntimeError if the rules cannot say it (a bug)."""
    b = _Builder(base, layers, targets, model)
    rules = b.build()
    cfg = b.config(rules)
    bad = [n for n in b.names if b.change(cfg, n)]
    if bad or not b.keeps_float(cfg):  # fall back to one rule per layer
        rules = []
        for n in b.names:
            change = b.change(b.config(rules), n)
            if change:
                rules.append((_escape_name(n), change))
        cfg = b.config(rules)
        bad = [n for n in b.names if b.change(cfg, n)]
        if bad or not b.keeps_float(cfg):
            raise RuntimeError(f"autoquant: the overrides do not reproduce the choice of {bad[:3]}")
    pairs = [(p, _plain_rule(r)) for p, r in base.overrides] + rules
    patterns = [p for p, _ in pairs]
    overrides: Any = dict(pairs) if len(set(patterns)) == len(patterns) else \
        [{"pattern": p, **r} for p, r in pairs]
    return {
        "weight": spec_fields(b.top, default_weight_spec()),
        "activation": spec_fields(base.activation, default_act_spec()),
        "output": spec_fields(base.output, default_act_spec()),
        "attention": base.attention,
        "overrides": overrides,
        "skip": list(base.skip),
        "share_inputs": base.share_inputs,
    }


def quant_yaml(config: Mapping[str, Any], header: str = "", **callback: Any) -> str:
    """A ``conf/quant/<name>.yaml`` for :class:`qat.callbacks.QuantizationCallback` holding
    ``config`` (and the callback's schedule keys in ``callback``), with ``header`` as comments."""
    import yaml

    node: dict[str, Any] = {"_target_": "qat.callbacks.QuantizationCallback", "mode": "qat"}
    node.update({k: v for k, v in config.items() if not (k == "output" and v is None)})
    node.update(callback)
    text = yaml.safe_dump(node, sort_keys=False, default_flow_style=None, width=100)
    lines = [f"# {ln}" if ln else "#" for ln in header.strip().splitlines()] if header else []
    return "\n".join(lines + [text.rstrip()]) + "\n"
