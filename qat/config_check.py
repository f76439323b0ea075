"""Early validation of a composed config: one clear error naming the key, before any data.

:func:`check_config` checks every group qat-train instantiates: each ``_target_`` imports, its
keys are arguments of the target (with the allowed ones listed otherwise), required arguments
are present, and the values the cheap constructors validate (quantizer specs, data settings,
sparsity schedules) are valid. :func:`check_checkpoint` checks a checkpoint file (readable with
``weights_only=True``, holds a ``state_dict``, fits the model).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from .callbacks.quantization import _to_plain as _plain

__all__ = ["check_config", "check_checkpoint", "check_ckpt_paths", "ConfigError"]

GROUPS = ("data", "model", "quant", "distill", "prune", "optimizer", "scheduler", "trainer",
          "logger")
REQUIRED = ("data", "model", "trainer", "optimizer")
# arguments qat-train passes itself, so the config need not hold them
SUPPLIED = {
    "trainer": {"callbacks", "logger", "default_root_dir", "enable_checkpointing", "max_epochs"},
    "logger": {"save_dir"},
}
PRECISIONS = ("64-true", "64", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16",
              "16-true", "bf16-true", "transformer-engine", "transformer-engine-float16")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")


class ConfigError(ValueError):
    """A config key holds a value that is not allowed."""


# ---- helpers ---
def _upstream_ref(value: Any) -> bool:
    """``init_from=recipe:<name>``: a float recipe's run, not a file (see qat.upstream)."""
    from .upstream import PREFIX

    return isinstance(value, str) and value.startswith(PREFIX)


def _prefixed(where: str, err: BaseException, keys: Any = ()) -> str:
    """``err``'s message under config key ``where``: ``where.key=...`` when the message starts
    with one of ``keys``, else ``where: message``."""
    msg = str(err).strip("'\"") if isinstance(err, KeyError) else str(err)
    head = re.match(r"([A-Za-z_]\w*)", msg)
    if head and head.group(1) in set(keys) and not msg.startswith(f"{where}."):
        return f"{where}.{msg}"
    if msg.startswith(f"{where}.") or msg.startswith(f"{where}:"):
        return msg
    return f"{where}: {msg}"


def _int(cfg: DictConfig, key: str, low: int = 0) -> None:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ConfigError(f"{key}={v!r} is invalid: allowed an integer >= {low}")


def _target(node: Any) -> Any:
    from hydra.utils import get_object

    return get_object(node["_target_"])


