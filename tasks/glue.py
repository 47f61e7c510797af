"""The GLUE tasks: what each one is (text columns, labels, splits, metric).

Knows nothing of models, gates or Ray. ``TASKS`` is the registry; ``get_task`` validates a name.
"""
from __future__ import annotations

from dataclasses import dataclass

from tasks._errors import TaskError


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE task.

    ``num_labels == 1`` means regression (STS-B). ``primary`` names the metric that ``score`` is
    (see :func:`tasks.metrics.compute_metrics`).
    """

    name: str
    text_columns: tuple[str, ...]
    num_labels: int
    label_names: tuple[str, ...]
    primary: str
    validation_splits: tuple[str, ...] = ("validation",)
    train_split: str = "train"

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def validation_split(self) -> str:
        """The split that ``score`` is computed on (MNLI: validation_matched)."""
        return self.validation_splits[0]


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("cola", ("sentence",), 2, ("unacceptable", "acceptable"), "mcc"),
        TaskSpec("sst2", ("sentence",), 2, ("negative", "positive"), "accuracy"),
        TaskSpec("mrpc", ("sentence1", "sentence2"), 2, ("not_equivalent", "equivalent"), "f1_accuracy"),
        TaskSpec("stsb", ("sentence1", "sentence2"), 1, ("similarity",), "pearson_spearman"),
        TaskSpec("qqp", ("question1", "question2"), 2, ("not_duplicate", "duplicate"), "f1_accuracy"),
        TaskSpec(
            "mnli",
            ("premise", "hypothesis"),
            3,
            ("entailment", "neutral", "contradiction"),
            "accuracy",
            validation_splits=("validation_matched", "validation_mismatched"),
        ),
        TaskSpec("qnli", ("question", "sentence"), 2, ("entailment", "not_entailment"), "accuracy"),
        TaskSpec("rte", ("sentence1", "sentence2"), 2, ("entailment", "not_entailment"), "accuracy"),
        TaskSpec("wnli", ("sentence1", "sentence2"), 2, ("not_entailment", "entailment"), "accuracy"),
    ]
}

#: The customary GLUE set for sweeps: every task but WNLI.
GLUE: tuple[str, ...] = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")


def get_task(name: str) -> TaskSpec:
    """Return the task called ``name`` (case-insensitive), or raise a one-line :class:`TaskError`."""
    key = str(name).strip().lower().replace("-", "")
    if key not in TASKS:
        raise TaskError(f"unknown task {name!r}; accepted: {', '.join(TASKS)}")
    return TASKS[key]


def parse_tasks(spec: str) -> list[TaskSpec]:
    """Parse ``glue`` or a comma list of task names into task specs (order kept, duplicates dropped)."""
    names: list[str] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        names.extend(GLUE if part.lower() == "glue" else [part])
    if not names:
        raise TaskError(f"empty task list {spec!r}; give 'glue' or a comma list of: {', '.join(TASKS)}")
    seen: dict[str, TaskSpec] = {}
    for n in names:
        t = get_task(n)
        seen.setdefault(t.name, t)
    return list(seen.values())
