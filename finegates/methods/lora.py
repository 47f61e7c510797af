"""LoRA through peft, on the family's attention targets (BERT: query/value; Llama: q_proj/v_proj);
merged into the weights on export."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from finegates import gated_model as gm
from finegates.methods.base import Choice, LogUniform, Method


@dataclass(frozen=True)
class LoraOptions:
    target_modules: tuple[str, ...] | None = None  # None: the model family's LoRA targets
    lora_dropout: float = 0.0


class Lora(Method):
    """LoRA through peft (r = cfg.rank or 8, on the family's targets by default); merged on export."""

    name = "lora"
    help = "LoRA adapters via peft (r = --rank or 8), merged on export (dense)"
    Options = LoraOptions
    search = {"lr": LogUniform(1e-4, 3e-3), "rank": Choice((4, 8, 16))}
    reference = {"lr": 1e-3, "rank": 8}
    reference_name = "LoRA r=8 on query/value, lr 1e-3"

    def prepare(self, model: nn.Module, cfg, total_steps: int, calibration: list[dict] | None = None) -> nn.Module:
        from peft import LoraConfig, TaskType, get_peft_model

        opts = self.parse_options(cfg.extra)
        r = cfg.rank or 8
        fam = gm.family_of(model)
        targets = list(opts.target_modules or fam.lora_targets)
        pcfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=cfg.lora_alpha or 2 * r,
                          lora_dropout=float(opts.lora_dropout), target_modules=targets,
                          modules_to_save=fam.lora_modules_to_save(model))
        return get_peft_model(model, pcfg)

    def exportable(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()
