"""cluster.yaml against Ray's own cluster-config schema, and our own rules for it."""
import copy
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def config():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_valid_for_rays_launcher(config):
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(max_worker=4),  # misspelt key
    lambda c: c["available_node_types"]["gpu"].update(min_worker=0),
    lambda c: c.pop("provider"),  # a field the launcher needs
    lambda c: c["provider"].pop("type"),
    lambda c: c["available_node_types"]["gpu"].pop("node_config"),
    lambda c: c.update(head_node_type="nope"),
])
def test_unknown_keys_and_missing_fields_fail(config, mutate):
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        validate_config(prepare_config(config))


def test_our_rules(config):
    head, gpu = config["available_node_types"]["head"], config["available_node_types"]["gpu"]
    assert head["resources"] == {"CPU": 0}  # no trial on the head
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert config["idle_timeout_minutes"] > 0
    # only SSH is open to the outside
    perms = config["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in perms] == [(22, 22)]
    # the project is installed at the repository's own version
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    setup = " ".join(config["setup_commands"])
    assert f"git checkout v{version}" in setup
    assert "torch==" + re.search(r'"torch==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1) in setup
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    assert "postgresql://" in start and "--artifacts-destination s3://" in start
    assert any("MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in c for c in config["worker_start_ray_commands"])
