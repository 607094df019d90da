"""`tuneloop up` / `tuneloop down`: the whole local stack for a newcomer, started and stopped together.

MLflow (UI + registry on SQLite, artifacts in TUNELOOP_HOME, with authentication and the promotion
rules: `--app-name tuneloop`), the Prefect server (UI), the
deployments, a worker, and the dev and prod model servers. Each runs as its own process group with its
log in `$TUNELOOP_HOME/logs/`; Ctrl-C (or `tuneloop down` for a stack started with `--background`)
stops them in reverse order, politely first. A process manager such as honcho would do the same
with a Procfile, but would be one more dependency for ~100 lines, and could not wait for each
server's health before starting what needs it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from urllib.parse import urlparse

import httpx

from registry.access import (
    ADMIN_USERNAME,
    add_user,
    auth_server_command,
    auth_server_environment,
    generated_password,
)
from tuneloop.config import DEFAULT_GATEWAY_PORTS, Environment
from tuneloop.local_engines import LOCAL_S3_CREDENTIALS, STOP_SIGNAL_POSTGRES, LocalPostgres, LocalS3
from tuneloop.prometheus import (
    ALERT_RULES,
    DEFAULT_PROMETHEUS_PORT,
    prometheus_command,
    ready_url,
    write_prometheus_config,
)
from tuneloop.stores import STORE_CHOICES, ensure_bucket, ensure_databases
from tuneloop.tracking import acting_as

PID_FILE = "stack.pid"
READY_LINE = "tuneloop is up:"
# Without these two nothing else works: their exit stops the stack.
CORE_SERVICES = {"postgres", "s3", "mlflow", "prefect"}
LOCAL_BUCKET = "tuneloop"
STOP_GRACE_S = 15.0


@dataclass(frozen=True)
class StackPorts:
    """Where each service listens: TUNELOOP_MLFLOW_PORT, TUNELOOP_PREFECT_PORT, TUNELOOP_<ENV>_URL."""

    mlflow: int
    prefect: int
    gateways: dict[str, int]

    @classmethod
    def from_env(cls, env: Environment) -> StackPorts:
        """Model servers listen where TUNELOOP_DEV_URL / TUNELOOP_PROD_URL say the gateways are."""
        return cls(
            mlflow=env.mlflow_port,
            prefect=env.prefect_port,
            gateways={
                alias: urlparse(url).port or DEFAULT_GATEWAY_PORTS[alias]
                for alias, url in env.gateway_urls.items()
            },
        )


@dataclass
class Service:
    name: str
    args: list[str]
    health_url: str | None = None
    process: subprocess.Popen | None = None
    # Added to the stack's environment for this service only (its identity and secrets).
    env: dict[str, str] = field(default_factory=dict)
    # Readiness for a service that speaks no HTTP (PostgreSQL); health_url is the HTTP equivalent.
    ready: Callable[[], bool] | None = None
    stop_signal: int = signal.SIGTERM


# Service identities the stack creates on its MLflow server, with their tuneloop roles.
TRAINER_IDENTITY = "tuneloop-trainer"
DEPLOYER_IDENTITY = "tuneloop-deployer"
GATEWAY_IDENTITY = "tuneloop-gateway"
SERVICE_IDENTITIES = {TRAINER_IDENTITY: "trainer", DEPLOYER_IDENTITY: "deployer", GATEWAY_IDENTITY: "viewer"}


@dataclass(frozen=True)
class StackSecrets:
    """Passwords of the stack's MLflow admin and service identities: generated once, files of mode 0600."""

    folder: Path

    @property
    def admin_password_file(self) -> Path:
        return self.folder / "mlflow-admin.password"

    def password_file(self, identity: str) -> Path:
        return self.folder / f"{identity}.password"

    def password(self, identity: str) -> str:
        return generated_password(self.password_file(identity))

    def admin_password(self, env: Environment) -> str:
        if env.mlflow_admin_password is not None:
            return env.mlflow_admin_password.get_secret_value()
        return generated_password(self.admin_password_file)

    def as_identity(self, identity: str) -> dict[str, str]:
        """The variables MLflow's client reads to act as ``identity``."""
        return {"MLFLOW_TRACKING_USERNAME": identity, "MLFLOW_TRACKING_PASSWORD": self.password(identity)}


