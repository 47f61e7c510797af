"""The method registry: one module per method, typed options, search ranges as plain data."""
import dataclasses

import pytest

from finegates import ConfigError, TrainConfig
from finegates.methods import METHOD_NAMES, METHODS, Choice, LogUniform, Uniform, get_method_class


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_each_method_declares_help_options_and_searchable_ranges(name):
    m = METHODS[name]
    assert m.name == name and m.help and "\n" not in m.help
    opts = m.parse_options({})  # the defaults are valid
    option_names = {f.name for f in dataclasses.fields(opts)}
    config_names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, r in m.search.items():
        assert isinstance(r, (Uniform, LogUniform, Choice))
        assert key in config_names or key in option_names, key  # a trial can set what it searches
    assert set(m.reference) == set(m.search) and m.reference_name


def test_unknown_or_mistyped_options_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"^sparta option 'densty' is unknown; accepted: density, scope, targets$"):
        TrainConfig(method="sparta", extra={"densty": 0.1})
    with pytest.raises(ConfigError, match=r"gift-sw option k='many' is invalid; accepted: int"):
        TrainConfig(method="gift-sw", extra={"k": "many"})
    with pytest.raises(ConfigError, match="full option 'k' is unknown; accepted: none"):
        TrainConfig(method="full", extra={"k": 4})
    with pytest.raises(ConfigError, match=r"density=2\.0 is invalid"):
        TrainConfig(method="sparta", extra={"density": 2.0})
    assert get_method_class("gift-sw").parse_options({"k": 4, "targets": ["q", "v"]}).targets == ("q", "v")


def test_train_cli_sets_method_options_and_refuses_typos(capsys):
    from finegates.train import build_parser, main, parse_options

    assert parse_options("sparta", ["density=0.05", "targets=[\"v\"]"]) == {"density": 0.05, "targets": ["v"]}
    assert main(["--method", "sparta", "--option", "densty=0.05"]) == 2
    assert capsys.readouterr().err.strip() == ("error: sparta option 'densty' is unknown; accepted: density, "
                                               "scope, targets")
    helptext = build_parser().format_help()
    assert all(f"{n}:" in " ".join(helptext.split()) for n in METHOD_NAMES)


def test_search_spaces_come_from_the_registry_and_typos_are_refused():
    from tune.space import SPACES, check_names, get_space, override

    assert list(SPACES) == list(METHODS)
    for name, m in METHODS.items():
        assert set(SPACES[name].distributions) == set(m.search) and SPACES[name].reference == m.reference
    with pytest.raises(ValueError, match=r"^search space key 'lamda' is unknown; accepted: .*target_sparsity"):
        override(get_space("finegates"), {"lamda": [1, 2]})
    override(get_space("finegates"), {"k": {"choices": [4]}})  # another method's key: ignored here
    with pytest.raises(ValueError, match="search space key 'k' is unknown; accepted: lr, rank, target_sparsity"):
        check_names({"k": [1, 2]}, ["finegates"])


def test_space_sampling_uses_optunas_public_api():
    import optuna

    from tune.space import get_space

    for name in METHOD_NAMES:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        params = get_space(name).sample(study.ask())
        assert set(params) == set(METHODS[name].search)
