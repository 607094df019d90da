"""Fixtures shared by every tier; the helpers they use live in tests/support.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.engines import require_postgres, running_postgres, running_s3
from tests.support import (
    build_tiny_base,
    build_tiny_decoder,
    copy_repo_as_project,
    train_tiny_adapter,
    train_tiny_generator,
    two_label_slice,
    work_in_project,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_base) -> Path:
    """A working two-intent adapter on the tiny base (trained once; tests copy it before changing it)."""
    folder = tmp_path_factory.mktemp("tiny-adapter")
    return train_tiny_adapter(two_label_slice(), tiny_base, folder / "adapter")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_decoder(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory, tiny_llama) -> Path:
    """A tiny Llama adapter that answers `tests.support.memorised_pairs` exactly (trained once)."""
    return train_tiny_generator(tiny_llama, tmp_path_factory.mktemp("tiny-generator") / "adapter")


@pytest.fixture
def project(tmp_path, tiny_base, monkeypatch) -> Path:
    """A fresh git clone-like copy of the repo, configured for the tiny model and a fast run."""
    root = tmp_path / "project"

    def tiny_fast_run(params: dict) -> None:
        params["train"].update(epochs=2, learning_rate=0.005, batch_size=32)
        params["evaluate"]["counterfactual"]["max_examples"] = 40

    copy_repo_as_project(root, tiny_base, tiny_fast_run)
    return work_in_project(monkeypatch, root, tmp_path)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for every harness test: it takes ~8 s to start."""
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as patch:
        # The temporary server's telemetry heartbeat only adds "database is locked" noise to the logs.
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with prefect_test_harness(server_startup_timeout=60):
            yield


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL cluster on 127.0.0.1 for the session (tests make their own databases)."""
    require_postgres()
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 for the session, with dummy credentials in this process."""
    from tuneloop.local_engines import LOCAL_S3_CREDENTIALS

    with pytest.MonkeyPatch.context() as patch:
        for name, value in LOCAL_S3_CREDENTIALS.items():
            patch.setenv(name, value)
        with running_s3() as server:
            yield server
