import json

import numpy as np
import pytest

from tasks import TASKS, TaskError, get_task, load_split, load_task_data, parse_tasks


def manifest(glue_dir):
    return json.loads((glue_dir / "manifest.json").read_text())["files"]


def test_every_manifest_file_loads_with_its_row_count_columns_and_label_range(glue_dir):
    files = manifest(glue_dir)
    assert {f["task"] for f in files} == set(TASKS)
    for f in files:
        task = get_task(f["task"])
        df = load_split(task, f["split"], glue_dir)
        assert len(df) == f["rows"], f
        for c in task.text_columns:
            assert c in df.columns
        if task.is_regression:
            assert df["label"].between(0, 5).all()
        else:
            assert set(np.unique(df["label"])) <= set(range(task.num_labels)), f


def test_missing_split_is_a_clear_error(glue_dir):
    with pytest.raises(TaskError, match=r"task 'qqp' has no split 'validation' in .*found: train"):
        load_split(get_task("qqp"), "validation", glue_dir)


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        load_split(get_task("sst2"), "train", tmp_path / "nope")


def test_unknown_task_and_task_lists():
    with pytest.raises(TaskError, match=r"unknown task 'sst3'; accepted: cola, sst2"):
        get_task("sst3")
    assert [t.name for t in parse_tasks("glue")] == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]
    assert [t.name for t in parse_tasks("rte, SST2,rte")] == ["rte", "sst2"]
    with pytest.raises(TaskError, match="empty task list"):
        parse_tasks(" , ")


def test_subsets_are_seeded_and_dynamic_padding(glue_dir, tokenizer):
    a = load_task_data(get_task("rte"), tokenizer, data_dir=glue_dir, max_train=50, max_eval=20, seed=3)
    b = load_task_data(get_task("rte"), tokenizer, data_dir=glue_dir, max_train=50, max_eval=20, seed=3)
    c = load_task_data(get_task("rte"), tokenizer, data_dir=glue_dir, max_train=50, max_eval=20, seed=4)
    assert len(a.train) == 50 and len(a.eval) == 20 and a.validation_source == "validation"
    assert [x["input_ids"] for x in a.train] == [x["input_ids"] for x in b.train]
    assert [x["input_ids"] for x in a.train] != [x["input_ids"] for x in c.train]
    lengths = {len(x["input_ids"]) for x in a.train}
    assert len(lengths) > 1 and max(lengths) <= 128  # unpadded, truncated


def test_missing_validation_falls_back_to_a_disjoint_train_holdout(glue_dir, tokenizer, caplog):
    d = load_task_data(get_task("qqp"), tokenizer, data_dir=glue_dir, max_train=300, max_eval=100, seed=1)
    assert d.validation_source == "train-holdout" and len(d.eval) == 100 and len(d.train) == 300
    assert "train-holdout" in caplog.text
    tr = {tuple(x["input_ids"]) for x in d.train}
    ev = {tuple(x["input_ids"]) for x in d.eval}
    # disjoint rows (identical question pairs may repeat in QQP, so allow a tiny overlap of duplicates)
    assert len(tr & ev) <= 2


def test_stsb_labels_are_float(glue_dir, tokenizer):
    d = load_task_data(get_task("stsb"), tokenizer, data_dir=glue_dir, max_train=10, max_eval=10)
    assert all(isinstance(x["labels"], float) for x in d.train)


