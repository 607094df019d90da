"""The real engines of the shared-store tests, on loopback: a PostgreSQL cluster and moto's S3 server.

Started once per session by tests/conftest.py (`postgres_server`, `s3_server`) with the same commands
`tuneloop up --stores postgres+s3` runs (tuneloop/local_engines.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.stack import wait_ready
from tuneloop.local_engines import LocalPostgres, LocalS3, free_port, postgres_bin_dir


def _stop(process: subprocess.Popen, stop_signal: int) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, stop_signal)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def require_postgres() -> None:
    """Skip where PostgreSQL's server is not installed, except in CI, which installs it (.ci/run)."""
    try:
        postgres_bin_dir()
    except FileNotFoundError as missing:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(missing))


@contextlib.contextmanager
def running_postgres() -> Iterator[LocalPostgres]:
    # Not under pytest's tmp_path: its 0700 root-owned parents are closed to the `postgres` user.
    folder = Path(tempfile.mkdtemp(prefix="tuneloop-pg-"))
    server = LocalPostgres(folder, free_port())
    server.initialise()
    log = open(folder / "server.log", "ab")  # noqa: SIM115 - the server keeps it open
    process = subprocess.Popen(server.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready("PostgreSQL", process, server.is_ready, 30)
        yield server
    finally:
        _stop(process, signal.SIGINT)
        log.close()
        subprocess.run(["rm", "-rf", str(folder)], check=False)


@contextlib.contextmanager
def running_s3() -> Iterator[LocalS3]:
    server = LocalS3(free_port())
    process = subprocess.Popen(
        server.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_ready("moto S3 server", process, server.is_ready, 30)
        yield server
    finally:
        _stop(process, signal.SIGTERM)
