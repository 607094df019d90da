"""tuneloop's Prefect work pool on Kubernetes: run by the prefect-worker Deployment's init containers.

    python setup_work_pool.py pool --image IMAGE [--namespace NS]   create or update the Kubernetes pool
    python setup_work_pool.py training                              the training deployment's job variables
    python setup_work_pool.py render --image IMAGE --namespace NS   print the pool's template (for
                                                  `prefect work-pool create --base-job-template FILE`)

The pool is named by TUNELOOP_WORK_POOL; Prefect is reached through PREFECT_API_URL (and
PREFECT_API_AUTH_STRING). Every flow run becomes a Job from ``base-job-template.json`` with the image
the worker itself runs (the overlay's tag) in the worker's namespace. Only the training deployment
(``continuous-training/nightly``) gets ``training-job-variables.json`` on top: its CPU, memory and, in
the prod overlay, a GPU, a node selector and tolerations. prefect.yaml names one pool for all four
deployments, so the GPU cannot be a pool default: the promotion poll (every two minutes), the hourly
drift check and the daily retention would each hold a GPU node. `prefect deploy` resets a deployment's
job variables to prefect.yaml's (none), so ``training`` runs after every `tuneloop deploy`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "base-job-template.json"
TRAINING_VARIABLES = HERE / "training-job-variables.json"
TRAINING_DEPLOYMENT = "continuous-training/nightly"
POOL_TYPE = "kubernetes"
POOL_ENV = "TUNELOOP_WORK_POOL"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def load_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def pool_template(template: dict[str, Any], image: str, namespace: str) -> dict[str, Any]:
    """The base job template with this deployment's image and namespace as the defaults."""
    tagged = ":" in image.rsplit("/", 1)[-1] or "@" in image
    if not tagged:
        raise ValueError(f"image {image!r} has no tag or digest: pass the exact image the worker runs")
    rendered = copy.deepcopy(template)
    properties = rendered["variables"]["properties"]
    properties["image"]["default"] = image
    properties["namespace"]["default"] = namespace
    return rendered


def own_namespace() -> str:
    """The namespace of the pod this runs in (from its service account token's mount)."""
    return SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip()


def pool_name() -> str:
    name = os.environ.get(POOL_ENV)
    if not name:
        raise SystemExit(f"{POOL_ENV} is not set: it names the work pool to create")
    return name


def apply_pool(name: str, template: dict[str, Any]) -> str:
    """Create the Kubernetes pool ``name`` with ``template``, or replace the template of the existing one."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        for _ in range(3):  # two workers starting at once race to create it
            try:
                existing = client.read_work_pool(name)
            except ObjectNotFound:
                try:
                    client.create_work_pool(
                        WorkPoolCreate(name=name, type=POOL_TYPE, base_job_template=template)
                    )
                    return "created"
                except ObjectAlreadyExists:
                    continue
            if existing.type != POOL_TYPE:
                raise SystemExit(
                    f"work pool {name!r} exists with type {existing.type!r}, not {POOL_TYPE!r} (did "
                    f"`tuneloop deploy` run before this?): `prefect work-pool delete {name}`, then restart "
                    "the worker"
                )
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
            return "updated"
    raise SystemExit(f"could not create or read work pool {name!r}")


def check_job_variables(variables: dict[str, Any], template: dict[str, Any]) -> None:
    """Refuse variables the pool does not declare or of the wrong type (the server stores them as given)."""
    import jsonschema

    schema = template["variables"]
    unknown = sorted(set(variables) - set(schema.get("properties", {})))
    if unknown:
        raise ValueError(f"job variables {unknown} are not declared by the work pool's template")
    jsonschema.validate(variables, schema)


def apply_job_variables(deployment_name: str, variables: dict[str, Any]) -> dict[str, Any]:
    """Merge ``variables`` into the job variables of ``deployment_name``; returns the result."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name)
        if deployment.work_pool_name:
            check_job_variables(variables, client.read_work_pool(deployment.work_pool_name).base_job_template)
        merged = {**(deployment.job_variables or {}), **variables}
        client.update_deployment(deployment.id, DeploymentUpdate(job_variables=merged))
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in ("pool", "render"):
        sub = commands.add_parser(command)
        sub.add_argument("--image", required=True, help="the worker image, with its tag or digest")
        sub.add_argument("--namespace", help="default: this pod's namespace")
        sub.add_argument("--template", type=Path, default=TEMPLATE)
    training = commands.add_parser("training")
    training.add_argument("--variables", type=Path, default=TRAINING_VARIABLES)
    training.add_argument("--deployment", default=TRAINING_DEPLOYMENT)
    args = parser.parse_args(argv)

    if args.command == "training":
        merged = apply_job_variables(args.deployment, load_json(args.variables))
        print(f"{args.deployment}: job variables {json.dumps(merged, sort_keys=True)}")
        return 0
    template = pool_template(load_json(args.template), args.image, args.namespace or own_namespace())
    if args.command == "render":
        json.dump(template, sys.stdout, indent=2)
        print()
        return 0
    name = pool_name()
    action = apply_pool(name, template)
    namespace = template["variables"]["properties"]["namespace"]["default"]
    print(f"work pool {name!r} ({POOL_TYPE}) {action}: flow runs use {args.image} in {namespace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
