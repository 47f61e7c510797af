"""Shared by the export tests: random gate states on a gated model."""
import torch
from torch import nn

from finegates.gated_model import all_gates


def randomize_gates(model: nn.Module, closed_frac: float) -> nn.Module:
    """A mix of closed (mu <= -0.5), fractional and fully open gates, and non-zero LoRA B; eval mode."""
    with torch.no_grad():
        for g in all_gates(model):
            u = torch.rand_like(g.theta)
            g.theta.copy_(torch.where(u < closed_frac, torch.full_like(u, -2.0), torch.rand_like(u) * 3 - 0.5))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    return model.eval()