def _params(obj: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """Named parameters of a class's constructor or a function, and whether it takes **kwargs."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature: accept anything
        return {}, True
    params = {n: p for n, p in sig.parameters.items()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"}
    return params, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


# ---- generic: targets, unknown keys, required keys ---
def _check_node(node: Any, where: str, supplied: set[str] = frozenset()) -> None:
    """A ``_target_`` node: the target imports, every key is one of its arguments, required
    arguments are given (unless ``_partial_``); nested ``_target_`` nodes likewise."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            _check_node(item, f"{where}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    if "_target_" in node:
        try:
            obj = _target(node)
        except Exception as err:  # noqa: BLE001 - any import failure is a bad target name
            raise ConfigError(f"{where}._target_={node['_target_']!r} cannot be imported: "
                              f"{str(err).splitlines()[0]}") from None
        params, var_kw = _params(obj)
        keys = [k for k in node if not str(k).startswith("_")]
        if not var_kw:
            for k in keys:
                if k not in params:
                    raise ConfigError(f"{where}: unknown key {k!r} for {node['_target_']}: allowed "
                                      f"{sorted(params)}")
        if not node.get("_partial_", False):
            for name, p in params.items():
                if p.default is not p.empty or name in supplied:
                    continue
                if name not in node:
                    raise ConfigError(f"{where}: missing required key {name!r} for "
                                      f"{node['_target_']}")
                if OmegaConf.is_missing(node, name) or node[name] is None:
                    raise ConfigError(f"{where}.{name} is required by {node['_target_']}: "
                                      "got no value")
    for k in node:
        if OmegaConf.is_missing(node, k) and k not in supplied:
            raise ConfigError(f"{where}.{k} is missing (???): set it, e.g. {where}.{k}=<value>")
        if not str(k).startswith("_") and not OmegaConf.is_missing(node, k):
            child = node._get_node(k)
            if isinstance(child, DictConfig | ListConfig):
                _check_node(child, f"{where}.{k}")


def _groups(cfg: DictConfig) -> list[tuple[str, DictConfig, set[str]]]:
    out = []
    for group in GROUPS:
        node = cfg.get(group)
        if isinstance(node, DictConfig) and "_target_" in node:
            out.append((group, node, SUPPLIED.get(group, set())))
    for name, node in (cfg.get("callbacks") or {}).items():
        if isinstance(node, DictConfig) and "_target_" in node:
            out.append((f"callbacks.{name}", node, {"dirpath", "monitor"}))
    return out


def _construct(node: DictConfig, where: str, drop: tuple[str, ...] = ()) -> Any:
    """Build a cheap, side-effect-free target from ``node``; its ValueError names the key."""
    kwargs = {k: v for k, v in _plain(node).items() if not k.startswith("_") and k not in drop}
    try:
        return _target(node)(**kwargs)
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(_prefixed(where, err, kwargs)) from None


def _is(node: DictConfig, qualname: str) -> bool:
    try:
        cls = _target(node)
    except Exception:  # noqa: BLE001 - reported by _check_node
        return False
    return inspect.isclass(cls) and any(
        f"{c.__module__}.{c.__qualname__}".endswith(qualname) for c in cls.__mro__)


# ---- groups ---
def _check_data(node: DictConfig) -> None:
    from .data.tasks import GLUE_TASKS, get_task

    if _is(node, "GlueDataModule"):
        task = node.get("task")
        try:
            info = get_task(task)
        except ValueError:
            info = None
        if info is None or not info.is_glue:
            raise ConfigError(f"data.task={task!r} is invalid: allowed GLUE tasks "
                              f"{list(GLUE_TASKS)}")
    _construct(node, "data")  # validates sizes, fractions, the tokenizer name; reads no data


def _check_quant(node: DictConfig) -> None:
    from .surgery import QATConfig

    plain = _plain(node)
    if plain.get("mode", "qat") != "fp32":
        keys = ("weight", "activation", "output", "attention", "overrides", "skip",
                "share_inputs")
        try:
            qc = QATConfig.from_dict({k: plain[k] for k in keys if k in plain})
        except (ValueError, TypeError) as err:
            raise ConfigError(_prefixed("quant", err, keys)) from None
        w = qc.weight
        if w is not None and w.granularity == "channel" and not -2 <= w.axis <= 1:
            raise ConfigError(f"quant.weight.axis={w.axis} is invalid for per-channel weights: "
                              "allowed 0 (output channels), 1, -1 or -2 (weights are 2-D or 3-D)")
        for role in ("activation", "output"):
            spec = getattr(qc, role)
            if spec is not None and spec.granularity != "tensor":
                raise ConfigError(
                    f"quant.{role}.granularity={spec.granularity!r} is invalid: allowed 'tensor' "
                    "(per-channel activations exist only as LSTM slots: quant.overrides)")
    if _is(node, "QuantizationCallback"):
        _construct(node, "quant")


def _check_prune(node: DictConfig) -> None:
    from .prune import CRITERIA, NORMS, SCOPES, STRUCTURES, make_schedule

    plain = _plain(node)
    schedule = None
    if "schedule" in plain:
        try:
            schedule = make_schedule(plain["schedule"], total_steps=1000)  # fractions: any length
        except (ValueError, TypeError) as err:
            raise ConfigError(_prefixed("prune.schedule", err)) from None
        sched = plain["schedule"] if isinstance(plain["schedule"], dict) else {}
        last = "start_fraction" if sched.get("kind") == "one_shot" else "end_fraction"
        if isinstance(sched.get(last), int | float) and sched[last] >= 1.0:
            raise ConfigError(
                f"prune.schedule.{last}={sched[last]!r} is invalid: the final sparsity would come "
                "only after the last optimizer step, so no epoch would hold the pruned model "
                "(best.ckpt is an epoch at the final sparsity): allowed < 1")
    for key, allowed in (("scope", SCOPES), ("structure", STRUCTURES), ("norm", NORMS),
                         ("criterion", CRITERIA)):
        if key in plain and plain[key] not in allowed:
            raise ConfigError(f"prune.{key}={plain[key]!r} is invalid: allowed {list(allowed)}")
    if plain.get("criterion") == "movement":
        if plain.get("structure", "unstructured") != "unstructured":
            raise ConfigError(f"prune.criterion='movement' cannot be combined with "
                              f"prune.structure={plain['structure']!r}: movement scores rank "
                              "single weights (allowed structure 'unstructured')")
        if schedule is not None and schedule(0) > 0:
            raise ConfigError("prune.criterion='movement' is invalid with a schedule that prunes "
                              "at step 0: no optimizer step would have scored the weights yet "
                              "(set prune.schedule.start_step or start_fraction > 0)")
    if "targets" in plain and not plain["targets"]:
        raise ConfigError("prune.targets=[] is invalid: allowed a non-empty list of module "
                          "types or name patterns")
    if _is(node, "PruningCallback"):
        _construct(node, "prune")


def _check_pruned_quant(node: DictConfig) -> None:
    """Pruned weights must stay exactly zero after fake quant: binary weights cannot."""
    plain = _plain(node)
    if plain.get("mode", "qat") == "fp32":
        return
    specs = [("quant.weight", plain.get("weight"))]
    for pattern, rule in _override_items(plain.get("overrides")):
        if isinstance(rule, Mapping):
            specs.append((f"quant.overrides[{pattern!r}].weight", rule.get("weight")))
    for key, spec in specs:
        if isinstance(spec, Mapping) and spec.get("mode") == "binary":
            raise ConfigError(f"{key}.mode='binary' cannot be combined with pruning (prune is "
                              "set): binary weights have no zero (sign(0) = +1), so pruned "
                              "weights would come back as +alpha: allowed mode 'ternary' or "
                              "'int', or prune=none")


def _override_items(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        return list(value.items())
    out = []
    for item in value or ():
        if isinstance(item, Mapping) and "pattern" in item:
            out.append((item["pattern"], item))
        elif isinstance(item, list | tuple) and len(item) == 2:
            out.append((item[0], item[1]))
    return out


def _check_distill(cfg: DictConfig, node: DictConfig) -> None:
    if "teacher" not in node or OmegaConf.is_missing(node, "teacher") or node.teacher is None:
        raise ConfigError("distill.teacher is missing: knowledge distillation needs a teacher: "
                          "allowed 'float_stage' (with baseline_epochs > 0 or init_from) or a "
                          "checkpoint path; or use distill=none")
    teacher = node.teacher
    if teacher == "float_stage":
        if cfg.get("baseline_epochs", 0) <= 0 and not cfg.get("init_from"):
            raise ConfigError("distill.teacher='float_stage' needs a float stage: set "
                              "baseline_epochs > 0 or init_from, or give a teacher checkpoint")
    elif isinstance(teacher, str):
        check_checkpoint(teacher, "distill.teacher", raw_ok=True)
    if _is(node, "KDConfig"):
        _construct(node, "distill")


def _check_scalars(cfg: DictConfig) -> None:
    _int(cfg, "seed")
    _int(cfg, "baseline_epochs")
    tr = cfg.trainer
    epochs = tr.get("max_epochs")
    if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool)
                               or epochs < 1):
        raise ConfigError(f"trainer.max_epochs={epochs!r} is invalid: allowed an integer >= 1")
    prec = tr.get("precision")
    if prec is not None and str(prec) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={prec!r} is invalid: allowed {list(PRECISIONS)}")
    acc = tr.get("accelerator")
    if isinstance(acc, str) and acc not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={acc!r} is invalid: allowed {list(ACCELERATORS)}")
    opt = cfg.optimizer
    lr = opt.get("lr")
    if lr is not None and (not isinstance(lr, int | float) or isinstance(lr, bool) or lr <= 0):
        raise ConfigError(f"optimizer.lr={lr!r} is invalid: allowed a number > 0")
    sched = cfg.get("scheduler")
    if sched and sched.get("warmup_ratio") is not None:
        r = sched.warmup_ratio
        if not isinstance(r, int | float) or not 0.0 <= r < 1.0:
            raise ConfigError(f"scheduler.warmup_ratio={r!r} is invalid: allowed [0, 1)")
    for name, node in (cfg.get("callbacks") or {}).items():
        if isinstance(node, DictConfig) and node.get("every_n_train_steps") is not None:
            n = node.every_n_train_steps
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ConfigError(f"callbacks.{name}.every_n_train_steps={n!r} is invalid: "
                                  "allowed an integer >= 0 (0: off) or null")
    path = cfg.get("init_from")
    if _upstream_ref(path):
        from .configs import config_dir

        names = sorted(p.stem for p in (config_dir() / "recipe").glob("*.yaml"))
        if path.split(":", 1)[1] not in names:
            raise ConfigError(f"init_from={path!r}: no such recipe: allowed recipe:<name> with "
                              f"<name> one of {', '.join(names)}")
    if path is not None and not _upstream_ref(path) and not Path(str(path)).is_file():
        raise FileNotFoundError(f"init_from={path!r}: no such file (or recipe:<float recipe>)")
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and ckpt != "last" and not Path(str(ckpt)).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt!r}: no such file (or `last` for this run "
                                "directory's last checkpoint)")


