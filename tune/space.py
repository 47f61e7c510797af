"""Search spaces per method, as Optuna distributions, and each method's reference trial.

FineGates searches the sparsity it is asked to reach (``target_sparsity``, the controller's target: the
same value gives the same exported sparsity at any training length, which a penalty weight does not), the
learning rate of the head and LoRA (log scale) and the LoRA rank inside the gates (0 = gates only) jointly.
Its reference trial is the dense one (target 0: gates and the rest train, no penalty). Ranges come from
the measurements in docs/GATE_DEFAULTS.md and docs/COMPRESSION.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution


@dataclass(frozen=True)
class SearchSpace:
    method: str
    distributions: dict[str, BaseDistribution]
    reference: dict[str, Any]  # the first trial of every study; may hold values outside the space
    reference_name: str
    fixed: dict[str, Any] = field(default_factory=dict)  # TrainConfig values for every trial of the method

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        return {name: trial._suggest(name, dist) for name, dist in self.distributions.items()}

    def in_space(self, params: dict[str, Any]) -> dict[str, Any]:
        """The reference params that lie inside the distributions (to tell Optuna about the reference)."""
        inside = {}
        for k, v in params.items():
            dist = self.distributions.get(k)
            try:
                if dist is not None and dist._contains(dist.to_internal_repr(v)):
                    inside[k] = v
            except ValueError:  # e.g. lambda = 0 on a log scale
                pass
        return inside


SPACES: dict[str, SearchSpace] = {
    "finegates": SearchSpace(
        "finegates",
        {"target_sparsity": FloatDistribution(0.1, 0.8), "lr": FloatDistribution(3e-4, 1e-2, log=True),
         "rank": CategoricalDistribution([0, 4, 8])},
        reference={"target_sparsity": 0.0, "lr": 2e-3, "rank": 0},
        reference_name="dense reference (target sparsity 0)",
    ),
    "finegates-lora": SearchSpace(
        "finegates-lora",
        {"target_sparsity": FloatDistribution(0.1, 0.8), "lr": FloatDistribution(3e-4, 3e-3, log=True),
         "rank": CategoricalDistribution([4, 8, 16])},
        reference={"target_sparsity": 0.0, "lr": 1e-3, "rank": 8},
        reference_name="dense reference with LoRA r=8 inside the gates (target sparsity 0)",
    ),
    "gift-sw": SearchSpace(
        "gift-sw",
        {"lr": FloatDistribution(1e-4, 3e-3, log=True), "k": CategoricalDistribution([8, 16, 32])},
        reference={"lr": 1e-3, "k": 16},
        reference_name="GIFT-SW, 16 salient columns per linear, lr 1e-3",
    ),
    "sparta": SearchSpace(
        "sparta",
        {"lr": FloatDistribution(1e-4, 1e-2, log=True), "density": FloatDistribution(0.002, 0.01, log=True)},
        reference={"lr": 2e-3, "density": 0.01},
        reference_name="SpaRTA, 1% of W_v and W_o, lr 2e-3",
    ),
    "propulsion": SearchSpace(
        "propulsion",
        {"lr": FloatDistribution(1e-4, 1e-2, log=True), "degree": CategoricalDistribution([5, 15, 35])},
        reference={"lr": 2e-3, "degree": 15},
        reference_name="Propulsion, degree 15, lr 2e-3",
    ),
    "lora": SearchSpace(
        "lora",
        {"lr": FloatDistribution(1e-4, 3e-3, log=True), "rank": CategoricalDistribution([4, 8, 16])},
        reference={"lr": 1e-3, "rank": 8},
        reference_name="LoRA r=8 on query/value, lr 1e-3",
    ),
    "full": SearchSpace(
        "full",
        {"lr": FloatDistribution(1e-5, 2e-4, log=True)},
        reference={"lr": 5e-5},
        reference_name="full finetuning, lr 5e-5",
    ),
}


def override(space: SearchSpace, spec: dict[str, Any]) -> SearchSpace:
    """Replace ranges: ``{"lr": [1e-4, 1e-3]}`` (log-uniform; uniform for ``target_sparsity``) or
    ``{"rank": {"choices": [0, 8]}}``.

    Unknown names are ignored for this method (they may belong to another method's space).
    """
    dists = dict(space.distributions)
    for name, value in spec.items():
        if name not in dists:
            continue
        if isinstance(value, dict) and "choices" in value:
            dists[name] = CategoricalDistribution(list(value["choices"]))
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(x, (int, float)) for x in value):
            lo, hi = float(value[0]), float(value[1])
            if not 0 < lo <= hi:
                raise ValueError(f"search space {name}={value!r} is invalid; accepted: [low, high] with 0 < low <= high")
            if name == "target_sparsity" and not hi < 1:
                raise ValueError(f"search space {name}={value!r} is invalid; accepted: [low, high] with 0 < low <= high < 1")
            dists[name] = FloatDistribution(lo, hi, log=name != "target_sparsity")
        else:
            raise ValueError(f"search space {name}={value!r} is invalid; accepted: [low, high] or {{\"choices\": [...]}}")
    return SearchSpace(space.method, dists, space.reference, space.reference_name, space.fixed)


def get_space(method: str) -> SearchSpace:
    if method not in SPACES:
        raise ValueError(f"method {method!r} has no search space; accepted: {', '.join(SPACES)}")
    return SPACES[method]
