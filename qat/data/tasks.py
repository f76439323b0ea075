"""Static description of every supported task: labels, pair/regression flags, main metric."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TaskInfo", "TASKS", "GLUE_TASKS", "NEWSGROUPS_LABELS", "get_task", "task_names"]

NEWSGROUPS_LABELS: tuple[str, ...] = (
    "alt.atheism",
    "comp.graphics",
    "comp.os.ms-windows.misc",
    "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware",
    "comp.windows.x",
    "misc.forsale",
    "rec.autos",
    "rec.motorcycles",
    "rec.sport.baseball",
    "rec.sport.hockey",
    "sci.crypt",
    "sci.electronics",
    "sci.med",
    "sci.space",
    "soc.religion.christian",
    "talk.politics.guns",
    "talk.politics.mideast",
    "talk.politics.misc",
    "talk.religion.misc",
)


@dataclass(frozen=True)
class TaskInfo:
    """One task.

    ``name`` is the canonical key (``sst2``, ``mnli``, ``20newsgroups`` ...), ``dir_name`` the
    official folder (``SST-2``). ``label_names[i]`` is the name of class ``i`` (the string the
    GLUE submission expects); empty for regression. ``main_metric`` is the metric to monitor
    (for MNLI: on the first, matched, validation set). ``eval_names`` names the validation
    sets in dataloader order (several only for MNLI). ``submission_files`` are the GLUE
    prediction file names, one per entry of ``eval_names``.
    """

    name: str
    dir_name: str
    num_labels: int
    is_regression: bool
    is_pair: bool
    label_names: tuple[str, ...]
    main_metric: str
    metric_names: tuple[str, ...]
    eval_names: tuple[str, ...] = ("val",)
    submission_files: tuple[str, ...] = ()

    @property
    def is_glue(self) -> bool:
        """Whether the task is one of the nine GLUE tasks."""
        return self.name in GLUE_TASKS


_BIN = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
TASKS: dict[str, TaskInfo] = {
    t.name: t
    for t in (
        TaskInfo("cola", "CoLA", 2, False, False, _BIN, "mcc", ("accuracy", "mcc"),
                 submission_files=("CoLA.tsv",)),
        TaskInfo("sst2", "SST-2", 2, False, False, _BIN, "accuracy", ("accuracy",),
                 submission_files=("SST-2.tsv",)),
        TaskInfo("mrpc", "MRPC", 2, False, True, _BIN, "f1", ("accuracy", "f1"),
                 submission_files=("MRPC.tsv",)),
        TaskInfo("stsb", "STS-B", 1, True, True, (), "pearson", ("pearson", "spearman"),
                 submission_files=("STS-B.tsv",)),
        TaskInfo("qqp", "QQP", 2, False, True, _BIN, "f1", ("accuracy", "f1"),
                 submission_files=("QQP.tsv",)),
        TaskInfo("mnli", "MNLI", 3, False, True, ("contradiction", "entailment", "neutral"),
                 "accuracy", ("accuracy",), eval_names=("matched", "mismatched"),
                 submission_files=("MNLI-m.tsv", "MNLI-mm.tsv")),
        TaskInfo("qnli", "QNLI", 2, False, True, _NLI2, "accuracy", ("accuracy",),
                 submission_files=("QNLI.tsv",)),
        TaskInfo("rte", "RTE", 2, False, True, _NLI2, "accuracy", ("accuracy",),
                 submission_files=("RTE.tsv",)),
        TaskInfo("wnli", "WNLI", 2, False, True, _BIN, "accuracy", ("accuracy",),
                 submission_files=("WNLI.tsv",)),
        TaskInfo("20newsgroups", "20newsgroups", 20, False, False, NEWSGROUPS_LABELS,
                 "accuracy", ("accuracy", "macro_f1")),
    )
}  # fmt: skip
GLUE_TASKS: tuple[str, ...] = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
_ALIASES = {"20ng": "20newsgroups", "newsgroups": "20newsgroups", "sts": "stsb", "sst": "sst2"}


def task_names() -> list[str]:
    """Canonical names of all tasks."""
    return list(TASKS)


def get_task(name: str) -> TaskInfo:
    """Look a task up by name, case-insensitively, ignoring ``-``/``_`` (``SST-2`` -> ``sst2``)."""
    if not isinstance(name, str):
        raise ValueError(f"task must be a string, got {name!r}; valid: {task_names()}")
    key = name.lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {task_names()}")
    return TASKS[key]