def check_config(cfg: DictConfig) -> None:
    """Validate the groups qat-train uses; raises :class:`ConfigError` naming the key."""
    for group in REQUIRED:
        node = cfg.get(group)
        if not node or "_target_" not in node:
            raise ConfigError(f"{group}: missing or has no _target_ (pick one of conf/{group}/)")
    for where, node, supplied in _groups(cfg):
        _check_node(node, where, supplied)
    _check_scalars(cfg)
    _check_data(cfg.data)
    if cfg.get("quant"):
        _check_quant(cfg.quant)
    if cfg.get("prune") and "_target_" in cfg.prune:
        _check_prune(cfg.prune)
    if cfg.get("distill") and "_target_" in cfg.distill:
        _check_distill(cfg, cfg.distill)
    if cfg.get("quant") and cfg.get("prune") and "_target_" in cfg.prune:
        _check_pruned_quant(cfg.quant)


# ---- checkpoints ---
def check_checkpoint(path: str | Path, key: str, model: Any = None, prefix: str = "model.",
                     raw_ok: bool = False, complete: bool = True,
                     lightning: bool = False) -> dict[str, Any]:
    """Load ``path``'s state_dict with ``weights_only=True``; raise ValueError naming ``key``
    if the file is unreadable, holds no state_dict (a bare one only with ``raw_ok``), is not a
    Lightning checkpoint (with ``lightning``: to resume or evaluate) or does not fit ``model``
    (keys ``prefix + name``: a missing key with ``complete``, or no key at all, or a shape
    mismatch). Returns the state_dict with ``prefix`` stripped."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - truncated, random bytes, unsafe pickle, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{key}={str(path)!r} is not a readable checkpoint (weights_only "
                         f"load failed: {first})") from None
    state = obj.get("state_dict") if isinstance(obj, Mapping) else None
    if state is None and raw_ok and isinstance(obj, Mapping) and obj and all(
            isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    if not isinstance(state, Mapping):
        have = sorted(obj)[:6] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{key}={str(path)!r} holds no 'state_dict' (found {have}): allowed a "
                         "checkpoint written by qat-train / Lightning")
    if lightning and "pytorch-lightning_version" not in obj:
        raise ValueError(f"{key}={str(path)!r} is not a Lightning checkpoint (no "
                         "'pytorch-lightning_version'): allowed a checkpoint written by qat-train")
    has_prefix = any(k.startswith(prefix) for k in state)
    state = {k.removeprefix(prefix): v for k, v in state.items()
             if k.startswith(prefix) or not has_prefix}
    if model is not None:
        _check_fit(state, model, key, path, complete)
    return state


def _check_fit(state: Mapping[str, Any], model: Any, key: str, path: Path,
               complete: bool) -> None:
    own = model.state_dict()
    shared = [k for k in own if k in state]
    if not shared:
        raise ValueError(f"{key}={str(path)!r} is a checkpoint of another model: none of this "
                         f"model's {len(own)} weights is in it (e.g. {list(own)[:2]})")
    for k in shared:
        a, b = tuple(state[k].shape), tuple(own[k].shape)
        if a != b:
            raise ValueError(f"{key}={str(path)!r} does not fit this model: {k} has shape {a} in "
                             f"the checkpoint, {b} in the model (another model, task or "
                             "vocabulary?)")
    # an embedding that quantization bands (qat.auto.bands) is stored as its bands
    missing = [k for k in own if k not in state
               and not (k.endswith(".weight") and f"{k[:-7]}.bands.0.weight" in state)]
    if complete and missing:
        raise ValueError(f"{key}={str(path)!r} does not fit this model: {len(missing)} weights "
                         f"missing, e.g. {missing[:3]}")


def _check_resumable(path: str | Path) -> None:
    """A checkpoint to resume from holds the training state, not only the weights (Lightning's
    weights-only checkpoints, as best.ckpt: training loops saved, optimizer state not)."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if "loops" in obj and "optimizer_states" not in obj:
        raise ConfigError(
            f"ckpt_path={str(path)!r} holds model weights only (as best.ckpt does), not the "
            "training state to resume: resume from the run's last.ckpt (run_id=<id> "
            "ckpt_path=last), or start a new run from these weights with init_from=<path>")


def check_ckpt_paths(cfg: DictConfig, out: Path) -> None:
    """Before any data: ``ckpt_path`` (``last``: this run's, or its float stage's, last
    checkpoint must exist) and ``init_from`` are readable checkpoints."""
    ckpt = cfg.get("ckpt_path")
    if ckpt == "last":
        cands = [out / "checkpoints" / "last.ckpt"]
        if cfg.get("baseline_epochs", 0) > 0:
            cands.append(out / "float" / "checkpoints" / "last.ckpt")
        found = [p for p in cands if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"ckpt_path=last: no checkpoint at {cands[0]}; pass the run_id of the run to "
                "resume (qat-train ... run_id=<id> ckpt_path=last)")
        for p in found:
            check_checkpoint(p, "ckpt_path", lightning=True)
    elif ckpt is not None:
        check_checkpoint(ckpt, "ckpt_path", lightning=True)
        _check_resumable(ckpt)
    if cfg.get("init_from") and not _upstream_ref(cfg.init_from):
        check_checkpoint(cfg.init_from, "init_from", raw_ok=True)
