import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def loopback_only():
    """Ray and MLflow servers may only run where loopback is the sole interface (unshare -n)."""
    names = [n for _, n in socket.if_nameindex() if n != "lo"]
    if names:
        msg = f"network interfaces {names} exist: run these tests inside a loopback-only namespace (see README)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def spawn_cli(module: str, args: list[str], cwd: Path) -> subprocess.Popen:
    """Start ``python -m module args`` in its own process group, stderr piped (for a sweep to interrupt)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_group(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def run_cli(module: str, args: list[str], cwd: Path, timeout: float = 900, env: dict | None = None):
    """Run ``python -m module args`` in its own process group; kill the whole group on timeout."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", **(env or {})}
    p = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"{module} timed out\n{err[-3000:]}")
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # any leftover child (raylet, gcs) of this group
        except ProcessLookupError:
            pass
    return p.returncode, out, err


@pytest.fixture(scope="session")
def template_db(tmp_path_factory):
    """An empty, migrated MLflow SQLite store; tests copy it (creating one takes seconds)."""
    from mlflow import MlflowClient

    d = tmp_path_factory.mktemp("template")
    MlflowClient(f"sqlite:///{d / 'mlflow.db'}").search_experiments()
    return d / "mlflow.db"
