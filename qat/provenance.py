"""Where a result comes from: the git commit, the code that decides its numbers, the hardware."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = ["CORE_PATHS", "FEATURE_PATHS", "MODEL_PATHS", "NUMERICS_VERSION", "NEUTRAL",
           "CODE_PATHS", "LEGACY_PATHS", "provenance",
           "numerics_fingerprint", "numerics_parts", "git_commit", "legacy_fingerprint",
           "row_numerics", "row_parts", "features_of", "numerics_config", "command_overrides",
           "settled", "changed_parts", "saved_config", "float_run_dir",
           "config_reason", "stale_reason"]

ROOT = Path(__file__).resolve().parents[1]
# The code that decides a run's numbers (test metrics and sizes). The core runs in every run;
# a feature's code only where the run's config enables it (:func:`features_of`), so a change to
# pruning reruns the pruned rows only. The config decides the rest, row by row: a run is current
# when the code it ran is unchanged and its saved config.yaml equals what its command composes
# now (:func:`numerics_config`), so editing one recipe reruns that recipe's rows only.
# A model family's file (qat/models/<family>.py) runs only in that family's runs: its part is
# ``model:<family>``, so a change to the Transformer reruns the Transformer rows only.
def _family_files() -> dict[str, str]:
    """``model:<name>`` -> the file of that registered model family (:data:`qat.models.MODELS`)."""
    from .models import MODELS

    return {f"model:{name}": cls.__module__.replace(".", "/") + ".py"
            for name, cls in MODELS.items()}


MODEL_PATHS = {part: (path,) for part, path in _family_files().items()}
# every other file of qat/models (shared helpers, the registry) belongs to the core
_SHARED_MODEL_FILES = tuple(
    f"qat/models/{f.name}" for f in sorted((ROOT / "qat" / "models").glob("*.py"))
    if (f"qat/models/{f.name}",) not in MODEL_PATHS.values())
CORE_PATHS = ("qat/quant", "qat/nn", *_SHARED_MODEL_FILES, "qat/data", "qat/lit",
              "qat/callbacks", "qat/export/qweight.py", "qat/export/sparse.py", "qat/surgery.py",
              "qat/summary.py", "qat/train.py", "qat/upstream.py")
FEATURE_PATHS = {"distill": ("qat/distill",), "prune": ("qat/prune",), "auto": ("qat/auto",),
                 **MODEL_PATHS}
# the whole numerics code (:func:`numerics_fingerprint`): the parts together (git lists files
# in tree order whatever the order of the paths, so this hashes as numerics_version 2 did)
CODE_PATHS = CORE_PATHS + tuple(p for ps in FEATURE_PATHS.values() for p in ps)
# what fingerprints of results.json files without ``numerics_version`` hashed (configs included)
LEGACY_PATHS = ("qat/quant", "qat/nn", "qat/models", "qat/data", "qat/prune", "qat/distill",
                "qat/lit", "qat/callbacks", "qat/autoquant", "qat/surgery.py", "qat/train.py",
                "qat/upstream.py", "conf", "recipes")
NUMERICS_VERSION = 3  # 3: model families are parts of their own
# Changes to numerics code that leave every number as it was, each checked with
# ``python scripts/check_neutral.py --base <commit before>`` (the same small runs of every model
# family and feature, bit for bit, before and after): a run made by the code before counts as
# made by the code after. part -> {fingerprint before: fingerprint after}.
NEUTRAL: dict[str, dict[str, str]] = {
    # 420dbf2: under DDP only rank 0 writes results.json (all 9 cases the same);
    # 91c29a1: best.ckpt through BestCheckpoint, no schedule gates it yet (all 10 the same);
    # 5ffc5d1, strided views: the one-pass CPU fake-quant kernel (all 10 the same);
    # the kernel's two calls behind one body (all 10 the same);
    # f1b0f87: StepTimer synchronizes a CUDA module's device (CPU runs untouched; all 10 the same);
    # ac9807d: a failed kernel build is recorded (all 10 the same)
    "core": {"69fb3b36ba53": "22d58a7a6fce", "22d58a7a6fce": "f9ced9e81fb0",
             "f9ced9e81fb0": "80e6d8ce704a", "80e6d8ce704a": "ebb0b1e283ab",
             "ebb0b1e283ab": "090217f82feb", "090217f82feb": "c38fd7657e17"},
    # ea5a641: prune.exclude, empty by default (all 10 the same);
    # 2f35942: prune.exclude matched through match_modules (all 10 the same)
    "prune": {"7eb4846b1405": "aeb6ac5559b1", "aeb6ac5559b1": "a252808301fc",
              # 15cbcd6: movement scores beside magnitude (magnitude's masks bit for bit)
              "a252808301fc": "83f158a43d1d", "83f158a43d1d": "12c0ab0354e5",
              # 97d945b: movement with the whole gradient, a pruned weight's value kept aside
              "12c0ab0354e5": "861f7745c467",
              "861f7745c467": "92fdc683d247",  # c3cde3e: movement scores take Adam steps
              "92fdc683d247": "8585e094f12e",  # cfc8b4a: docstrings
              "8585e094f12e": "9ebda72d1fdf"},  # bd4cc2b: layer_groups' exclude
    # 7dfe295: mean pooling through common.masked_mean (both MiniLM cases the same)
    "model:pretrained": {"bacfae9f8fc4": "cdbb88a9b2e9"},
}
# Config values changed with every number kept (checked like NEUTRAL): key -> {before: after};
# a saved config with the value before compares as one with the value after.
NEUTRAL_CONFIG: dict[str, dict[str, str]] = {
    # best.ckpt among final models only: the same epochs where no schedule moves the model
    "callbacks.model_checkpoint._target_": {
        "lightning.pytorch.callbacks.ModelCheckpoint": "qat.callbacks.BestCheckpoint"},
}
# config keys added later whose default changes no number: dropped at that value, so runs
# saved before the key existed compare equal
NEUTRAL_DEFAULTS: dict[str, Any] = {"prune.exclude": [], "prune.criterion": "magnitude"}
# config keys that do not change a number: where files go, how progress shows, what runs after
_NOT_NUMERICS = ("ckpt_path", "run_id", "name", "paths", "logger", "test", "predict", "hydra",
                 "data.data_dir", "trainer.enable_progress_bar", "trainer.enable_model_summary",
                 "callbacks.progress_bar")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def git_commit() -> str | None:
    """HEAD's commit, with ``+dirty`` when tracked files differ from it (None outside git;
    ``QAT_COMMIT`` names it for a copy of the tree without .git)."""
    if os.environ.get("QAT_COMMIT"):
        return os.environ["QAT_COMMIT"]
    head = _git("rev-parse", "HEAD")
    if head is None:
        return None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return head.strip() + ("+dirty" if dirty else "")


def _tree_hash(rev: str, paths: tuple[str, ...]) -> str | None:
    """A hash of ``paths`` as committed in ``rev`` (plus uncommitted changes when rev is HEAD)."""
    if rev != "HEAD":
        return _committed_tree_hash(rev, paths)
    tree = _git("ls-tree", "-r", rev, "--", *paths)
    if tree is None:
        return None
    diff = _git("diff", "HEAD", "--", *paths) or ""
    return hashlib.sha1((tree + diff).encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=256)
def _committed_tree_hash(rev: str, paths: tuple[str, ...]) -> str | None:
    """:func:`_tree_hash` of a commit, which never changes: the report asks it per run."""
    tree = _git("ls-tree", "-r", rev, "--", *paths)
    return None if tree is None else hashlib.sha1(tree.encode()).hexdigest()[:12]


def numerics_fingerprint(rev: str = "HEAD") -> str | None:
    """A hash of :data:`CODE_PATHS` in ``rev`` (HEAD: with uncommitted changes): equal
    fingerprints mean the same code decided the numbers (``QAT_NUMERICS`` gives it for a copy of
    the tree without .git)."""
    if rev == "HEAD" and os.environ.get("QAT_NUMERICS"):
        return os.environ["QAT_NUMERICS"]
    return _tree_hash(rev, CODE_PATHS)


def numerics_parts(rev: str = "HEAD") -> dict[str, str | None]:
    """Fingerprints of the core numerics code and of each feature's code (:data:`FEATURE_PATHS`)
    in ``rev``."""
    parts = {"core": _tree_hash(rev, CORE_PATHS)}
    parts.update({name: _tree_hash(rev, paths) for name, paths in FEATURE_PATHS.items()})
    return parts


def features_of(cfg: dict[str, Any]) -> list[str]:
    """The features (:data:`FEATURE_PATHS`) whose code a run with this config runs."""
    out = []
    if "_target_" in (cfg.get("distill") or {}):
        out.append("distill")
    if "_target_" in (cfg.get("prune") or {}):
        out.append("prune")
    if "AutoQuant" in str((cfg.get("quant") or {}).get("_target_", "")):
        out.append("auto")
    return out + _model_parts(str((cfg.get("model") or {}).get("_target_", "")))


def _model_parts(target: str) -> list[str]:
    """The ``model:<family>`` part of a model ``_target_`` (every family's when a qat.models
    target cannot be resolved; none for a model from elsewhere)."""
    if not target.startswith("qat.models"):
        return []
    import importlib

    module, _, attr = target.rpartition(".")
    try:
        path = getattr(importlib.import_module(module), attr).__module__.replace(".", "/")
    except (ImportError, AttributeError, ValueError):
        return list(MODEL_PATHS)
    parts = [part for part, paths in MODEL_PATHS.items() if paths == (f"{path}.py",)]
    return parts or list(MODEL_PATHS)


def legacy_fingerprint(rev: str = "HEAD") -> str | None:
    """What :func:`numerics_fingerprint` hashed before ``numerics_version`` 2
    (:data:`LEGACY_PATHS`, configs included): to recognise runs stamped with it."""
    return _tree_hash(rev, LEGACY_PATHS)


def _proven_commit(results: dict[str, Any]) -> str | None:
    """The commit whose numerics code made ``results``, when its recorded fingerprint (of its
    ``numerics_version``) matches that commit's; None when that cannot be shown."""
    commit = str(results.get("commit") or "").removesuffix("+dirty")
    if not commit or not results.get("numerics"):
        return None
    of_commit = (numerics_fingerprint(commit) if (results.get("numerics_version") or 0) >= 2
                 else legacy_fingerprint(commit))
    return commit if of_commit == results["numerics"] else None


