"""The `tuneloop` command: a thin adapter from the command line to the steps of every part.

Each subcommand imports what it needs when it runs, so that `tuneloop --help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tuneloop.config import DEFAULT_GATEWAY_PORTS, Environment, Params, load_params
from tuneloop.io import read_json
from tuneloop.paths import (
    ADAPTER_DIR,
    EVALUATE_METRICS,
    GATES_FILE,
    METRICS_DIR,
    PREPARED_DIR,
    SAMPLE_DATA,
    SAMPLE_PAIRS,
)
from tuneloop.stores import STORE_CHOICES

if TYPE_CHECKING:
    import httpx
    from mlflow.tracking import MlflowClient

log = logging.getLogger("tuneloop")


def _registry_client(env: Environment) -> MlflowClient:
    """An MLflow client on the configured tracking server (the fluent API points there too)."""
    from mlflow.tracking import MlflowClient

    from tuneloop.tracking import use_experiment

    use_experiment(env)
    return MlflowClient()


def _with_venv_on_path() -> dict[str, str]:
    """DVC runs stage commands through the shell: make `python` there the one running tuneloop."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


# What `tuneloop run` prints of metrics/evaluate.json, per task.
HEADLINE_BY_TASK = {
    "classification": (("quality/accuracy", "accuracy"), ("quality/macro_f1", "macro-F1")),
    "generation": (
        ("generation/json_valid_rate", "valid JSON"),
        ("generation/exact_match", "exact match"),
        ("generation/field_micro_f1", "field micro-F1"),
    ),
}


def sample_for(task: str) -> Path:
    """The project's own sample for a task: intents to classify, or support messages -> JSON answers."""
    return SAMPLE_PAIRS if task == "generation" else SAMPLE_DATA


