"""Search spaces per method, as Optuna distributions, and each method's reference trial.

The ranges are the methods' own plain data (``search``, ``reference``, ``reference_name`` of each module
in finegates/methods/); this module only turns them into Optuna distributions. FineGates searches the
sparsity it is asked to reach, the learning rate (log scale) and the LoRA rank inside the gates; its
reference trial is the dense one (target 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from finegates.methods import METHODS, Choice, LogUniform, Range, Uniform


@dataclass(frozen=True)
class SearchSpace:
    method: str
    distributions: dict[str, BaseDistribution]
    reference: dict[str, Any]  # the first trial of every study; may hold values outside the space
    reference_name: str
    fixed: dict[str, Any] = field(default_factory=dict)  # TrainConfig values for every trial of the method

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        return {name: _suggest(trial, name, dist) for name, dist in self.distributions.items()}

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


def _suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    """One value from ``dist`` through Optuna's public suggest API."""
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, list(dist.choices))
    raise TypeError(f"unsupported distribution {dist!r} for {name!r}")


def distribution(r: Range) -> BaseDistribution:
    """A method's plain-data range as an Optuna distribution."""
    if isinstance(r, Uniform):
        return FloatDistribution(r.low, r.high)
    if isinstance(r, LogUniform):
        return FloatDistribution(r.low, r.high, log=True)
    if isinstance(r, Choice):
        return CategoricalDistribution(list(r.choices))
    raise TypeError(f"unsupported range {r!r}")


SPACES: dict[str, SearchSpace] = {
    name: SearchSpace(name, {k: distribution(r) for k, r in m.search.items()}, dict(m.reference), m.reference_name)
    for name, m in METHODS.items()
}
SEARCHABLE: tuple[str, ...] = tuple(sorted({k for sp in SPACES.values() for k in sp.distributions}))


def override(space: SearchSpace, spec: dict[str, Any]) -> SearchSpace:
    """Replace ranges: ``{"lr": [1e-4, 1e-3]}`` (log-uniform; uniform for ``target_sparsity``) or
    ``{"rank": {"choices": [0, 8]}}``.

    Names of another method's space are ignored for this method; a name in no method's space (a typo such
    as ``lamda``) is refused with a one-line ValueError naming it and the accepted names.
    """
    check_names(spec)
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


def check_names(spec: dict[str, Any], methods: list[str] | None = None) -> None:
    """Refuse a name that no searched method (``methods``; None: any registered method) searches."""
    accepted = SEARCHABLE if methods is None else tuple(sorted({k for m in methods for k in get_space(m).distributions}))
    for name in spec:
        if name not in accepted:
            raise ValueError(f"search space key {name!r} is unknown; accepted: {', '.join(accepted)}")


def get_space(method: str) -> SearchSpace:
    if method not in SPACES:
        raise ValueError(f"method {method!r} has no search space; accepted: {', '.join(SPACES)}")
    return SPACES[method]
