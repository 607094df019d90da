"""Fixtures for the flow tests: a throwaway project per module, a Prefect test harness per session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import copy_repo_as_project, git

VENV_BIN = Path(sys.executable).parent


def make_project(root: Path, tiny_base: Path) -> Path:
    """A git copy of the repo set up for the tiny model, with `tuneloop init` done (data in the remote).

    Like the `project` fixture in tests/conftest.py, but usable by module-scoped fixtures so that one
    project (and its DVC cache) serves a whole module.
    """

    def tiny_orchestration_run(params: dict) -> None:
        params["train"].update(
            epochs=1, learning_rate=0.005, batch_size=32, max_length=32, max_train_examples=300
        )
        params["evaluate"]["counterfactual"]["max_examples"] = 20
        # These tests are about orchestration, not model quality: gates the tiny model passes.
        params["evaluate"]["gates"] = {
            "min_accuracy": 0.0,
            "min_macro_f1": 0.0,
            "max_group_accuracy_gap": 1.0,
            "max_counterfactual_flip_rate": 1.0,
            "max_counterfactual_accuracy_gap": 1.0,
            "max_expected_calibration_error": 1.0,
        }
        params["orchestration"].update(io_retries=2, io_retry_delays_s=[3])

    copy_repo_as_project(root, tiny_base, tiny_orchestration_run)
    init = subprocess.run(
        [str(VENV_BIN / "tuneloop"), "init"], cwd=root, capture_output=True, text=True, env=None
    )
    assert init.returncode == 0, init.stdout + init.stderr
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "track data with DVC")
    return root


@pytest.fixture(scope="module")
def module_env(tmp_path_factory):
    """TUNELOOP_HOME, the DVC remote and MLflow's store in a temp folder, for one module."""
    base = tmp_path_factory.mktemp("flows")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNELOOP_HOME", str(base / "home"))
        patch.setenv("TUNELOOP_DVC_REMOTE", str(base / "remote"))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setenv("DVC_NO_ANALYTICS", "1")
        patch.setenv("PATH", f"{VENV_BIN}:{__import__('os').environ['PATH']}")
        yield base


@pytest.fixture(scope="module")
def flow_project(module_env, tiny_base) -> Path:
    root = module_env / "project"
    root.mkdir()
    return make_project(root, tiny_base)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for every harness test: it takes ~8 s to start."""
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as patch:
        # The temporary server's telemetry heartbeat only adds "database is locked" noise to the logs.
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with prefect_test_harness(server_startup_timeout=60):
            yield
