"""The text of ``qat-train --help``: usage, the recipes and quantization schemes with their
one-line descriptions (the first comment line of each file), the config groups, examples."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["EXAMPLES", "describe_file", "usage"]

EXAMPLES = (
    ("train W8A8 QAT of a BiLSTM on 20 Newsgroups, two QAT epochs",
     "qat-train recipe=20ng_bilstm_w8a8 trainer.max_epochs=2"),
    ("sweep two schemes x two seeds (one folder and one name per job)",
     "qat-train -m recipe=20ng_textcnn_w8a8 quant=w8a8_per_channel,w4a8_per_channel_lsq seed=1,2"),
)
SKIP_GROUPS = ("hydra", "recipe")


def describe_file(path: Path) -> str:
    """The leading comment of a config file on one line, without Hydra's ``@package``
    directive."""
    parts: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text.startswith("#"):
            if text or parts:
                break
            continue
        text = text.lstrip("#").strip()
        if text.startswith("@package"):
            continue
        if not text and parts:
            break
        if text:
            parts.append(text)
    return " ".join(parts)


def _defaults(conf: Path) -> dict[str, str]:
    """Group -> default option, from the defaults list of ``train.yaml``."""
    out = {}
    for m in re.finditer(r"^\s*-\s*([\w/]+):\s*(\S+)\s*$", (conf / "train.yaml").read_text(),
                         re.MULTILINE):
        out[m.group(1)] = m.group(2)
    return out


def _options(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.yaml"))


def _table(rows: list[tuple[str, str]], indent: str = "  ") -> list[str]:
    width = max((len(a) for a, _ in rows), default=0)
    return [f"{indent}{a:<{width}}  {b}".rstrip() for a, b in rows]


def usage(conf: Path) -> str:
    """``qat-train --help`` for the config folder ``conf``."""
    defaults = _defaults(conf)
    recipe = defaults.get("recipe", "")
    lines = [
        "qat-train: quantization-aware training of text models. Trains a recipe (float, QAT or",
        "PTQ), tests it, and writes its config, checkpoints, logs and results.json under",
        "outputs/<recipe>/<run_id>/.",
        "",
        "usage: qat-train [recipe=<name>] [<group>=<option> ...] [<key>=<value> ...]",
        "       qat-train -m <key>=<a>,<b> ...    sweep: one job per combination",
        "       qat-train [overrides] --cfg job   print the composed config and exit",
        "       qat-train --hydra-help            Hydra's own flags (--info, --multirun, ...)",
        "",
        f"recipes (recipe=<name>; default {recipe}):",
        *_table([(p.stem, describe_file(p)) for p in _options(conf / "recipe")]),
        "",
        f"quantization schemes (quant=<option>; a recipe sets its own; default "
        f"{defaults.get('quant', '')}):",
        *_table([(p.stem, describe_file(p)) for p in _options(conf / "quant")]),
        "",
        "other config groups (<group>=<option>):",
    ]
    groups = [d for d in sorted(conf.iterdir()) if d.is_dir() and d.name not in SKIP_GROUPS
              and d.name != "quant"]
    lines += _table([(f"{d.name}:", ", ".join(p.stem for p in _options(d))) for d in groups])
    lines += [
        "",
        "any config key: <key>=<value> (trainer.max_epochs=2, data.batch_size=16, seed=1);",
        "a key the config does not hold: +<key>=<value>",
        "",
        "examples:",
    ]
    for what, cmd in EXAMPLES:
        lines += [f"  # {what}", f"  {cmd}"]
    lines += [
        "",
        "environment: QAT_DATA_DIR (corpora folder), QAT_OUTPUT_DIR (runs; default outputs/),",
        "HYDRA_FULL_ERROR=1 (a traceback instead of the one-line error). qat-eval and qat-export",
        "take a checkpoint of a run: qat-eval --help, qat-export --help.",
    ]
    return "\n".join(lines)