def provision_identities(tracking_uri: str, secrets: StackSecrets, admin_password: str) -> None:
    """Create the service identities and the roles (idempotent), acting as the MLflow admin."""
    from mlflow.server.auth.client import AuthServiceClient

    with acting_as(ADMIN_USERNAME, admin_password):
        client = AuthServiceClient(tracking_uri)
        for identity, role in SERVICE_IDENTITIES.items():
            add_user(client, identity, secrets.password(identity), [role])


def _tuneloop(*args: str) -> list[str]:
    return [sys.executable, "-m", "tuneloop.cli", *args]


def stack_environment(env: Environment, ports: StackPorts) -> dict[str, str]:
    """What every service and flow run sees: the stack's MLflow and Prefect servers, the same home."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TUNELOOP_HOME": str(env.home_dir),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports.mlflow}",
        "PREFECT_API_URL": f"http://127.0.0.1:{ports.prefect}/api",
        "PREFECT_HOME": str(env.home_dir / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **env.stores.server_environment(),
    }


def local_store_services(env: Environment) -> tuple[list[Service], dict[str, str]]:
    """`--stores postgres+s3`: a PostgreSQL cluster in $TUNELOOP_HOME/postgres and an S3 endpoint (moto)
    for each store the environment does not already name, and the variables that point the stack at them.
    """
    listed: list[Service] = []
    variables: dict[str, str] = {}
    if env.database_url is None:
        postgres = LocalPostgres(env.home_dir / "postgres", env.postgres_port)
        postgres.initialise()
        listed.append(
            Service("postgres", postgres.command(), ready=postgres.is_ready, stop_signal=STOP_SIGNAL_POSTGRES)
        )
        variables["TUNELOOP_DATABASE_URL"] = postgres.url
    if env.s3_url is None:
        s3 = LocalS3(env.s3_port)
        listed.append(Service("s3", s3.command(), ready=s3.is_ready))
        variables |= {"TUNELOOP_S3_URL": f"s3://{LOCAL_BUCKET}", "TUNELOOP_S3_ENDPOINT_URL": s3.endpoint_url}
        variables |= {name: os.environ.get(name, value) for name, value in LOCAL_S3_CREDENTIALS.items()}
    return listed, variables


def services(
    env: Environment, ports: StackPorts, serve_available: bool, secrets: StackSecrets
) -> list[Service]:
    home = env.home_dir
    # The promotion flow acts as the deployer; everything else the worker runs acts as the trainer.
    worker_env = secrets.as_identity(TRAINER_IDENTITY) | {
        "TUNELOOP_DEPLOYER_USERNAME": DEPLOYER_IDENTITY,
        "TUNELOOP_DEPLOYER_PASSWORD_FILE": str(secrets.password_file(DEPLOYER_IDENTITY)),
    }
    listed = [
        Service(
            "mlflow",
            auth_server_command(
                sys.executable,
                env.stores.mlflow_backend_store_uri or f"sqlite:///{env.paths.mlflow_db}",
                env.stores.mlflow_artifacts_destination or home / "mlartifacts",
                ports.mlflow,
            ),
            f"http://127.0.0.1:{ports.mlflow}/health",
            env=auth_server_environment(
                home / "mlflow-auth",
                secrets.admin_password(env),
                generated_password(secrets.password_file("mlflow-flask-secret")),
                env.stores.mlflow_auth_database_uri,
            ),
        ),
        Service(
            "prefect",
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(ports.prefect),
            ],
            f"http://127.0.0.1:{ports.prefect}/api/health",
        ),
        Service("worker", _tuneloop("worker", "--name", "tuneloop-up"), env=worker_env),
    ]
    if serve_available:
        for alias, port in ports.gateways.items():
            serve = _tuneloop("serve", "--env", alias, "--port", str(port))
            listed.append(Service(f"serve-{alias}", serve, env=secrets.as_identity(GATEWAY_IDENTITY)))
    return listed


def wait_ready(name: str, process: subprocess.Popen, ready: Callable[[], bool], seconds: float) -> None:
    """Until ``ready()``; fails early, with the exit code, when the process dies."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} while starting")
        if ready():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{name} was not ready within {seconds:.0f} s")


