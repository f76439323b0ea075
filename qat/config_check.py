"""Early validation of a composed config: one clear error naming the key, before any data."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from .quant import QuantSpec

__all__ = ["check_config", "ConfigError"]


class ConfigError(ValueError):
    """A config key holds a value that is not allowed."""


def _int(cfg: DictConfig, key: str, low: int = 0) -> None:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ConfigError(f"{key}={v!r} is invalid: allowed an integer >= {low}")


def _spec(node: Any, where: str) -> None:
    if node is None:
        return
    try:
        QuantSpec.from_any(dict(node))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None


def check_config(cfg: DictConfig) -> None:
    """Validate the groups qat-train uses; raises :class:`ConfigError` naming the key."""
    for group in ("data", "model", "trainer", "optimizer"):
        node = cfg.get(group)
        if not node or "_target_" not in node:
            raise ConfigError(f"{group}: missing or has no _target_ (pick one of conf/{group}/)")
    _int(cfg, "seed")
    _int(cfg, "baseline_epochs")
    epochs = cfg.trainer.get("max_epochs")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ConfigError(f"trainer.max_epochs={epochs!r} is invalid: allowed an integer >= 1")
    quant = cfg.get("quant")
    if quant:
        for role in ("weight", "activation", "output"):
            _spec(quant.get(role), f"quant.{role}")
        for pattern, rule in (quant.get("overrides") or {}).items():
            for role, node in dict(rule).items():
                _spec(node, f"quant.overrides[{pattern!r}].{role}")
