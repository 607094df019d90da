"""A PostgreSQL server and an S3 endpoint on loopback, for `tuneloop up --stores postgres+s3` and the tests.

Teams point tuneloop at the PostgreSQL and S3 they operate (``TUNELOOP_DATABASE_URL``,
``TUNELOOP_S3_URL``); these two let one person rehearse that stack on a laptop, and let the tests run
the real engines: PostgreSQL from the distribution's server package (its own cluster in a folder of
ours, never the system's) and moto's S3 server. Only the commands and readiness checks live here; the
stack's supervisor and the test fixtures run them.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

# PostgreSQL refuses to run as root: as root, the cluster belongs to this system user instead.
POSTGRES_SYSTEM_USER = "postgres"
SUPERUSER = "postgres"
# Where Debian and Ubuntu put the server binaries (initdb is not on PATH there).
DEBIAN_POSTGRES_ROOT = Path("/usr/lib/postgresql")
# moto accepts any credentials; these are set only where none are.
LOCAL_S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "tuneloop-local",
    "AWS_SECRET_ACCESS_KEY": "tuneloop-local-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bin_dir() -> Path:
    """The folder holding ``initdb`` and ``postgres``: on PATH, else the newest Debian-packaged server."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    installed = sorted(
        DEBIAN_POSTGRES_ROOT.glob("*/bin/initdb"), key=lambda path: int(path.parent.parent.name)
    )
    if not installed:
        raise FileNotFoundError(
            "PostgreSQL's server is not installed (no initdb): `apt-get install postgresql`, or point "
            "TUNELOOP_DATABASE_URL at a server you run"
        )
    return installed[-1].parent


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _as_postgres_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", POSTGRES_SYSTEM_USER, "--", *command] if _running_as_root() else command


@dataclass(frozen=True)
class LocalPostgres:
    """A PostgreSQL cluster in ``folder`` listening on 127.0.0.1:``port`` (trust auth on loopback only)."""

    folder: Path
    port: int

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def socket_dir(self) -> Path:
        return self.folder / "socket"

    @property
    def url(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}"

    def initialise(self) -> bool:
        """Create the cluster unless it exists; True if created now (about 1 s)."""
        if (self.data_dir / "PG_VERSION").exists():
            return False
        for folder in (self.folder, self.data_dir, self.socket_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if _running_as_root():
                account = pwd.getpwnam(POSTGRES_SYSTEM_USER)
                os.chown(folder, account.pw_uid, account.pw_gid)
        initdb = [
            str(postgres_bin_dir() / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "--encoding",
            "UTF8",
            "--no-instructions",
        ]
        done = subprocess.run(_as_postgres_user(initdb), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"initdb failed ({done.returncode}): {done.stderr.strip()[-500:]}. As root the folder "
                f"{self.folder} and every folder above it must be reachable by the user "
                f"{POSTGRES_SYSTEM_USER!r}."
            )
        return True

    def command(self) -> list[str]:
        """The server in the foreground; stop it with SIGINT (PostgreSQL's fast shutdown)."""
        server = [
            str(postgres_bin_dir() / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-h",
            "127.0.0.1",
            "-k",
            str(self.socket_dir),
        ]
        return _as_postgres_user(server)

    def is_ready(self) -> bool:
        import psycopg2

        try:
            psycopg2.connect(f"{self.url}/postgres", connect_timeout=2).close()
        except psycopg2.OperationalError:
            return False
        return True


STOP_SIGNAL_POSTGRES = signal.SIGINT


@dataclass(frozen=True)
class LocalS3:
    """moto's S3 server on 127.0.0.1:``port``: objects live in its memory and go with the process."""

    port: int

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        moto = Path(sys.executable).parent / "moto_server"
        executable = str(moto) if moto.exists() else (shutil.which("moto_server") or "moto_server")
        return [executable, "-H", "127.0.0.1", "-p", str(self.port)]

    def is_ready(self) -> bool:
        try:
            return httpx.get(self.endpoint_url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
