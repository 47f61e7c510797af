"""Checks made before a run starts or writes anything: the model directory and output paths (and,
through :func:`tasks.check_task_data`, the task's data). Each returns a list of one-line problems,
each naming the file or value and what is accepted; an empty list means usable. ``finegates.train``
and ``tune.run`` print them all, then exit 2.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

from finegates.config import ConfigError, TrainConfig



def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def check_model(model: str | None, lengths: dict[str, int] | None = None, texts: int | None = None) -> list[str]:
    """Problems with the model: a local directory must hold a loadable config.json of a supported family
    and complete weight files; a hub id must resolve to a config (from the local cache when offline).
    ``lengths``: flag -> a number of tokens the run will feed the model, each at most what the model takes
    (a BERT's position table: 512 for the embedded MiniLM), where a longer one would fail mid-run.
    ``texts``: the most text columns an input of the run's tasks has (1, or 2 for pairs); with it, ``--max-length``
    must also leave a token of each text beside the tokenizer's special tokens (:func:`shortest_max_length`)."""
    from finegates.train import resolve_model

    try:
        path = resolve_model(model)
    except ConfigError as e:
        return [str(e)]
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        return [f"model {path!r}: cannot load its config ({_first_line(e)}); accepted: a Hugging Face model "
                "directory or hub id"]
    from finegates.arch import supported_model_types

    mt = getattr(config, "model_type", None)
    if mt not in supported_model_types():  # the families of finegates.arch
        return [f"model {path!r} has model_type {mt!r}, which is not supported; accepted: "
                f"{', '.join(supported_model_types())}"]
    problems = _length_problems(path, config, lengths or {}, texts)
    d = Path(path)
    if not d.is_dir():
        return problems  # a hub id: its weights are checked when they are loaded
    safetensors = sorted(d.glob("*.safetensors"))
    bins = sorted(d.glob("pytorch_model*.bin"))
    if not safetensors and not bins:
        return problems + [f"model {path!r} has no weights file; accepted: model.safetensors or pytorch_model.bin"]
    for f in safetensors:
        from safetensors import safe_open

        try:
            with safe_open(str(f), "pt") as h:  # reads the header; fails unless the file covers every tensor
                h.keys()
        except Exception as e:  # noqa: BLE001
            problems.append(f"model weights {str(f)!r} are unreadable ({_first_line(e)}); accepted: a complete "
                            "safetensors file")
    if not safetensors:
        for f in bins:
            if not zipfile.is_zipfile(f):
                problems.append(f"model weights {str(f)!r} are unreadable (not a complete torch zip archive); "
                                "accepted: a complete pytorch_model.bin or model.safetensors")
    return problems


def _length_problems(path: str, config, lengths: dict[str, int], texts: int | None) -> list[str]:
    from finegates.arch import get_family

    limit = get_family(config).max_tokens(config)
    shortest = shortest_max_length(path, texts) if texts and "--max-length" in lengths else None
    problems = []
    for flag, n in lengths.items():
        lo = shortest if flag == "--max-length" and shortest else 1
        accepted = f"accepted: an integer in [{lo}, {limit}]" if limit is not None else f"accepted: an integer >= {lo}"
        if limit is not None and n > limit:
            problems.append(f"{flag} {n} is longer than model {path!r} takes ({limit} tokens: its position "
                            f"embeddings); {accepted}")
        elif n < lo:
            what = ("a sentence pair", "one of its two texts") if texts > 1 else ("a sentence", "the sentence")
            problems.append(f"{flag} {n} is too short: the tokenizer of model {path!r} adds {lo - texts} special "
                            f"tokens to {what[0]}, so under {lo} tokens no word of {what[1]} is left (and under "
                            f"{lo - texts} the tokenizer does not cut at all); {accepted}")
    return problems


def shortest_max_length(path: str, texts: int) -> int | None:
    """The shortest ``--max-length`` that keeps a token of each of an input's ``texts`` texts: the tokenizer's
    special tokens plus ``texts`` (3 for a single sentence with BERT's [CLS] x [SEP], 5 for a pair). Shorter, the
    input is cut to its special tokens or, below their count, not cut at all (the tokenizer logs and returns the
    whole input). None where the tokenizer does not load (the run itself then says why)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        return int(tok.num_special_tokens_to_add(pair=texts > 1)) + texts
    except Exception:  # noqa: BLE001 - a model without a loadable tokenizer fails in load_base, with its reason
        return None


def check_output_dir(path: str | os.PathLike, flag: str) -> list[str]:
    """Problems with a directory that will be created or written: it must not be an existing file, and
    its nearest existing ancestor must be a writable directory."""
    p = Path(path).expanduser().resolve()
    if p.exists() and not p.is_dir():
        return [f"{flag} {str(p)!r} is an existing file; accepted: a directory (existing or to be created)"]
    anc = p
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        return [f"{flag} {str(p)!r} cannot be created: {str(anc)!r} is a file; accepted: a path under a directory"]
    if not os.access(anc, os.W_OK | os.X_OK):
        return [f"{flag} {str(p)!r} cannot be created: {str(anc)!r} is not writable"]
    return []


def check_run(cfg: TrainConfig, output_flag: str = "--output-dir") -> list[str]:
    """Everything one training run needs, checked before it starts: the task's data, the model, the output
    directory and the teacher cache."""
    from tasks import check_task_data, get_task

    problems = check_task_data(get_task(cfg.task), cfg.data_dir)
    problems += check_model(cfg.model, {"--max-length": cfg.max_length, "--latency-length": cfg.latency_length},
                            texts=len(get_task(cfg.task).text_columns))
    if cfg.output_dir:
        problems += check_output_dir(cfg.output_dir, output_flag)
    if cfg.teacher != "none" or cfg.teacher_cache is not None:  # read by a student, written by a dense run after it
        from finegates.distill import cache_root

        problems += check_output_dir(cache_root(cfg), "--teacher-cache")
    return problems
