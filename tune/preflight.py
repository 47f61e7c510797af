"""Sweep-level checks made before ``tune.run`` starts Ray, creates an MLflow run or writes a file:
every task's data, the model, the output and storage paths, the tracking store, the Optuna storage and
the Ray address.
Each check returns one-line problems naming the task / file / value and what is accepted.
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from finegates.config import TrainConfig
from finegates.preflight import check_model, check_output_dir
from tasks import check_task_data, get_task
from tune.studies import check_storage as check_optuna_storage

#: seconds to wait for a TCP connection to the Ray cluster's GCS (or Ray Client) port
ADDRESS_TIMEOUT_S = 3.0


def check_address(address: str | None, timeout_s: float = ADDRESS_TIMEOUT_S) -> list[str]:
    """The Ray cluster at ``address`` ('auto', host:port, ray://host:port) accepts a TCP connection
    within ``timeout_s``; nothing to check for a local Ray (None)."""
    if address in (None, "", "local"):
        return []
    accepted = "accepted: 'auto' (a cluster started on this machine with `ray start`), host:port of a running " \
               "head's GCS, ray://host:port, or no --address for a local Ray"
    if address.startswith("ray://"):
        hostport = address[len("ray://"):].rstrip("/")
        if ":" not in hostport:
            hostport += ":10001"
    elif address == "auto":  # RAY_ADDRESS, else the cluster `ray start` recorded on this machine
        from ray._private.services import get_ray_address_from_environment

        try:
            hostport = get_ray_address_from_environment("auto", None)
        except ConnectionError:
            hostport = None
        if not hostport or hostport == "auto":
            return [f"--address 'auto': no running Ray cluster found on this machine (RAY_ADDRESS unset, no "
                    f"`ray start`); {accepted}"]
    else:
        hostport = address
    if ":" not in hostport:
        return [f"--address {address!r} is not host:port; {accepted}"]
    host, _, port = hostport.rpartition(":")
    try:
        port_n = int(port)
    except ValueError:
        return [f"--address {address!r} has no valid port; {accepted}"]
    try:
        with socket.create_connection((host.strip("[]"), port_n), timeout=timeout_s):
            pass
    except OSError as e:
        why = "timed out" if isinstance(e, socket.timeout) else (e.strerror or type(e).__name__)
        return [f"--address {address!r}: nothing answers at {host}:{port_n} within {timeout_s:g} s ({why}); "
                f"{accepted}"]
    return []


def check_tracking_path(uri: str) -> list[str]:
    """A local tracking store (sqlite:///path or a directory) is not a directory / a file respectively."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if db.is_dir():
            return [f"--mlflow-uri {uri!r}: {str(db)!r} is a directory; accepted: sqlite:///<path of a database file>"]
        return []
    if "://" not in uri or uri.startswith("file://"):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return check_output_dir(path, "--mlflow-uri")
    return []


def check_storage(storage: str) -> list[str]:
    if storage.startswith("file://"):
        storage = storage[len("file://"):]
    if "://" in storage:
        return []  # a cloud URI: checked by Ray when it writes
    return check_output_dir(storage, "--storage")


def check_sweep(v: dict[str, Any], address: str | None) -> list[str]:
    """Every problem of a validated sweep configuration (see :func:`tune.run.validate`), one line each."""
    problems: list[str] = []
    for t in v["tasks"]:
        problems += check_task_data(get_task(t), v["train"].get("data_dir"))
    max_length = TrainConfig(task=v["tasks"][0], **v["train"]).max_length  # validated by tune.run already
    texts = max(len(get_task(t).text_columns) for t in v["tasks"])
    problems += check_model(v["train"]["model"], {"--max-length": max_length}, texts=texts)
    problems += check_output_dir(v["out"], "--out")
    problems += check_storage(v["storage"])
    problems += check_tracking_path(v["uri"])
    problems += check_optuna_storage(v["optuna_storage"])
    problems += check_address(address)
    return problems