def test_eval_split_is_disjoint_seeded_stratified_and_stable(glue_dir, tokenizer):
    from tasks import split_eval

    for name in ("rte", "stsb"):
        task = get_task(name)
        labels = load_split(task, task.validation_split, glue_dir)["label"].to_numpy()
        sel, rep = split_eval(task, labels, 0.5, seed=7)
        assert len(np.intersect1d(sel, rep)) == 0 and len(sel) + len(rep) == len(labels)
        assert abs(len(rep) - len(labels) / 2) <= 5  # per-stratum rounding
        again = split_eval(task, labels, 0.5, seed=7)
        assert np.array_equal(sel, again[0]) and np.array_equal(rep, again[1])  # same seed, same parts (resume)
        other = split_eval(task, labels, 0.5, seed=8)
        assert not np.array_equal(rep, other[1])
        if not task.is_regression:  # stratified: each part keeps the class balance
            assert abs(labels[rep].mean() - labels[sel].mean()) < 0.02
        else:
            assert abs(np.median(labels[rep]) - np.median(labels[sel])) < 0.3
    # the parts load_task_data returns are those rows, and the report part is never in the selection part
    task = get_task("rte")
    kw = dict(data_dir=glue_dir, max_train=16, max_eval=120, seed=3, max_length=32)
    full = load_task_data(task, tokenizer, **kw)
    sel = load_task_data(task, tokenizer, eval_part="selection", **kw)
    rep = load_task_data(task, tokenizer, eval_part="report", **kw)
    ids = lambda d: {tuple(r["input_ids"]) for r in d.eval}  # noqa: E731
    assert len(sel.eval) + len(rep.eval) == len(full.eval) == 120
    assert ids(sel) | ids(rep) == ids(full) and not (ids(sel) & ids(rep))
    assert [r["input_ids"] for r in sel.train] == [r["input_ids"] for r in full.train]  # same train subset


def test_eval_split_refuses_a_set_too_small_to_split():
    from tasks import split_eval

    with pytest.raises(TaskError, match="too small to split at report fraction 0.5 .15 selection / 15 report"):
        split_eval(get_task("rte"), np.zeros(30, dtype=int), 0.5, seed=0)


def test_the_size_check_agrees_with_the_parts_the_split_makes(glue_dir):
    """CoLA, 66 evaluation examples (18 / 48: unbalanced), report fraction 0.3: 0.3 * 66 rounds to 20, but the
    split rounds per class (0.3 * 18 -> 5, 0.3 * 48 -> 14) and makes a report part of 19. The check must say so."""
    from tasks import check_split_size, eval_labels, split_eval

    task = get_task("cola")
    labels = eval_labels(task, glue_dir, 1000, 66, 1948)
    assert len(labels) == 66 and np.bincount(labels).tolist() == [18, 48]
    with pytest.raises(TaskError, match=r"66 examples is too small to split at report fraction 0.3 \(47 selection / "
                                        r"19 report\)"):
        check_split_size(task, labels, 0.3)
    with pytest.raises(TaskError, match=r"\(47 selection / 19 report\)"):
        split_eval(task, labels, 0.3, seed=1948)
    # the labels are those of the eval subset a run gets (same seed and sizes), QQP's train hold-out included
    from tasks.data import select_frames

    for name, n in (("cola", 66), ("qqp", 300)):
        _, eval_df, _, _ = select_frames(get_task(name), data_dir=glue_dir, max_train=1000, max_eval=n, seed=1948)
        assert np.array_equal(eval_df["label"].to_numpy(), eval_labels(get_task(name), glue_dir, 1000, n, 1948))
    # the check and the split agree on every size near the limit, whatever the seed of the split
    for n in range(60, 75):
        y = eval_labels(task, glue_dir, 1000, n, 1948)
        for frac in (0.3, 0.5, 0.7):
            try:
                check_split_size(task, y, frac)
                ok = True
            except TaskError:
                ok = False
            for seed in (0, 5):
                if ok:
                    sel, rep = split_eval(task, y, frac, seed)
                    assert min(len(sel), len(rep)) >= 20
                else:
                    with pytest.raises(TaskError):
                        split_eval(task, y, frac, seed)


def test_the_size_check_refuses_a_class_missing_from_a_part(glue_dir):
    """61 real CoLA validation rows, one of them unacceptable (class 0): at report fraction 0.4 that class
    rounds to no report example (round(0.4) = 0), though both parts are large enough."""
    from tasks import check_split_size

    task = get_task("cola")
    y = load_split(task, "validation", glue_dir)["label"].to_numpy()
    labels = np.concatenate([y[y == 1][:60], y[y == 0][:1]])
    with pytest.raises(TaskError, match="has 1 of class 'unacceptable', none of them in the report part at report "
                                        "fraction 0.4"):
        check_split_size(task, labels, 0.4)
    check_split_size(task, np.concatenate([y[y == 1][:60], y[y == 0][:3]]), 0.4)  # 1 of 3 in the report part
