"""Fixtures for the flow tests: a throwaway project per module, a Prefect test harness per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import VENV_BIN, make_project


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