def row_numerics(results: dict[str, Any]) -> str | None:
    """The code fingerprint a results.json was made with; for one written before
    ``numerics_version`` 2, derived from its commit when its recorded (legacy) fingerprint proves
    the numerics code was that commit's; None when that cannot be shown."""
    if (results.get("numerics_version") or 0) >= 2:  # the whole-code hash is version 2's
        return results.get("numerics")
    commit = _proven_commit(results)
    return None if commit is None else numerics_fingerprint(commit)


def row_parts(results: dict[str, Any]) -> dict[str, str | None] | None:
    """The fingerprints of the code parts a results.json was made with (:func:`numerics_parts`):
    recorded (parts as this version defines them), or derived from its commit when its
    fingerprint proves the code was that commit's; None when that cannot be shown."""
    if results.get("numerics_parts") and results.get("numerics_version") == NUMERICS_VERSION:
        return results["numerics_parts"]
    commit = _proven_commit(results)
    return None if commit is None else numerics_parts(commit)


def numerics_config(cfg: Any) -> dict[str, Any]:
    """A resolved config (dict or DictConfig) without the keys that do not change a number
    (paths, logging, progress, run names, checkpoint folders): compare two of these to tell
    whether a saved run is the run its command makes now."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):  # resolved as qat.train saves config.yaml, Hydra keys out
        plain = OmegaConf.to_container(cfg, resolve=False)
        plain.pop("hydra", None)
        try:
            cfg = OmegaConf.to_container(OmegaConf.create(plain), resolve=True,
                                         throw_on_missing=False)
        except Exception:  # an interpolation that needs Hydra's runtime: kept as written
            cfg = plain
    out = copy.deepcopy(dict(cfg))
    for key in _NOT_NUMERICS:
        node, leaf = _parent(out, key)
        if node is not None:
            node.pop(leaf, None)
    for cb in (out.get("callbacks") or {}).values():
        if isinstance(cb, dict):
            cb.pop("dirpath", None)
    for key, default in NEUTRAL_DEFAULTS.items():
        node, leaf = _parent(out, key)
        if node is not None and leaf in node and node[leaf] == default:
            node.pop(leaf)
    for key, renames in NEUTRAL_CONFIG.items():
        node, leaf = _parent(out, key)
        if node is not None and isinstance(node.get(leaf), str):
            node[leaf] = renames.get(node[leaf], node[leaf])
    return out


def _parent(cfg: dict[str, Any], key: str) -> tuple[dict[str, Any] | None, str]:
    """The mapping that holds dotted ``key`` in ``cfg`` (None if there is none) and its leaf."""
    *parents, leaf = key.split(".")
    node: Any = cfg
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), leaf


def command_overrides(command: str) -> list[str] | None:
    """The overrides of a ``qat-train ...`` command as results.json records it (values with
    spaces, such as ``+quant.overrides={a: 1}``, kept whole); None for other commands."""
    head, _, rest = command.strip().partition(" ")
    if head != "qat-train":
        return None
    parts = re.split(r" (?=[+~]{0,2}[\w./-]+=)", rest.strip())
    return [p for p in parts if p and not p.startswith("ckpt_path=")]


def _plain(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(OmegaConf.create(cfg))
    return OmegaConf.to_container(OmegaConf.create(text), resolve=False)


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k, "<absent>") != b.get(k, "<absent>"):
                return _first_difference(a.get(k, "<absent>"), b.get(k, "<absent>"),
                                         f"{where}.{k}" if where else str(k))
    return f"{where}: {a!r} -> {b!r}"


def saved_config(run: Path) -> dict[str, Any] | None:
    """The config a run saved: its config.yaml, else (an archived copy made by
    scripts/report.py) the one inside its results.json."""
    from omegaconf import OmegaConf

    path = Path(run) / "config.yaml"
    if path.is_file():
        return OmegaConf.to_container(OmegaConf.load(path))
    try:
        return json.loads((Path(run) / "results.json").read_text()).get("config") or None
    except (OSError, json.JSONDecodeError):
        return None


def config_reason(run: Path, overrides: list[str], _cache: dict | None = None,
                  saved_cfg: dict[str, Any] | None = None) -> str | None:
    """Why the config saved in ``run`` (or ``saved_cfg``, already read from it) is not what
    ``qat-train <overrides>`` composes to now, in its numbers (:func:`numerics_config`); None
    when it is (or when none was saved)."""
    from .configs import compose_train

    saved_cfg = saved_cfg or saved_config(run)
    if not saved_cfg:
        return None
    cache = {} if _cache is None else _cache
    key = tuple(overrides)
    if key not in cache:
        try:
            cache[key] = _plain(numerics_config(compose_train(list(overrides))))
        except Exception as err:  # a recipe or key that no longer exists
            cache[key] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    now = cache[key]
    if isinstance(now, str):
        return f"its command no longer composes ({now})"
    saved = _plain(numerics_config(saved_cfg))
    if saved != now:
        return f"config changed since: {_first_difference(saved, now)}"
    return None


def settled(part: str, fingerprint: str | None) -> str | None:
    """The fingerprint that ``part``'s code at ``fingerprint`` became through changes that
    left its numbers as they were (:data:`NEUTRAL`, followed to its end)."""
    seen: set[str | None] = set()
    while fingerprint in NEUTRAL.get(part, {}) and fingerprint not in seen:
        seen.add(fingerprint)
        fingerprint = NEUTRAL[part][fingerprint]
    return fingerprint


def changed_parts(made: dict[str, str | None], current: dict[str, str | None],
                  cfg: dict[str, Any]) -> list[str]:
    """The code parts that a run with config ``cfg`` runs (the core and :func:`features_of`)
    whose fingerprint ``made`` (its code) differs from ``current`` other than by :data:`NEUTRAL`
    changes; empty when the same code would make the same numbers."""
    used = ["core", *features_of(cfg)]
    return [k for k in used if settled(k, made.get(k)) != current.get(k)]


def float_run_dir(run: Path, results: dict[str, Any]) -> Path | None:
    """The folder of the float run that the run in ``run`` started from (its ``float_run``):
    where it ran, else its archived copy beside this run (``<root>/<recipe>/<run id>``); None
    when it started from none, or neither holds a results.json."""
    up = results.get("float_run") or {}
    if not up.get("run_dir"):
        return None
    where = Path(up["run_dir"])
    recipe = str(up.get("recipe") or where.parent.name)
    for cand in (where, Path(run).parent.parent / recipe / where.name):
        if (cand / "results.json").is_file():
            return cand
    return None


def stale_reason(run: Path, current: dict[str, str | None] | None = None,
                 overrides: list[str] | None = None, _cache: dict | None = None) -> str | None:
    """Why the results.json in ``run`` is not what the current code makes (None: it is): code it
    ran (the core, and the features its config enables) that changed since (``current``:
    :func:`numerics_parts` of now), a saved config that differs from what its command
    (``overrides``, else the one results.json records) composes to now, or a float run
    (``init_from``) that is stale itself or was redone after it."""
    cache = {} if _cache is None else _cache
    if current is None:
        current = cache.setdefault("__parts__", numerics_parts())
    res = Path(run) / "results.json"
    try:
        results = json.loads(res.read_text())
    except (OSError, json.JSONDecodeError):
        return f"no readable {res}"
    commit = str(results.get("commit") or "?")[:10]
    parts = row_parts(results)
    if parts is None:
        return f"numerics code unknown (commit {commit})"
    saved_cfg = saved_config(run)
    changed = changed_parts(parts, current, saved_cfg or {})
    if changed:
        return f"numerics code changed since commit {commit}: {', '.join(changed)}"
    if overrides is None:
        overrides = command_overrides(str(results.get("command") or ""))
    if overrides is not None:
        why = config_reason(Path(run), overrides, cache, saved_cfg)
        if why:
            return why
    up = float_run_dir(Path(run), results)
    if up is not None:
        original = (up / "config.yaml").is_file() and (Path(run) / "config.yaml").is_file()
        if original and (up / "results.json").stat().st_mtime > res.stat().st_mtime:
            return f"its float run {up} was redone after it"
        try:  # the float result it started from (copied at its start) is not the float run's now
            now = (json.loads((up / "results.json").read_text()).get("stages") or {}).get("fp32")
        except (OSError, json.JSONDecodeError):
            now = None
        was = (results.get("stages") or {}).get("fp32")
        if was and now and was != now:
            return f"its float run {up} was redone after it (float result changed)"
        why = stale_reason(up, current, None, cache)
        if why:
            return f"its float run is stale ({why})"
    return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict[str, Any]:
    """Commit, numerics fingerprint, hardware and library versions, for results.json."""
    hw: dict[str, Any] = {"cpu": _cpu_name(), "cpu_count": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "machine": platform.machine()}
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
    return {"commit": git_commit(), "numerics": numerics_fingerprint(),
            "numerics_parts": numerics_parts(), "numerics_version": NUMERICS_VERSION,
            "hardware": hw,
            "torch": torch.__version__, "python": platform.python_version()}
