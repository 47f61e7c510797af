"""Loading GLUE splits, seeded subsets and tokenization with dynamic padding.

Data comes from a local directory in the Hugging Face ``glue`` Parquet layout
(``<dir>/<task>/<split>.parquet``), given as ``data_dir`` or by the ``FINEGATES_GLUE_DIR``
environment variable; with neither, from the Hugging Face hub (``nyu-mll/glue``).

Caveat: when a task's validation split is absent from a local directory (QQP in the offline copy),
``load_task_data(..., holdout_missing_validation=True)`` holds out a seeded slice of the train split,
disjoint from the training subset, and says so (``validation_source == "train-holdout"``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks._errors import TaskError
from tasks.glue import TaskSpec

log = logging.getLogger(__name__)

DATA_DIR_ENV = "FINEGATES_GLUE_DIR"
HUB_DATASET = "nyu-mll/glue"
#: Held-out validation size when a task has no validation split and ``max_eval`` is not given.
DEFAULT_HOLDOUT = 2000
#: Which part of the evaluation set a run sees (see :func:`split_eval`).
EVAL_PARTS = ("all", "selection", "report")
#: The smallest selection or report part that :func:`split_eval` accepts.
MIN_EVAL_PART = 20
_SPLIT_STREAM = 0x5E1EC7  # the split's own random stream: independent of the subset draws


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local GLUE directory: ``data_dir``, else ``$FINEGATES_GLUE_DIR``, else None (use the hub)."""
    raw = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    if raw is None:
        return None
    path = Path(raw).expanduser().resolve()
    if not path.is_dir():
        raise TaskError(f"GLUE data directory {str(path)!r} does not exist; give --data-dir or ${DATA_DIR_ENV} "
                        "pointing at a folder with <task>/<split>.parquet files")
    return path


def available_splits(task: TaskSpec, data_dir: Path) -> list[str]:
    return sorted(p.stem for p in (data_dir / task.name).glob("*.parquet"))