def cmd_init(args: argparse.Namespace) -> int:
    """The sample by default; with --data, the user's own file: checked, DVC-tracked, written into params."""
    env = Environment.from_env()
    if getattr(args, "data", None) is not None:
        from tuneloop.datastore import DatasetRefused, init_dataset

        if not args.text_column or not args.label_column:
            print("--data needs --text-column and --label-column", file=sys.stderr)
            return 2
        try:
            dataset = init_dataset(
                env.project_dir,
                env.project_dir / args.params,
                args.data,
                args.test,
                args.text_column,
                args.label_column,
                tuple(args.group_column),
                env.dvc_remote_url,
                env.s3_endpoint_url,
            )
        except DatasetRefused as refused:
            print(str(refused), file=sys.stderr)
            return 2
        print(dataset.summary())
        return 0
    from tuneloop.datastore import init_project

    params = load_params(env.project_dir / args.params)
    result = init_project(
        env.project_dir,
        env.project_dir / (args.sample or sample_for(params.task)),
        Path(params.data.raw_path),
        env.dvc_remote_url,
        remote_endpoint_url=env.s3_endpoint_url,
    )
    print(
        f"DVC repo {'created' if result.created_dvc_repo else 'ready'}; data {params.data.raw_path} "
        f"(md5 {result.data_md5}){' copied from the sample' if result.copied_sample else ''}; "
        f"remote '{result.remote}' at {result.remote_url}: {result.pushed_files} file(s) pushed"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """init (unless skipped), then `dvc repro`, then attach the final dvc.lock to the MLflow run."""
    env = Environment.from_env()
    if not args.skip_init and cmd_init(args) != 0:
        return 1
    repro = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", *(["--force"] if args.force else [])],
        cwd=env.project_dir,
        env=_with_venv_on_path(),
        check=False,
    )
    if repro.returncode != 0:
        print("dvc repro failed: see the stage output above; nothing was promoted.", file=sys.stderr)
        return repro.returncode
    import mlflow

    from serving.inference import MANIFEST_FILE

    manifest = read_json(env.project_dir / ADAPTER_DIR / MANIFEST_FILE)
    _registry_client(env)
    with mlflow.start_run(run_id=manifest["mlflow_run_id"]) as run:
        mlflow.log_text((env.project_dir / "dvc.lock").read_text(encoding="utf-8"), "lineage/dvc.lock")
    metrics = read_json(env.project_dir / EVALUATE_METRICS)
    gates = read_json(env.project_dir / GATES_FILE)
    headline = HEADLINE_BY_TASK[load_params(env.project_dir / args.params).task]
    print(
        f"MLflow run {run.info.run_id} in {env.tracking_uri}: "
        + ", ".join(f"{label} {metrics[key]:.4f}" for key, label in headline)
        + "; gates "
        + ("passed" if gates["passed"] else "FAILED: " + "; ".join(gates["reasons"]))
    )
    print(f"Browse it with: mlflow ui --backend-store-uri {env.tracking_uri}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    """Register models/adapter as a new version; `dev` when it passes its gates and is not worse than prod."""
    from registry.register import register_workspace

    env = Environment.from_env()
    client = _registry_client(env)
    outcome = register_workspace(env.project_dir, load_params(env.project_dir / args.params), client)
    verdict = "dev" if outcome.promoted_to_dev else "not dev: " + "; ".join(outcome.reasons)
    state = "new" if outcome.new_version else "already registered"
    print(f"{outcome.name} v{outcome.version} ({state}): {verdict}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from registry.promote import PromotionRefused, promote

    env = Environment.from_env()
    params = load_params(env.project_dir / args.params)
    try:
        entry = promote(
            _registry_client(env),
            params.registry.model_name,
            env.paths.registry_audit,
            to=args.to,
            version=args.version,
            reason=args.reason,
            gate_thresholds=params.evaluate.gate_thresholds(params.task),
        )
    except PromotionRefused as refused:
        print(str(refused), file=sys.stderr)
        return 2
    print(f"{entry.model}@{entry.alias}: v{entry.from_version} -> v{entry.to_version} (by {entry.actor})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from registry.promote import PromotionRefused, rollback

    env = Environment.from_env()
    params = load_params(env.project_dir / args.params)
    try:
        entry = rollback(
            _registry_client(env),
            params.registry.model_name,
            env.paths.registry_audit,
            to=args.to,
            reason=args.reason,
        )
    except PromotionRefused as refused:
        print(str(refused), file=sys.stderr)
        return 2
    print(f"{entry.model}@{entry.alias} rolled back: v{entry.from_version} -> v{entry.to_version}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from registry.promote import registry_status

    env = Environment.from_env()
    params = load_params(env.project_dir / args.params)
    name = params.registry.model_name
    client = _registry_client(env)
    for alias, info in registry_status(client, name).items():
        if info is None:
            print(f"{name}@{alias}: -")
            continue
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(info["metrics"].items()))
        print(
            f"{name}@{alias}: v{info['version']} approval={info['approval']} "
            f"gates_passed={info['gates_passed']} {metrics}"
        )
        print(f"  training cost: {_training_cost(client, info['run_id'])}")
    for alias, url in env.gateway_urls.items():
        served = _served_version(url, env.tls_client_context())
        print(f"server {alias} at {url}: {served}")
        if served != "not running":
            print(f"  cost per 1,000 predictions: {_serving_cost(url, env)}")
        if served != "not running" and alias == "prod" and env.api_key is not None:
            print("  " + _canary_status(url, env).replace("\n", "\n  "))
    return 0


def _canary_status(gateway_url: str, env: Environment) -> str:
    answer = _admin_get(gateway_url, "/v1/canary", env, timeout_s=10)
    return f"canary: unknown: {answer}" if isinstance(answer, str) else canary_summary(answer.json())


def _admin_get(gateway_url: str, path: str, env: Environment, timeout_s: float) -> httpx.Response | str:
    """GET one of the gateway's admin endpoints with TUNELOOP_API_KEY; a 200, or why there is none."""
    import httpx

    if env.api_key is None:
        return f"set TUNELOOP_API_KEY to a key with scope admin to read the gateway's {path}"
    try:
        response = httpx.get(
            f"{gateway_url}{path}",
            headers={"X-API-Key": env.api_key.get_secret_value()},
            timeout=timeout_s,
            verify=env.tls_client_context(),
        )
    except httpx.HTTPError as error:
        return f"{path} did not answer ({type(error).__name__})"
    if response.status_code != 200:
        return f"{path} answered HTTP {response.status_code} (TUNELOOP_API_KEY needs scope admin)"
    return response


def _training_cost(client: MlflowClient, run_id: str | None) -> str:
    """The version's training device-hours and USD, as its training run logged them (pipelines/train.py)."""
    metrics = client.get_run(run_id).data.metrics if run_id else {}
    if "cost/training_usd" not in metrics:
        return "not recorded (trained before cost figures were logged)"
    hours, usd = metrics["cost/device_hours"], metrics["cost/training_usd"]
    return f"{hours:.4f} device-hours, ${usd:.6f} at list prices"


def _serving_cost(gateway_url: str, env: Environment) -> str:
    """The gateway's ``tuneloop_cost_per_1000_predictions_usd`` (its /metrics needs scope ``admin``)."""
    from prometheus_client.parser import text_string_to_metric_families

    answer = _admin_get(gateway_url, "/metrics", env, timeout_s=3)
    if isinstance(answer, str):
        return f"unknown: {answer}"
    for family in text_string_to_metric_families(answer.text):
        if family.name == "tuneloop_cost_per_1000_predictions_usd" and family.samples:
            usd = family.samples[0].value
            return f"${usd:.6f} (model-server time x list price, since the gateway started)"
    return "no predictions yet"


def _served_version(gateway_url: str, verify: ssl.SSLContext) -> str:
    import httpx

    try:
        ready = httpx.get(f"{gateway_url}/readyz", timeout=3, verify=verify)
    except httpx.HTTPError:
        return "not running"
    served = ready.json().get("model_version")
    return f"serving v{served}" if served else "running, no version served yet"


def _serving_vetter(env: Environment, params: Params, alias: str) -> Callable[[str], list[str]] | None:
    """The approval check for a vetted alias when the registry is a tracking server (else None, said)."""
    if alias not in params.serving.vetted_aliases:
        return None
    if not env.tracking_uri.startswith(("http://", "https://")):
        log.warning(
            "%s is a local store with no authentication: `%s` is served without server-side approval "
            "records (run `tuneloop up` for a tracking server that enforces them)",
            env.tracking_uri,
            alias,
        )
        return None
    from mlflow.tracking import MlflowClient

    from registry.server_rules import registry_vetter

    client = MlflowClient(tracking_uri=env.tracking_uri, registry_uri=env.tracking_uri)
    return registry_vetter(
        client, params.registry.model_name, alias, params.evaluate.gate_thresholds(params.task)
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve ``<model>@<env>`` at a stable address and follow the alias with zero-downtime swaps."""
    import uvicorn

    from serving.gateway import create_gateway
    from serving.logs import configure_logging, log_format_from
    from serving.routing import BackendPool
    from serving.supervisor import AliasSupervisor, model_server_launcher, registry_version_resolver

    env = Environment.from_env()
    params = load_params(env.project_dir / args.params)
    try:
        log_format = log_format_from(params.serving.log_format, env.log_format)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    # MLflow gives its loggers a handler of their own when imported: import it first, then route them too.
    import mlflow  # noqa: F401 - imported for its logging set-up, before ours replaces it

    configure_logging(log_format, logging.INFO)
    name, settings = params.registry.model_name, params.serving
    pool = BackendPool(name, args.env)
    supervisor = AliasSupervisor(
        pool,
        registry_version_resolver(env.tracking_uri, name, args.env),
        model_server_launcher(env.tracking_uri, name, env.paths.serving_dir(args.env), settings),
        settings,
        vet=_serving_vetter(env, params, args.env),
    )
    if (env.tls_cert_file is None) != (env.tls_key_file is None):
        print("HTTPS needs both TUNELOOP_TLS_CERT_FILE and TUNELOOP_TLS_KEY_FILE", file=sys.stderr)
        return 2
    app = create_gateway(pool, supervisor, params, env)
    port = args.port or DEFAULT_GATEWAY_PORTS[args.env]
    logging.getLogger("httpx").setLevel(logging.WARNING)
    scheme = "https" if env.tls_cert_file else "http"
    print(f"Serving {name}@{args.env} at {scheme}://{args.host}:{port}; server logs: {env.home_dir}/serving")
    uvicorn.run(
        app,
        host=args.host,
        port=port,
        log_level="info",
        log_config=None,  # uvicorn's loggers go through the handler configure_logging installed
        ssl_certfile=env.tls_cert_file,
        ssl_keyfile=env.tls_key_file,
    )
    return 0


def cmd_canary(args: argparse.Namespace) -> int:
    """Start, stop or report the prod gateway's canary (``/v1/canary``, scope ``admin``)."""
    import httpx

    env = Environment.from_env()
    if env.api_key is None:
        print("set TUNELOOP_API_KEY to a key with scope admin", file=sys.stderr)
        return 2
    url = f"{env.gateway_urls['prod']}/v1/canary"
    headers = {"X-API-Key": env.api_key.get_secret_value()}
    params = load_params(env.project_dir / args.params)
    try:
        with httpx.Client(
            headers=headers, timeout=params.serving.start_timeout_s + 30, verify=env.tls_client_context()
        ) as client:
            if args.stop:
                response = client.delete(url, params={"reason": args.reason})
            elif args.shadow or args.percent is not None:
                body = {"shadow": True} if args.shadow else {"percent": args.percent}
                print(f"loading {params.canary.candidate_alias} beside prod (waits for its model server)...")
                response = client.post(url, json=body)
            else:
                response = client.get(url)
    except httpx.HTTPError as error:
        print(f"the prod gateway at {url} did not answer: {type(error).__name__}", file=sys.stderr)
        return 1
    report = response.json()
    if response.status_code != 200:
        print(f"refused ({response.status_code}): {report.get('detail', report)}", file=sys.stderr)
        return 1
    print(canary_summary(report))
    return 0


def canary_summary(report: dict) -> str:
    """The report of ``/v1/canary`` in a few lines (the JSON has every number)."""
    lines = []
    if report.get("mode"):
        share = f" at {report['percent']:g}% of callers" if report["mode"] == "canary" else ""
        lines.append(f"{report['mode']} running{share} since {report['started_at']}")
    else:
        lines.append("no canary running")
    ended = report.get("ended")
    if ended:
        lines.append(f"last one ended {ended['at']} by {ended['by']}: {ended['reason']}")
        report = ended.get("report") or report
    for side in ("prod", "candidate"):
        stats = report.get(side) or {}
        if stats.get("calls"):
            lines.append(
                f"  {side} v{stats['version']}: {stats['calls']} calls, "
                f"error rate {stats['error_rate']:.2%}, "
                f"p50 {stats['p50_ms']} ms, p99 {stats['p99_ms']} ms"
            )
    if report.get("agreement"):
        agreement = report["agreement"]
        low, high = agreement["interval"]
        lines.append(
            f"  agreement {agreement['share']:.1%} on {agreement['texts']} texts ({low:.1%} to {high:.1%})"
        )
    for name in ("error_rate_test", "latency_test"):
        if report.get(name):
            lines.append(
                f"  {name.replace('_', ' ')}: {report[name]['test']}, p = {report[name]['p_value']:.3g}"
            )
    accuracy = report.get("live_accuracy")
    if accuracy:
        for side in ("prod", "candidate"):
            figures = accuracy[side]
            if figures["labelled"]:
                lines.append(
                    f"  live accuracy {side}: {figures['accuracy']:.1%} on {figures['labelled']} labelled"
                )
    return "\n".join(lines)


def cmd_simulate_traffic(args: argparse.Namespace) -> int:
    """Drive a scenario's traffic and feedback through a gateway (see serving/simulate.py)."""
    from serving.simulate import SCENARIOS, scenario_rows, simulate_traffic

    env = Environment.from_env()
    params = load_params(env.project_dir / args.params)
    if env.api_key is None:
        print(
            "set TUNELOOP_API_KEY to a key with scopes predict and feedback: "
            "tuneloop keys create --name simulator --scopes predict feedback",
            file=sys.stderr,
        )
        return 2
    scenario = SCENARIOS[args.scenario]
    rows = scenario_rows(
        env.project_dir / scenario.source,
        params.data.text_column,
        params.data.label_column,
        params.monitoring.window_size if args.requests is None else args.requests,
        args.seed,
    )
    result = simulate_traffic(
        args.url or env.gateway_urls[args.env],
        env.api_key.get_secret_value(),
        rows,
        scenario=args.scenario,
        feedback_share=scenario.feedback_share if args.feedback_share is None else args.feedback_share,
        batch_size=args.batch_size,
        rate_per_s=args.rate,
        seed=args.seed,
        verify=env.tls_client_context(),
    )
    print(result.summary())
    return 0 if result.answered == result.requests else 1


def cmd_deploy(args: argparse.Namespace) -> int:
    """Register prefect.yaml's deployments (and their work pool) against PREFECT_API_URL."""
    from flows.deploy import deploy

    env = Environment.from_env()
    pool = deploy(env.project_dir, load_params(env.project_dir / args.params).orchestration, env.work_pool)
    print(f"deployments registered on work pool {pool!r}; run them with `tuneloop worker`")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Re-queue runs a dead worker left behind, then become a Prefect process worker on the pool."""
    from flows.deploy import start_worker

    env = Environment.from_env()
    start_worker(load_params(env.project_dir / args.params).orchestration, args.name, env.work_pool)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from flows.stack import up, up_in_background

    env = Environment.from_env()
    if args.background:
        return up_in_background(env, args.stores, prometheus=args.prometheus)
    # The model servers need `tuneloop serve`; without it the rest of the stack still starts.
    return up(env, serve_available="cmd_serve" in globals(), stores=args.stores, prometheus=args.prometheus)


def cmd_down(args: argparse.Namespace) -> int:
    from flows.stack import down

    return down(Environment.from_env())


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole loop as a story (flows/demo.py); its servers are named before Prefect is imported."""
    from flows.stack import StackPorts

    env = Environment.from_env()
    ports = StackPorts.from_env(env)
    os.environ.update(
        {
            "TUNELOOP_HOME": str(env.home_dir),
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports.mlflow}",
            "PREFECT_API_URL": f"http://127.0.0.1:{ports.prefect}/api",
            "PREFECT_HOME": str(env.home_dir / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
    )
    # The story is the output: libraries' and the flows' lines go to the Prefect UI, MLflow and the
    # stack's logs, not between the story's lines.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    # MLflow read that variable when `main` imported it; its logger is already set up, so say it here too.
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    from flows.demo import run_demo

    return run_demo(env.project_dir, load_params(env.project_dir / args.params), Environment.from_env)


def cmd_monitor(args: argparse.Namespace) -> int:
    """One drift check now (the `monitor-drift` flow runs the same step on its schedule)."""
    import json

    from monitoring.monitor import NotEnoughTraffic, monitor_once

    env = Environment.from_env()
    outcome = monitor_once(
        env,
        env.project_dir / args.params,
        env.project_dir / args.prepared_dir,
        model_uri=args.model_uri,
        adapter_dir=args.adapter_dir,
        append=not args.no_append,
    )
    if isinstance(outcome, NotEnoughTraffic):
        print(json.dumps(outcome.as_dict()))
        return 0
    result = outcome.as_dict()
    print(json.dumps({"decision": result["decision"], "appended": result["appended"]}, default=str))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Create, list or revoke the gateway's API keys (only their hashes are stored)."""
    import json

    from serving.auth import create_api_key, list_api_keys, revoke_api_key

    path = args.keys_file or Environment.from_env().api_keys_path
    if args.keys_command == "create":
        try:
            key = create_api_key(path, args.name, ",".join(args.scopes).split(","))
        except ValueError as error:
            print(str(error), file=sys.stderr)
            return 2
        sys.stdout.write(f"{key}\n")
        sys.stderr.write(f"Stored its hash in {path}. Copy the key now: it is not shown again.\n")
    elif args.keys_command == "list":
        sys.stdout.write(json.dumps(list_api_keys(path), indent=2) + "\n")
    else:
        try:
            revoke_api_key(path, args.key_id)
        except KeyError as error:
            print(str(error.args[0]), file=sys.stderr)
            return 2
        sys.stderr.write(f"Revoked {args.key_id}.\n")
    return 0


def cmd_users(args: argparse.Namespace) -> int:
    """People and service identities on a tracking server run with `--app-name tuneloop` (admin only).

    MLflow reads the admin's own credentials from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    from registry.access import add_user, ensure_roles, read_password, user_roles

    env = Environment.from_env()
    client = AuthServiceClient(env.tracking_uri)
    try:
        if args.users_command == "add":
            from_env = env.new_user_password.get_secret_value() if env.new_user_password else None
            password = read_password(args.password_file, from_env)
            grant = add_user(client, args.username, password, args.role)
            state = "created" if grant.created else "already existed"
            print(f"{grant.username} {state}; roles now: {', '.join(user_roles(client, args.username))}")
        elif args.users_command == "roles":
            print(", ".join(user_roles(client, args.username)) or "<no tuneloop role>")
        else:
            for role, role_id in ensure_roles(client).items():
                print(f"{role}: MLflow role id {role_id}")
    except (ValueError, OSError, MlflowException) as error:
        print(str(error), file=sys.stderr)
        return 2
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    """Remove one person's rows (by subject id or request ids) from the inference log and dead-letter file."""
    import json

    from serving.gateway import dead_letter_path
    from serving.inference_log import erase

    env = Environment.from_env()
    params = load_params(env.project_dir / args.params)
    try:
        removed = erase(
            env.inference_log_url,
            subject=args.subject,
            request_ids=args.request_id,
            dead_letter_path=dead_letter_path(params.gateway.log_dead_letter_path, env),
        )
    except ValueError as error:
        print(str(error), file=sys.stderr)
        return 2
    print(json.dumps(removed, indent=2))
    return 0


def cmd_model_gate(args: argparse.Namespace) -> int:
    """Judge metrics/ against the base branch's (CI's merge gate; `make model-gate` on a laptop)."""
    from registry.model_gate import run_model_gate

    env = Environment.from_env()
    verdict = run_model_gate(
        args.head_metrics_dir,
        args.base_metrics_dir,
        load_params(env.project_dir / args.params).model_gate.max_metric_drop,
        args.base_label,
        args.metrics_diff,
        args.params_diff,
        args.markdown_out,
        args.step_summary,
    )
    if verdict.passed:
        print(f"model gate passed against {args.base_label}")
        return 0
    print(f"model gate FAILED against {args.base_label}:", *verdict.reasons, sep="\n  ", file=sys.stderr)
    return 1


def cmd_serve_flows(args: argparse.Namespace) -> int:
    """Serve every prefect.yaml deployment from this one process (instead of deploy + worker)."""
    from flows.serve import serve_deployments

    env = Environment.from_env()
    serve_deployments(env.project_dir, load_params(env.project_dir / args.params).orchestration)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Rebuild a registered version in a scratch worktree; 0 when every metric and the adapter match."""
    from registry.reproduce import reproduce_version

    env = Environment.from_env()
    params = load_params(env.project_dir / args.params)
    report = reproduce_version(
        env,
        params,
        version=args.version,
        alias=args.alias,
        keep_worktree=args.keep,
        client=_registry_client(env),
    )
    print(report.summary())
    return 0 if report.reproduced else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneloop", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (relative to the project)")
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init", help="make this a DVC repo, add the sample data, push to the remote")
    init.add_argument(
        "--sample",
        help=f"default: {SAMPLE_DATA} for `task: classification`, {SAMPLE_PAIRS} for `task: generation`",
    )
    init.add_argument("--data", type=Path, help="your own CSV/Parquet/JSONL instead of the sample")
    init.add_argument("--text-column", help="with --data: the column holding the text")
    init.add_argument("--label-column", help="with --data: the column holding the label")
    init.add_argument(
        "--group-column",
        action="append",
        default=[],
        help="with --data: a column for bias slices (repeatable)",
    )
    init.add_argument("--test", type=Path, help="with --data: a frozen test file with the same columns")
    init.set_defaults(handler=cmd_init)

    reproduce = commands.add_parser(
        "reproduce",
        help="rebuild a registered version from its git commit and data; compare metrics and bytes",
    )
    target = reproduce.add_mutually_exclusive_group(required=True)
    target.add_argument("--version", help="registered version number")
    target.add_argument("--alias", help="or an alias (dev, prod)")
    reproduce.add_argument("--keep", action="store_true", help="keep the scratch worktree for inspection")
    reproduce.set_defaults(handler=cmd_reproduce)

    run = commands.add_parser("run", help="init, then run the whole pipeline with `dvc repro`")
    run.add_argument(
        "--sample",
        help=f"default: {SAMPLE_DATA} for `task: classification`, {SAMPLE_PAIRS} for `task: generation`",
    )
    run.add_argument("--skip-init", action="store_true")
    run.add_argument("--force", action="store_true", help="re-run every stage")
    run.set_defaults(handler=cmd_run)

    register = commands.add_parser("register", help="register models/adapter; alias dev when it passes")
    register.set_defaults(handler=cmd_register)

    promote = commands.add_parser("promote", help="move an alias (prod) to an approved dev version")
    promote.add_argument("--to", default="prod")
    promote.add_argument("--version", default=None, help="version number (default: the current dev)")
    promote.add_argument("--reason", default="", help="why, for the audit log")
    promote.set_defaults(handler=cmd_promote)

    rollback = commands.add_parser("rollback", help="move prod back to previous-prod")
    rollback.add_argument("--to", default="prod")
    rollback.add_argument("--reason", default="", help="why, for the audit log")
    rollback.set_defaults(handler=cmd_rollback)

    canary = commands.add_parser(
        "canary", help="try dev on a share of prod's traffic (--percent), mirror to it (--shadow), or --stop"
    )
    canary_mode = canary.add_mutually_exclusive_group()
    canary_mode.add_argument("--percent", type=float, help="share of callers (sticky) answered by dev")
    canary_mode.add_argument("--shadow", action="store_true", help="mirror all traffic to dev; prod answers")
    canary_mode.add_argument("--stop", action="store_true", help="end the running canary or shadow")
    canary.add_argument(
        "--reason", default="stopped by an operator", help="why, for the audit entry (--stop)"
    )
    canary.set_defaults(handler=cmd_canary)

    serve = commands.add_parser("serve", help="serve <model>@<env> at a stable address; swaps on alias moves")
    serve.add_argument("--env", choices=sorted(DEFAULT_GATEWAY_PORTS), default="prod")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=None, help="default: 8000 for prod, 8001 for dev")
    serve.set_defaults(handler=cmd_serve)

    simulate = commands.add_parser(
        "simulate-traffic", help="send a scenario's traffic and feedback through the gateway"
    )
    simulate.add_argument("--scenario", choices=["stable", "data-drift", "concept-drift"], default="stable")
    simulate.add_argument("--env", choices=sorted(DEFAULT_GATEWAY_PORTS), default="prod")
    simulate.add_argument("--url", default=None, help="gateway URL (default: TUNELOOP_<ENV>_URL)")
    simulate.add_argument(
        "--requests",
        type=int,
        default=None,
        help="texts to send (default: monitoring.window_size, one drift window, so that the drift job "
        "judges this scenario alone)",
    )
    simulate.add_argument("--batch-size", type=int, default=1)
    simulate.add_argument("--rate", type=float, default=20.0, help="requests per second")
    simulate.add_argument("--feedback-share", type=float, default=None, help="default: the scenario's")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.set_defaults(handler=cmd_simulate_traffic)

    deploy = commands.add_parser("deploy", help="register prefect.yaml's deployments on the work pool")
    deploy.set_defaults(handler=cmd_deploy)

    worker = commands.add_parser("worker", help="run the deployments: a Prefect process worker on the pool")
    worker.add_argument("--name", default=None, help="worker name (default: Prefect's)")
    worker.set_defaults(handler=cmd_worker)

    up = commands.add_parser("up", help="start MLflow, Prefect, a worker and the model servers; Ctrl-C stops")
    up.add_argument("--background", action="store_true", help="detach; stop with `tuneloop down`")
    up.add_argument(
        "--stores",
        choices=STORE_CHOICES,
        default="env",
        help="env: the stores TUNELOOP_DATABASE_URL / TUNELOOP_S3_URL name (SQLite and folders when unset); "
        "postgres+s3: also start a local PostgreSQL and S3 endpoint for those not named",
    )
    up.add_argument(
        "--prometheus",
        action="store_true",
        help="also start Prometheus (Debian package `prometheus`) scraping the gateways, with the alert "
        "rules of deploy/monitoring/prometheus/alerts.yml",
    )
    up.set_defaults(handler=cmd_up)

    demo = commands.add_parser(
        "demo",
        help="the whole loop once, as a story with each step's numbers and time: train, approve, promote, "
        "serve, drift, retrain, hot swap, rollback; leaves the UIs running (`tuneloop down` stops them)",
    )
    demo.set_defaults(handler=cmd_demo)

    down = commands.add_parser("down", help="stop a stack started with `tuneloop up --background`")
    down.set_defaults(handler=cmd_down)

    monitor = commands.add_parser(
        "monitor", help="one drift check of the inference log now; retrain if warranted"
    )
    monitor.add_argument("--prepared-dir", type=Path, default=PREPARED_DIR, help="the reference's splits")
    source = monitor.add_mutually_exclusive_group()
    source.add_argument("--adapter-dir", type=Path, help="a local adapter folder instead of the registry")
    source.add_argument("--model-uri", help="default: models:/<registry.model_name>/<version in the window>")
    monitor.add_argument("--no-append", action="store_true", help="decide, but never touch the raw data")
    monitor.set_defaults(handler=cmd_monitor)

    keys = commands.add_parser("keys", help="the gateway's API keys: create, list, revoke")
    keys.add_argument("--keys-file", type=Path, help="default: $TUNELOOP_API_KEYS_FILE")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser("create", help="create a key and print it (shown only this once)")
    create.add_argument("--name", required=True, help="who or what uses the key")
    create.add_argument(
        "--scopes", nargs="+", default=["predict"], help="predict, feedback, admin (spaces or commas between)"
    )
    keys_commands.add_parser("list", help="key ids, names, scopes (no secrets)")
    revoke = keys_commands.add_parser("revoke", help="refuse a key from now on")
    revoke.add_argument("key_id")
    keys.set_defaults(handler=cmd_keys)

    erase = commands.add_parser("erase", help="remove a person's rows from the inference log, say what")
    who = erase.add_mutually_exclusive_group(required=True)
    who.add_argument("--subject", help="the end-user id sent as X-Subject-Id with their requests")
    who.add_argument("--request-id", action="append", help="a request id (repeatable)")
    erase.set_defaults(handler=cmd_erase)

    users = commands.add_parser("users", help="tracking-server users and roles: trainer, approver, ...")
    users_commands = users.add_subparsers(dest="users_command", required=True)
    add = users_commands.add_parser("add", help="create a user (if new) and give it roles")
    add.add_argument("username")
    add.add_argument("--role", action="append", required=True, help="trainer, approver, deployer, viewer")
    add.add_argument("--password-file", type=Path, help="default: $TUNELOOP_NEW_USER_PASSWORD")
    roles = users_commands.add_parser("roles", help="a user's tuneloop roles")
    roles.add_argument("username")
    users_commands.add_parser("setup", help="create the four roles (idempotent)")
    users.set_defaults(handler=cmd_users)

    gate = commands.add_parser("model-gate", help="merge gate: metrics/ against the base branch's")
    gate.add_argument("--base-metrics-dir", type=Path, required=True, help="the base branch's metrics/")
    gate.add_argument("--head-metrics-dir", type=Path, default=METRICS_DIR)
    gate.add_argument("--base-label", default="the base branch", help="how the report names the base")
    gate.add_argument("--metrics-diff", type=Path, help="`dvc metrics diff --md` output to include")
    gate.add_argument("--params-diff", type=Path, help="`dvc params diff --md` output to include")
    gate.add_argument("--markdown-out", type=Path, help="write the report here (default: stdout)")
    gate.add_argument("--step-summary", type=Path, help="also append it here ($GITHUB_STEP_SUMMARY)")
    gate.set_defaults(handler=cmd_model_gate)

    serve_flows = commands.add_parser(
        "serve-flows", help="serve prefect.yaml's deployments from this process (no worker needed)"
    )
    serve_flows.set_defaults(handler=cmd_serve_flows)

    status = commands.add_parser("status", help="which version each alias points to, metrics, approval")
    status.set_defaults(handler=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # MLflow's server module imports starlette's WSGI bridge, deprecated upstream: not the user's concern.
    warnings.filterwarnings("ignore", message="starlette.middleware.wsgi is deprecated")
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError

    try:
        return args.handler(args)
    except (FileNotFoundError, ValidationError) as refused:
        # Expected refusals (a missing params.yaml, dvc.lock or stage output; a wrong setting): the
        # message says what and where, a traceback would only bury it.
        print(f"tuneloop {args.command}: {refused}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