def answers_200(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def wait_healthy(name: str, process: subprocess.Popen, health_url: str, seconds: float) -> None:
    """Until ``health_url`` answers 200; fails early, with the exit code, when the process dies."""
    try:
        wait_ready(name, process, answers_200(health_url), seconds)
    except TimeoutError:
        raise TimeoutError(f"{name} did not answer {health_url} within {seconds:.0f} s") from None


def _start(service: Service, environ: dict[str, str], cwd: Path, logs: Path) -> subprocess.Popen:
    log_file = open(logs / f"{service.name}.log", "ab")  # noqa: SIM115 - the child keeps it open
    # Own process group: Ctrl-C reaches only this supervisor, which stops the services in order.
    service.process = subprocess.Popen(
        service.args,
        cwd=cwd,
        env=environ | service.env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return service.process


def _stop(service: Service) -> None:
    process = service.process
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, service.stop_signal)
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def prometheus_service(env: Environment, ports: StackPorts) -> Service:
    """Prometheus on loopback scraping the stack's gateways, with the repo's alert rules.

    Its scrape key (scope admin, which /metrics needs) is created once in the gateways' key file and
    kept in ``$TUNELOOP_HOME/secrets/prometheus-scrape.key``; only its hash is in the key file.
    """
    from serving.auth import create_api_key

    key_file = env.home_dir / "secrets" / "prometheus-scrape.key"
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(create_api_key(env.api_keys_path, "prometheus-scrape", ["admin"]))
        key_file.chmod(0o600)
    scheme = "https" if env.tls_cert_file else "http"
    config = write_prometheus_config(
        env.home_dir / "prometheus",
        {alias: f"{scheme}://127.0.0.1:{port}" for alias, port in ports.gateways.items()},
        env.project_dir / ALERT_RULES,
        credentials_file=key_file,
        ca_file=Path(env.tls_cert_file) if env.tls_cert_file else None,
    )
    command = prometheus_command(config, env.home_dir / "prometheus" / "data", DEFAULT_PROMETHEUS_PORT)
    return Service("prometheus", command, ready_url(DEFAULT_PROMETHEUS_PORT))


def up(env: Environment, serve_available: bool, stores: str = "env", prometheus: bool = False) -> int:
    """Start the stack, print where everything is, and stop it all on Ctrl-C or SIGTERM.

    ``prometheus``: also Prometheus scraping the gateways, with deploy/monitoring's alert rules.
    """
    if stores not in STORE_CHOICES:
        raise ValueError(f"--stores takes one of {STORE_CHOICES}, got {stores!r}")
    store_services, store_variables = local_store_services(env) if stores == "postgres+s3" else ([], {})
    if store_variables:
        # Every service and flow run reads its stores from these, as on a team's machines.
        os.environ.update(store_variables)
        env = Environment.from_env(env.project_dir)
    ports = StackPorts.from_env(env)
    logs = env.home_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll otherwise
    pid_path = env.home_dir / PID_FILE
    running = running_stack_pid(env.home_dir)
    if running is not None:
        print(f"a stack is already running (pid {running}): `tuneloop down` first")
        return 1
    pid_path.write_text(str(os.getpid()))
    environ = stack_environment(env, ports)
    secrets = StackSecrets(env.home_dir / "secrets")
    started: list[tuple[Service, subprocess.Popen]] = []

    def request_stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # `tuneloop down` sends SIGTERM: stop the same way as on Ctrl-C.
    signal.signal(signal.SIGTERM, request_stop)
    try:
        extra = [prometheus_service(env, ports)] if prometheus and serve_available else []
        for service in [*store_services, *services(env, ports, serve_available, secrets), *extra]:
            if service.name == "mlflow":
                # The servers' databases and bucket exist before the servers that use them start.
                created = ensure_databases(env.stores)
                if ensure_bucket(env.stores):
                    created.append(f"bucket {env.stores.bucket}")
                if created:
                    print(f"created {', '.join(created)}", flush=True)
            process = _start(service, environ, env.project_dir, logs)
            started.append((service, process))
            print(
                f"started {service.name} (pid {process.pid}), log {logs / service.name}.log",
                flush=True,
            )
            if service.health_url:
                wait_healthy(service.name, process, service.health_url, 120)
            if service.ready:
                wait_ready(service.name, process, service.ready, 120)
            if service.name == "mlflow":
                provision_identities(environ["MLFLOW_TRACKING_URI"], secrets, secrets.admin_password(env))
            if service.name == "prefect":
                with open(logs / "deploy.log", "ab") as deploy_log:
                    deployed = subprocess.run(
                        _tuneloop("deploy"),
                        cwd=env.project_dir,
                        env=environ,
                        stdout=deploy_log,
                        stderr=subprocess.STDOUT,
                    )
                print(
                    "deployments "
                    + ("registered" if deployed.returncode == 0 else f"FAILED: see {logs}/deploy.log")
                )
        if not serve_available:
            print("`tuneloop serve` is not available in this version: no model servers started")
        gateway_scheme = "https" if env.tls_cert_file else "http"
        admin_secret = (
            "$TUNELOOP_MLFLOW_ADMIN_PASSWORD" if env.mlflow_admin_password else secrets.admin_password_file
        )
        print(
            f"\n{READY_LINE}\n"
            f"  MLflow UI      http://127.0.0.1:{ports.mlflow}  (user admin, password in {admin_secret})\n"
            "  approvers      tuneloop users add NAME --role approver --password-file FILE  (as admin)\n"
            f"  Prefect UI     http://127.0.0.1:{ports.prefect}\n"
            + "".join(
                f"  {alias:<14} {gateway_scheme}://127.0.0.1:{port}\n"
                for alias, port in ports.gateways.items()
                if serve_available
            )
            + (f"  Prometheus     http://127.0.0.1:{DEFAULT_PROMETHEUS_PORT}\n" if extra else "")
            + f"  stores         {env.stores.describe()}\n"
            + (
                "                 (local S3 keeps objects in memory: `tuneloop down` loses them)\n"
                if any(service.name == "s3" for service in store_services)
                else ""
            )
            + f"  logs           {logs}\n"
            "Use it from another shell with:\n"
            f"  export MLFLOW_TRACKING_URI={environ['MLFLOW_TRACKING_URI']}\n"
            f"  export PREFECT_API_URL={environ['PREFECT_API_URL']}\n"
            "Ctrl-C (or `tuneloop down`) stops everything.",
            flush=True,
        )
        reported: set[str] = set()
        while True:
            for service, process in started:
                code = process.poll()
                if code is None or service.name in reported:
                    continue
                if service.name in CORE_SERVICES:
                    print(f"{service.name} exited with {code}: stopping the stack", flush=True)
                    return 1
                reported.add(service.name)
                print(f"{service.name} exited with {code}: see {logs / service.name}.log", flush=True)
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave servers running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for service, _ in reversed(started):
            _stop(service)
            print(f"stopped {service.name}", flush=True)
        pid_path.unlink(missing_ok=True)


def running_stack_pid(home: Path) -> int | None:
    """The pid of the stack started with this home, if one runs."""
    pid_path = home / PID_FILE
    if not pid_path.exists():
        return None
    pid = int(pid_path.read_text())
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def up_in_background(
    env: Environment, stores: str = "env", seconds: float = 300, prometheus: bool = False
) -> int:
    """`tuneloop up --background`: the same supervisor, detached, logging to $TUNELOOP_HOME/logs/up.log.

    Returns once the stack printed that it is up (or failed), showing the same URLs.
    """
    logs = env.home_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / "up.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            _tuneloop("up", "--stores", stores, *(["--prometheus"] if prometheus else [])),
            cwd=env.project_dir,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            handle.seek(offset)
            output = handle.read()
        if READY_LINE in output:
            print(
                output[output.index(READY_LINE) :].replace("Ctrl-C (or `tuneloop down`)", "`tuneloop down`")
            )
            print(f"running in the background (pid {process.pid}), log {log_path}")
            return 0
        if process.poll() is not None:
            print(output, file=sys.stderr)
            print(
                f"the stack exited with {process.returncode} while starting; log {log_path}", file=sys.stderr
            )
            return 1
        time.sleep(0.5)
    print(f"the stack did not come up within {seconds:.0f} s; see {log_path}; `tuneloop down` stops it")
    return 1


def down(env: Environment) -> int:
    """Stop a stack started with `tuneloop up --background` (SIGTERM to its supervisor, then wait)."""
    pid_path = env.home_dir / PID_FILE
    if not pid_path.exists():
        print(f"no stack is running (no {pid_path})")
        return 0
    pid = int(pid_path.read_text())
    if not _alive(pid):
        pid_path.unlink()
        print(f"the stack (pid {pid}) was not running; removed its stale pid file")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S * 6
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    if _alive(pid):
        print(f"the stack (pid {pid}) did not stop in time", file=sys.stderr)
        return 1
    print("stopped")
    return 0