def load_split(task: TaskSpec, split: str, data_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """One split as a DataFrame with the task's text columns and ``label``."""
    root = resolve_data_dir(data_dir)
    if root is None:
        import datasets  # imported lazily: only the hub path needs it

        try:
            ds = datasets.load_dataset(HUB_DATASET, task.name, split=split)
        except Exception as e:  # noqa: BLE001 - surface a one-line message
            raise TaskError(f"cannot load GLUE {task.name}/{split} from the hub ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); set --data-dir or ${DATA_DIR_ENV}") from e
        return ds.to_pandas()
    path = root / task.name / f"{split}.parquet"
    if not path.is_file():
        found = ", ".join(available_splits(task, root)) or "none"
        raise TaskError(f"task {task.name!r} has no split {split!r} in {root} (found: {found})")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - truncated or non-Parquet file
        raise TaskError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    missing = [c for c in (*task.text_columns, "label") if c not in df.columns]
    if missing:
        raise TaskError(f"{path} lacks columns {missing}; expected the HF glue schema {list(task.text_columns)} + label")
    return df


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def check_split(task: TaskSpec, split: str, data_dir: str | os.PathLike) -> list[str]:
    """Problems with one local split file, one line each (empty: usable). Reads the whole file once:
    a readable Parquet file, the task's text columns and ``label``, at least one row, labels that are
    integers in ``0..num_labels-1`` (classification) or finite numbers (regression)."""
    import pyarrow.parquet as pq

    path = Path(data_dir) / task.name / f"{split}.parquet"
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - truncated, not Parquet, unreadable
        why = _first_line(e).replace(f"Could not open Parquet input source '{path}': ", "")
        return [f"task {task.name!r}: cannot read {path} ({why}); accepted: a complete Parquet file in the HF glue "
                "layout"]
    missing = [c for c in (*task.text_columns, "label") if c not in table.column_names]
    if missing:
        return [f"task {task.name!r}: {path} lacks column(s) {', '.join(missing)}; accepted: the HF glue schema "
                f"{', '.join((*task.text_columns, 'label'))}"]
    if table.num_rows == 0:
        return [f"task {task.name!r}: {path} has no rows; accepted: a split with at least one example"]
    labels = table.column("label").to_numpy(zero_copy_only=False)
    if task.is_regression:
        if not np.issubdtype(labels.dtype, np.number):
            return [f"task {task.name!r}: {path} has non-numeric labels (dtype {labels.dtype}); accepted: a numeric "
                    "regression target"]
        bad = ~np.isfinite(labels.astype(np.float64))
        if bad.any():
            return [f"task {task.name!r}: {path} has {int(bad.sum())} missing or infinite labels; accepted: finite "
                    "numbers"]
        return []
    accepted = f"integers 0..{task.num_labels - 1} ({', '.join(task.label_names)})"
    if not np.issubdtype(labels.dtype, np.integer):
        return [f"task {task.name!r}: {path} has labels of dtype {labels.dtype}; accepted: {accepted}"]
    bad = (labels < 0) | (labels >= task.num_labels)
    if bad.any():
        shown = ", ".join(str(v) for v in np.unique(labels[bad])[:5])
        return [f"task {task.name!r}: {path} has {int(bad.sum())} labels outside the task's range (e.g. {shown}); "
                f"accepted: {accepted}"]
    return []


def check_task_data(task: TaskSpec, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Problems with a task's local data, one line each (empty: usable): the train split, and the
    validation split when there is one (without it a train hold-out is used). Data from the hub
    (no local directory) is checked when it is loaded."""
    root = resolve_data_dir(data_dir)
    if root is None:
        return []
    if not (root / task.name / f"{task.train_split}.parquet").is_file():
        found = ", ".join(available_splits(task, root)) or "none"
        return [f"task {task.name!r} has no split {task.train_split!r} in {root} (found: {found}); "
                f"accepted: <data-dir>/{task.name}/{task.train_split}.parquet"]
    problems = check_split(task, task.train_split, root)
    if (root / task.name / f"{task.validation_split}.parquet").is_file():
        problems += check_split(task, task.validation_split, root)
    return problems


def has_split(task: TaskSpec, split: str, data_dir: str | os.PathLike | None = None) -> bool:
    root = resolve_data_dir(data_dir)
    return True if root is None else (root / task.name / f"{split}.parquet").is_file()


@dataclass
class TaskData:
    """Tokenized train and eval features of one task (lists of dicts, unpadded)."""

    task: TaskSpec
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    eval_split: str
    validation_source: str  # "validation" or "train-holdout"
    info: dict[str, Any] = field(default_factory=dict)


def _subset(n: int, k: int | None, rng: np.random.Generator) -> np.ndarray:
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=k, replace=False))


def tokenize_frame(task: TaskSpec, df: pd.DataFrame, tokenizer, max_length: int) -> list[dict[str, Any]]:
    """Tokenize without padding (the collator pads each batch to its own longest row)."""
    cols = [df[c].astype(str).tolist() for c in task.text_columns]
    enc = tokenizer(*cols, truncation=True, max_length=max_length, padding=False)
    labels = df["label"].to_numpy()
    labels = labels.astype(np.float32) if task.is_regression else labels.astype(np.int64)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "labels": labels[i].item()} for i in range(len(df))]


def _strata(task: TaskSpec, labels: np.ndarray) -> np.ndarray:
    """The strata of the split: the classes, or the quintiles of a regression target."""
    if task.is_regression:
        edges = np.quantile(labels.astype(float), [0.2, 0.4, 0.6, 0.8])
        return np.digitize(labels.astype(float), edges)
    return labels


def _split(task: TaskSpec, labels: np.ndarray, report_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The split itself, unchecked: ``round(report_frac * size)`` seeded positions of each stratum to the report part."""
    if not 0 < report_frac < 1:
        raise TaskError(f"report fraction {report_frac!r} is invalid; accepted: a number in (0, 1)")
    strata = _strata(task, labels)
    rng = np.random.default_rng([int(seed), _SPLIT_STREAM])
    report: list[np.ndarray] = []
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        report.append(rng.permutation(idx)[: int(round(report_frac * len(idx)))])
    rep = np.sort(np.concatenate(report)) if report else np.zeros(0, dtype=int)
    return np.setdiff1d(np.arange(len(labels)), rep), rep


def split_eval(task: TaskSpec, labels: np.ndarray, report_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified split of evaluation positions ``0..n-1`` into (selection, report), both sorted.

    Strata: the classes (classification) or the quintiles of the target (regression); each stratum gives
    ``round(report_frac * size)`` seeded positions to the report part. The same labels, fraction and seed
    always give the same split (a resumed sweep sees the same parts). Raises :class:`TaskError` when the
    parts it makes are too small (:func:`check_split_size`).
    """
    labels = np.asarray(labels)
    sel, rep = _split(task, labels, report_frac, seed)
    _check_parts(task, labels, report_frac, sel, rep)
    return sel, rep


def check_split_size(task: TaskSpec, labels: np.ndarray, report_frac: float) -> None:
    """One-line :class:`TaskError` when the evaluation set with these ``labels`` is too small to split: the
    sizes checked are those of the parts :func:`split_eval` makes (per-stratum rounding included; they do
    not depend on the seed). Each part needs ``MIN_EVAL_PART`` examples and, for a classification task,
    at least one example of every class the evaluation set holds."""
    labels = np.asarray(labels)
    _check_parts(task, labels, report_frac, *_split(task, labels, report_frac, 0))


def _check_parts(task: TaskSpec, labels: np.ndarray, report_frac: float, sel: np.ndarray, rep: np.ndarray) -> None:
    n = len(labels)
    if min(len(sel), len(rep)) < MIN_EVAL_PART:
        raise TaskError(f"task {task.name!r}: its evaluation set of {n} examples is too small to split at report "
                        f"fraction {report_frac:g} ({len(sel)} selection / {len(rep)} report); accepted: each part >= "
                        f"{MIN_EVAL_PART} examples (raise --max-eval or change --report-frac)")
    if task.is_regression:
        return
    for part, idx in (("selection", sel), ("report", rep)):
        missing = np.setdiff1d(np.unique(labels), labels[idx])
        if missing.size:
            c = int(missing[0])
            name = task.label_names[c] if 0 <= c < len(task.label_names) else str(c)
            raise TaskError(f"task {task.name!r}: its evaluation set of {n} examples has {int((labels == c).sum())} "
                            f"of class {name!r}, none of them in the {part} part at report fraction {report_frac:g}; "
                            "accepted: every class in both parts (raise --max-eval or change --report-frac)")


def eval_labels(task: TaskSpec, data_dir: str | os.PathLike | None, max_train: int | None, max_eval: int | None,
                seed: int) -> np.ndarray | None:
    """The labels of the evaluation set a run of ``task`` gets (the same seeded subset as
    :func:`select_frames`), reading only the label column; None when the data comes from the hub."""
    root = resolve_data_dir(data_dir)
    if root is None:
        return None
    import pyarrow.parquet as pq

    def read(split: str, rows_only: bool = False):
        path = root / task.name / f"{split}.parquet"
        try:
            return pq.read_metadata(path).num_rows if rows_only else \
                pq.read_table(path, columns=["label"]).column("label").to_numpy(zero_copy_only=False)
        except Exception as e:  # noqa: BLE001 - a missing or truncated file: one line
            raise TaskError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e

    has_val = has_split(task, task.validation_split, root)
    n_val = read(task.validation_split, rows_only=True) if has_val else None
    _, eval_idx, _ = _draw(read(task.train_split, rows_only=True), n_val, max_train, max_eval, seed)
    return read(task.validation_split if has_val else task.train_split)[eval_idx]


def _draw(n_train: int, n_val: int | None, max_train: int | None, max_eval: int | None,
          seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The seeded train and eval positions and the validation source: from the validation split of
    ``n_val`` rows, or (``n_val`` None) a hold-out of the train split."""
    rng = np.random.default_rng(seed)
    if n_val is not None:
        train_idx = _subset(n_train, max_train, rng)
        return train_idx, _subset(n_val, max_eval, rng), "validation"
    n_hold = min(max_eval or DEFAULT_HOLDOUT, n_train // 5)
    perm = rng.permutation(n_train)
    eval_idx, rest = np.sort(perm[:n_hold]), perm[n_hold:]
    return np.sort(rest if max_train is None else rest[: max_train]), eval_idx, "train-holdout"


def select_frames(task: TaskSpec, *, data_dir: str | os.PathLike | None = None, max_train: int | None = None,
                  max_eval: int | None = None, seed: int = 0, holdout_missing_validation: bool = True,
                  eval_part: str = "all", report_frac: float = 0.5) -> tuple[pd.DataFrame, pd.DataFrame, str, int]:
    """The seeded train and eval rows (untokenized, in the order a run uses them), the validation source
    ("validation" or "train-holdout") and the train rows available. :func:`load_task_data` tokenizes
    these; a check of a served model can feed the same eval rows to it. ``eval_part``: ``all`` the eval
    subset, or its ``selection`` / ``report`` part (:func:`split_eval`, seeded by ``seed``)."""
    if eval_part not in EVAL_PARTS:
        raise TaskError(f"eval part {eval_part!r} is invalid; accepted: {', '.join(EVAL_PARTS)}")
    train_df = load_split(task, task.train_split, data_dir)
    eval_split = task.validation_split
    if has_split(task, eval_split, data_dir):
        eval_df = load_split(task, eval_split, data_dir)
        train_idx, eval_idx, source = _draw(len(train_df), len(eval_df), max_train, max_eval, seed)
    elif holdout_missing_validation:
        train_idx, eval_idx, source = _draw(len(train_df), None, max_train, max_eval, seed)
        eval_df = train_df
        log.warning("task %s has no %r split in %s: holding out %d seeded train rows as validation "
                    "(validation_source=train-holdout)", task.name, eval_split, resolve_data_dir(data_dir),
                    len(eval_idx))
    else:
        load_split(task, eval_split, data_dir)  # raises the clear error
        raise AssertionError("unreachable")
    if eval_part != "all":
        sel, rep = split_eval(task, eval_df["label"].to_numpy()[eval_idx], report_frac, seed)
        eval_idx = eval_idx[sel if eval_part == "selection" else rep]
    return train_df.iloc[train_idx], eval_df.iloc[eval_idx], source, len(train_df)


def load_task_data(
    task: TaskSpec,
    tokenizer,
    *,
    data_dir: str | os.PathLike | None = None,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
    max_length: int = 128,
    holdout_missing_validation: bool = True,
    eval_part: str = "all",
    report_frac: float = 0.5,
    tokenize_train: bool = True,
) -> TaskData:
    """Seeded train/eval subsets of ``task``, tokenized.

    ``max_train``/``max_eval``: random subsets (seeded by ``seed``) of at most that many rows; None = all.
    ``eval_part``: ``all`` the eval subset, or its ``selection`` / ``report`` part (:func:`split_eval`,
    seeded by ``seed``, ``report_frac`` of it in the report part). ``tokenize_train=False``: the same
    subsets, but only the eval rows are tokenized (``train`` is empty), e.g. to score a checkpoint.
    """
    train_df, eval_df, source, available = select_frames(
        task, data_dir=data_dir, max_train=max_train, max_eval=max_eval, seed=seed,
        holdout_missing_validation=holdout_missing_validation, eval_part=eval_part, report_frac=report_frac)
    train = tokenize_frame(task, train_df, tokenizer, max_length) if tokenize_train else []
    evals = tokenize_frame(task, eval_df, tokenizer, max_length)
    if (tokenize_train and not train) or not evals:
        raise TaskError(f"task {task.name!r}: empty train ({len(train)}) or eval ({len(evals)}) set")
    return TaskData(task, train, evals, task.validation_split, source,
                    info={"n_train": len(train_df), "n_eval": len(evals), "train_rows_available": available,
                          "eval_part": eval_part})
