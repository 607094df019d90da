"""The `tuneloop` command: a thin adapter from the command line to the pipeline steps."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pipelines.config import DEFAULT_GATEWAY_PORTS, Environment, load_params
from pipelines.datastore import init_project
from pipelines.io import read_json
from pipelines.tracking import use_experiment
from serving.inference import MANIFEST_FILE

log = logging.getLogger("tuneloop")

SAMPLE_PATH = Path("data/sample/intents.csv")


def _with_venv_on_path() -> dict[str, str]:
    """DVC runs stage commands through the shell: make `python` there the one running tuneloop."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def cmd_init(args: argparse.Namespace) -> int:
    env = Environment.from_env()
    params = load_params(env.project_dir / args.params)
    result = init_project(
        env.project_dir, env.project_dir / args.sample, Path(params.data.raw_path), env.dvc_remote_url
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
    manifest = read_json(env.project_dir / "models/adapter" / MANIFEST_FILE)
    use_experiment(env)
    with mlflow.start_run(run_id=manifest["mlflow_run_id"]) as run:
        mlflow.log_text((env.project_dir / "dvc.lock").read_text(encoding="utf-8"), "lineage/dvc.lock")
    metrics = read_json(env.project_dir / "metrics/evaluate.json")
    gates = read_json(env.project_dir / "metrics/gates.json")
    print(
        f"MLflow run {run.info.run_id} in {env.tracking_uri}: accuracy {metrics['quality/accuracy']:.4f}, "
        f"macro-F1 {metrics['quality/macro_f1']:.4f}; gates "
        + ("passed" if gates["passed"] else "FAILED: " + "; ".join(gates["reasons"]))
    )
    print(f"Browse it with: mlflow ui --backend-store-uri {env.tracking_uri}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    """Register models/adapter as a new version; `dev` when it passes its gates and is not worse than prod."""
    from pipelines.register import main as register_main

    register_main(["--params", args.params])
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from pipelines.promote import AUDIT_FILE, PromotionRefused, promote

    env = Environment.from_env()
    params = load_params(env.project_dir / args.params)
    use_experiment(env)
    try:
        entry = promote(
            MlflowClient(),
            params.registry.model_name,
            env.home_dir / AUDIT_FILE,
            to=args.to,
            version=args.version,
            reason=args.reason,
            gate_thresholds=params.evaluate.gates.model_dump(),
        )
    except PromotionRefused as refused:
        print(str(refused), file=sys.stderr)
        return 2
    print(f"{entry.model}@{entry.alias}: v{entry.from_version} -> v{entry.to_version} (by {entry.actor})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from pipelines.promote import AUDIT_FILE, PromotionRefused, rollback

    env = Environment.from_env()
    params = load_params(env.project_dir / args.params)
    use_experiment(env)
    try:
        entry = rollback(
            MlflowClient(),
            params.registry.model_name,
            env.home_dir / AUDIT_FILE,
            to=args.to,
            reason=args.reason,
        )
    except PromotionRefused as refused:
        print(str(refused), file=sys.stderr)
        return 2
    print(f"{entry.model}@{entry.alias} rolled back: v{entry.from_version} -> v{entry.to_version}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipelines.promote import registry_status

    env = Environment.from_env()
    params = load_params(env.project_dir / args.params)
    use_experiment(env)
    name = params.registry.model_name
    for alias, info in registry_status(MlflowClient(), name).items():
        if info is None:
            print(f"{name}@{alias}: -")
            continue
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(info["metrics"].items()))
        print(
            f"{name}@{alias}: v{info['version']} approval={info['approval']} "
            f"gates_passed={info['gates_passed']} {metrics}"
        )
    for alias, url in env.gateway_urls.items():
        print(f"server {alias} at {url}: {_served_version(url)}")
    return 0


def _served_version(gateway_url: str) -> str:
    import httpx

    try:
        ready = httpx.get(f"{gateway_url}/readyz", timeout=3)
    except httpx.HTTPError:
        return "not running"
    served = ready.json().get("model_version")
    return f"serving v{served}" if served else "running, no version served yet"


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve ``<model>@<env>`` at a stable address and follow the alias with zero-downtime swaps."""
    import uvicorn

    from serving.gateway import create_gateway
    from serving.routing import BackendPool
    from serving.supervisor import AliasSupervisor, model_server_launcher, registry_version_resolver

    env = Environment.from_env()
    params = load_params(env.project_dir / args.params)
    name, settings = params.registry.model_name, params.serving
    pool = BackendPool(name, args.env)
    supervisor = AliasSupervisor(
        pool,
        registry_version_resolver(env.tracking_uri, name, args.env),
        model_server_launcher(env.tracking_uri, name, env.home_dir / "serving" / args.env, settings),
        settings,
    )
    app = create_gateway(pool, supervisor, params, env)
    port = args.port or DEFAULT_GATEWAY_PORTS[args.env]
    logging.getLogger("httpx").setLevel(logging.WARNING)
    print(f"Serving {name}@{args.env} at http://{args.host}:{port}; server logs: {env.home_dir}/serving")
    uvicorn.run(app, host=args.host, port=port, log_level="info")
    return 0


def cmd_simulate_traffic(args: argparse.Namespace) -> int:
    """Drive a scenario's traffic and feedback through a gateway (see serving/simulate.py)."""
    from serving.simulate import SCENARIOS, scenario_rows, simulate_traffic

    env = Environment.from_env()
    params = load_params(env.project_dir / args.params)
    api_key = os.environ.get("TUNELOOP_API_KEY")
    if not api_key:
        print(
            "set TUNELOOP_API_KEY to a key with scopes predict and feedback: "
            "python -m serving.auth create-key --name simulator --scopes predict feedback",
            file=sys.stderr,
        )
        return 2
    scenario = SCENARIOS[args.scenario]
    rows = scenario_rows(
        env.project_dir / scenario.source,
        params.data.text_column,
        params.data.label_column,
        args.requests,
        args.seed,
    )
    result = simulate_traffic(
        args.url or env.gateway_urls[args.env],
        api_key,
        rows,
        scenario=args.scenario,
        feedback_share=scenario.feedback_share if args.feedback_share is None else args.feedback_share,
        batch_size=args.batch_size,
        rate_per_s=args.rate,
        seed=args.seed,
    )
    print(result.summary())
    return 0 if result.answered == result.requests else 1


def cmd_deploy(args: argparse.Namespace) -> int:
    """Register prefect.yaml's deployments (and their work pool) against PREFECT_API_URL."""
    from flows.deploy import deploy

    env = Environment.from_env()
    pool = deploy(env.project_dir, load_params(env.project_dir / args.params).orchestration)
    print(f"deployments registered on work pool {pool!r}; run them with `tuneloop worker`")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Re-queue runs a dead worker left behind, then become a Prefect process worker on the pool."""
    from flows.deploy import start_worker

    env = Environment.from_env()
    start_worker(load_params(env.project_dir / args.params).orchestration, name=args.name)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from flows.stack import up, up_in_background

    env = Environment.from_env()
    if args.background:
        return up_in_background(env)
    # The model servers need `tuneloop serve`; without it the rest of the stack still starts.
    return up(env, serve_available="cmd_serve" in globals())


def cmd_down(args: argparse.Namespace) -> int:
    from flows.stack import down

    return down(Environment.from_env())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneloop", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (relative to the project)")
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init", help="make this a DVC repo, add the sample data, push to the remote")
    init.add_argument("--sample", default=str(SAMPLE_PATH))
    init.set_defaults(handler=cmd_init)

    run = commands.add_parser("run", help="init, then run the whole pipeline with `dvc repro`")
    run.add_argument("--sample", default=str(SAMPLE_PATH))
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
    simulate.add_argument("--requests", type=int, default=200, help="texts to send")
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
    up.set_defaults(handler=cmd_up)

    down = commands.add_parser("down", help="stop a stack started with `tuneloop up --background`")
    down.set_defaults(handler=cmd_down)

    status = commands.add_parser("status", help="which version each alias points to, metrics, approval")
    status.set_defaults(handler=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
