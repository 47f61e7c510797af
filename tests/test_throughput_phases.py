"""benchmarks/throughput.py --phases: each phase of a train step timed, the step itself unchanged."""
import importlib.util
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from finegates import TrainConfig, get_method
from finegates.methods.base import adamw

spec = importlib.util.spec_from_file_location("throughput", Path(__file__).parents[1] / "benchmarks" / "throughput.py")
throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(throughput)


def trained(phases):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     num_labels=2)
    model = BertForSequenceClassification(cfg)
    tc = TrainConfig(task="sst2", method="finegates")
    method = get_method("finegates")
    model = method.prepare(model, tc, 10).train()
    opt = adamw(method.param_groups(model, tc))
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(1, 50, (4, 7), generator=g),
                "attention_mask": torch.ones(4, 7, dtype=torch.long), "labels": torch.tensor([0, 1, 1, 0])}
               for _ in range(3)]
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    torch.manual_seed(2)
    throughput.train_round(model, method, opt, batches, phases=phases)
    after = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    assert not all(torch.equal(a, b) for a, b in zip(before, after))  # it trained
    return after


def test_phases_are_timed_once_a_step_and_change_nothing_trained():
    phases = {}
    with_phases, without = trained(phases), trained(None)
    assert tuple(phases) == throughput.PHASES
    assert all(len(v) == 3 and all(t >= 0 for t in v) for v in phases.values())
    assert all(torch.equal(a, b) for a, b in zip(with_phases, without))
