"""Bad input to ``python -m finegates.train``: one clear line, exit 2, nothing written."""
import subprocess
import sys

import pytest

from finegates.train import main

CASES = [
    (["--task", "sst3"], "unknown task 'sst3'; accepted: cola"),
    (["--lambda", "-1"], "lambda=-1.0 is invalid; accepted: a finite number >= 0"),
    (["--lr", "0"], "lr=0.0 is invalid; accepted: a finite number > 0"),
    (["--rank", "-2"], "rank=-2 is invalid; accepted: an integer >= 0"),
    (["--model", "/nonexistent/model"], "model path '/nonexistent/model' does not exist"),
    (["--penalty", "l2"], "penalty='l2' is invalid; accepted: controller, paper, code"),
    (["--target-sparsity", "1.5"], "target_sparsity=1.5 is invalid; accepted: a number in [0, 1)"),
    (["--target-sparsity", "nan"], "target_sparsity=nan is invalid; accepted: a number in [0, 1)"),
    (["--gate-init", "open"], "gate_init='open' is invalid; accepted: edge, saturated"),
    (["--recovery-frac", "-0.1"], "recovery_frac=-0.1 is invalid; accepted: a number in [0, 1]"),
    (["--warmup-frac", "0.8", "--recovery-frac", "0.5"], "warmup_frac + recovery_frac=1.3 is invalid; accepted: at most 1"),
    (["--max-recovery-frac", "1.5"], "max_recovery_frac=1.5 is invalid; accepted: none, or a number in [0, 1]"),
    (["--penalty", "paper", "--max-recovery-frac", "0.4"], "--max-recovery-frac 0.4 has no effect with --penalty "
     "paper; accepted: --penalty controller (an early recovery waits for the controller's target), or none"),
    (["--teacher", "bert"], "teacher='bert' is invalid; accepted: none, lora, full"),
    (["--distill-alpha", "2"], "distill_alpha=2.0 is invalid; accepted: a number in [0, 1]"),
    (["--dual-lr", "0"], "dual_lr=0.0 is invalid; accepted: a finite number > 0"),
    (["--close-schedule", "later"], "close_schedule='later' is invalid; accepted: gradual, aligned, at-pin"),
    (["--head-lr", "-1"], "head_lr=-1.0 is invalid; accepted: a finite number > 0, or none for the method's lr"),
    (["--method", "finegates-lora", "--option", 'lora_slots=["q", "query"]'],
     "finegates option lora_slots=['q', 'query'] is invalid (query); accepted: slots of bert: q, k, v, o, up, down"),
    (["--option", "lora_slots=[]"], "finegates option lora_slots=[] is invalid; accepted: a non-empty list of slots"),
    (["--method", "sparta", "--option", "density=0.1"],
     "sparta density=0.1 asks for 2,271,322 trainable weights (of the model's 22,713,216), more than v/o hold "
     "(1,769,472); accepted: density <= 0.0779 with scope 'model', or scope 'targets'"),
    (["--method", "sparta", "--option", 'targets=["v", "value"]'],
     "sparta option targets=['v', 'value'] is invalid (value); accepted: slots of bert: q, k, v, o, up, down"),
    (["--method", "sparta", "--option", "scope=global"], "sparta scope='global' is invalid; accepted: model, targets"),
]


@pytest.mark.parametrize("args,message", CASES)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys, glue_dir):
    out = tmp_path / "out"
    code = main(args + ["--output-dir", str(out), "--data-dir", str(glue_dir), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_missing_data_dir(tmp_path, capsys):
    code = main(["--data-dir", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "out")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("files,message", [
    ({"validation.parquet": "copy"}, "task 'rte' has no split 'train'"),  # a missing train split is an error
    ({"train.parquet": "copy", "validation.parquet": b"not parquet"}, "cannot read"),
])
def test_missing_or_corrupt_split(tmp_path, glue_dir, capsys, files, message):
    (tmp_path / "glue" / "rte").mkdir(parents=True)
    for name, content in files.items():
        data = (glue_dir / "rte" / name).read_bytes() if content == "copy" else content
        (tmp_path / "glue" / "rte" / name).write_bytes(data)
    code = main(["--task", "rte", "--data-dir", str(tmp_path / "glue"), "--output-dir", str(tmp_path / "out"),
                 "--smoke-test", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # two fresh interpreters importing torch and transformers: ~10-20 s on 2 cores
def test_process_exit_code_and_help():
    r = subprocess.run([sys.executable, "-m", "finegates.train", "--task", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: unknown task 'nope'")
    h = subprocess.run([sys.executable, "-m", "finegates.train", "--help"], capture_output=True, text=True)
    assert h.returncode == 0 and "--gate-lr" in h.stdout and "default" in h.stdout
