"""The Kubernetes manifests (deploy/k8s): each overlay renders with `kubectl kustomize`, validates offline
against a pinned Kubernetes version (kubernetes-validate --strict, no API server), and agrees with the
code on images, ports, probes, commands and environment variable names; the Prefect work pool's base
job template renders, through Prefect's own templating, into a valid Job with a GPU for training in
prod only; the network policies say who reaches what; every Secret they need is documented.

Nothing here talks to a cluster: what only a real cluster shows (scheduling, the CNI enforcing the
policies, the device plugin, images that exist) is listed in docs/kubernetes.md.
"""

from __future__ import annotations

import ast
import configparser
import copy
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tuneloop.config import DEFAULT_GATEWAY_PORTS, DEFAULT_MLFLOW_PORT, DEFAULT_PREFECT_PORT

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
KUBERNETES_VERSION = "1.31.0"
WORKER_IMAGE = "ghcr.io/tuneloop/tuneloop-worker"
SERVING_IMAGE = "ghcr.io/tuneloop/tuneloop-serving"
WORK_POOL_SETUP = K8S / "base" / "prefect" / "work-pool" / "setup_work_pool.py"
DOCS = ROOT / "docs" / "kubernetes.md"
GPU = "nvidia.com/gpu"

# What every overlay deploys; a change here is a change a user sees in `kubectl get`.
EXPECTED_KINDS = {
    "Namespace": 1,
    "ServiceAccount": 5,
    "Role": 1,
    "RoleBinding": 1,
    "ConfigMap": 3,
    "PersistentVolumeClaim": 1,
    "Deployment": 4,
    "Service": 3,
    "Ingress": 3,
    "HorizontalPodAutoscaler": 1,
    "PodDisruptionBudget": 1,
    "NetworkPolicy": 4,
}

# Variables read by the libraries tuneloop runs rather than by tuneloop itself. Names of MLflow,
# uvicorn and Prefect are checked against the installed package below; these cannot be.
AWS_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}  # boto3/botocore
# prefect-kubernetes settings (KubernetesSettings of prefect-kubernetes 0.8.0), checked against the
# package itself when it is installed.
PREFECT_KUBERNETES_NAMES = {
    "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME",
    "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY",
    "PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES",
}

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl is not on PATH: the overlays are rendered with `kubectl kustomize` (kustomize v5)",
)


# ------------------------------------------------------------------------------------------ rendering


def kustomize(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(K8S / "overlays" / overlay))


def docs_of(overlay: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(rendered(overlay)))


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def generated_config_map(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    """A configMapGenerator's ConfigMap (its name carries a content hash)."""
    found = [
        doc for doc in docs if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].startswith(name + "-")
    ]
    assert len(found) == 1, (
        f"one ConfigMap {name}-<hash> expected, found {[d['metadata']['name'] for d in found]}"
    )
    return found[0]["data"]


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec["containers"])


def overlay_tag(overlay: str, image: str) -> str:
    kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
    return next(entry["newTag"] for entry in kustomization["images"] if entry["name"] == image)


def kubernetes_validate() -> ModuleType:
    return pytest.importorskip(
        "kubernetes_validate.utils",
        reason="kubernetes-validate is not installed (dev extra: kubernetes-validate==1.37.0)",
    )


def validate_strict(doc: dict[str, Any]) -> None:
    import jsonschema

    validator = kubernetes_validate()
    try:
        validator.validate(doc, KUBERNETES_VERSION, True)
    except (validator.ValidationError, jsonschema.ValidationError) as error:
        where = f"{doc['kind']}/{doc['metadata'].get('name') or doc['metadata'].get('generateName')}"
        pytest.fail(f"{where} is not a valid Kubernetes {KUBERNETES_VERSION} object: {error.message}")


# ------------------------------------------------------------------------- the Prefect work pool


@functools.cache
def work_pool_setup() -> ModuleType:
    spec = importlib.util.spec_from_file_location("setup_work_pool", WORK_POOL_SETUP)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def work_pool(overlay: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pool template as the overlay's worker applies it (image, namespace) and the training variables."""
    docs = docs_of(overlay)
    data = generated_config_map(docs, "prefect-work-pool")
    assert data["setup_work_pool.py"] == WORK_POOL_SETUP.read_text(), "the ConfigMap ships another script"
    init = next(
        c
        for c in of_kind(docs, "Deployment")["prefect-worker"]["spec"]["template"]["spec"]["initContainers"]
        if c["name"] == "work-pool"
    )
    assert init["args"][:2] == ["pool", "--image"]
    namespace = of_kind(docs, "Namespace").popitem()[0]
    template = work_pool_setup().pool_template(
        json.loads(data["base-job-template.json"]), init["args"][2], namespace
    )
    return template, json.loads(data["training-job-variables.json"])


def flow_run_job(template: dict[str, Any], job_variables: dict[str, Any]) -> dict[str, Any]:
    """The Job the Kubernetes worker submits for a deployment with ``job_variables``.

    Prefect's own steps: the variables' non-null defaults, overridden by the deployment's variables,
    applied with ``apply_values`` (a placeholder without a value drops its key); then the worker fills
    in the command when the template has none (prefect_kubernetes.worker).
    """
    from prefect.utilities.templating import apply_values

    properties = template["variables"]["properties"]
    values = {name: spec["default"] for name, spec in properties.items() if spec.get("default") is not None}
    values.update(job_variables)
    configuration = apply_values(copy.deepcopy(template["job_configuration"]), values)
    if importlib.util.find_spec("prefect_kubernetes") is not None:
        from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

        KubernetesWorkerJobConfiguration(**copy.deepcopy(configuration))  # its own manifest checks
    job = configuration["job_manifest"]
    job["spec"]["template"]["spec"]["containers"][0].setdefault("args", ["prefect", "flow-run", "execute"])
    return job


def without_prefect_quirks(job: dict[str, Any]) -> dict[str, Any]:
    """prefect-kubernetes requires parallelism and completions (1) in the *pod* spec of its template;
    the API server drops those two unknown fields with a warning. Nothing else may be unknown."""
    job = copy.deepcopy(job)
    pod = job["spec"]["template"]["spec"]
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    return job


# ----------------------------------------------------------------------------- what the code reads


def module_constants(tree: ast.Module) -> dict[str, Any]:
    return {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def env_read_by_config() -> tuple[set[str], list[re.Pattern[str]]]:
    """Names tuneloop/config.py reads (os.environ.get, _optional_path), and patterns for f-string names."""
    tree = ast.parse((ROOT / "tuneloop" / "config.py").read_text())
    constants = module_constants(tree)
    names: set[str] = set()
    patterns: list[re.Pattern[str]] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        function = ast.unparse(node.func)
        if function not in ("os.environ.get", "_optional_path"):
            continue
        argument = node.args[0]
        if isinstance(argument, ast.Constant):
            names.add(argument.value)
        elif isinstance(argument, ast.Name) and argument.id in constants:  # WORK_POOL_ENV
            names.add(constants[argument.id])
        elif isinstance(argument, ast.JoinedStr):
            parts = [
                re.escape(p.value) if isinstance(p, ast.Constant) else "[A-Z0-9_]+" for p in argument.values
            ]
            patterns.append(re.compile("".join(parts)))
    return names, patterns


def model_server_environment() -> set[str]:
    """INHERITED_ENVIRONMENT: what serving/model_server.py passes on to the model server."""
    tree = ast.parse((ROOT / "serving" / "model_server.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "INHERITED_ENVIRONMENT":
            return set(ast.literal_eval(node.value))
    raise AssertionError("INHERITED_ENVIRONMENT not found in serving/model_server.py")


def gateway_routes() -> set[str]:
    """Paths of the routes serving/gateway.py declares (`@app.get("/readyz")`, ...)."""
    tree = ast.parse((ROOT / "serving" / "gateway.py").read_text())
    paths = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in node.decorator_list:
                if (
                    isinstance(decorator, ast.Call)
                    and isinstance(decorator.func, ast.Attribute)
                    and decorator.func.attr in ("get", "post", "put", "delete")
                    and ast.unparse(decorator.func.value) == "app"
                    and decorator.args
                    and isinstance(decorator.args[0], ast.Constant)
                ):
                    paths.add(decorator.args[0].value)
    return paths


def stack_identities() -> dict[str, str]:
    """The service identities flows/stack.py creates (TRAINER_IDENTITY, ...)."""
    constants = module_constants(ast.parse((ROOT / "flows" / "stack.py").read_text()))
    return {name: value for name, value in constants.items() if name.endswith("_IDENTITY")}


def auth_config_written_by_the_code() -> tuple[dict[str, str], str]:
    """registry/access.py's auth_server_environment ini, keys to values ('<runtime>' where computed),
    and the app name `tuneloop up` passes to --app-name."""
    tree = ast.parse((ROOT / "registry" / "access.py").read_text())
    constants = module_constants(tree)
    function = next(
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "auth_server_environment"
    )
    write = next(
        n
        for n in ast.walk(function)
        if isinstance(n, ast.Call) and ast.unparse(n.func).endswith(".write_text")
    )
    text = ""
    for part in write.args[0].values:  # one f-string
        if isinstance(part, ast.Constant):
            text += part.value
        else:
            name = ast.unparse(part.value)
            text += str(constants.get(name, "<runtime>"))
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    return dict(parser["mlflow"]), constants["AUTH_APP_NAME"]


def package_text(package: str, *files: str) -> str:
    spec = importlib.util.find_spec(package)
    assert spec and spec.submodule_search_locations, f"{package} is not installed"
    folder = Path(list(spec.submodule_search_locations)[0])
    return "\n".join((folder / name).read_text() for name in files)


def prefect_setting_names() -> set[str]:
    """Every environment variable Prefect's settings accept (field names and their aliases)."""
    from prefect.settings import Settings
    from pydantic import AliasChoices, BaseModel

    def collect(model: type[BaseModel], found: set[str]) -> set[str]:
        prefix = model.model_config.get("env_prefix", "")
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                collect(field.annotation, found)
                continue
            found.add(f"{prefix}{name}".upper())
            alias = field.validation_alias
            if isinstance(alias, AliasChoices):
                found.update(choice.upper() for choice in alias.choices if isinstance(choice, str))
            elif isinstance(alias, str):
                found.add(alias.upper())
        return found

    names = collect(Settings, set())
    if importlib.util.find_spec("prefect_kubernetes") is not None:
        from prefect_kubernetes.settings import KubernetesSettings

        names |= collect(KubernetesSettings, set())
    else:
        names |= PREFECT_KUBERNETES_NAMES
    return names


def manifest_env(docs: list[dict[str, Any]], template: dict[str, Any]) -> dict[str, set[str]]:
    """Environment variable name -> where it is set (Deployment/container, or the flow-run template)."""
    found: dict[str, set[str]] = {}
    for name, deployment in of_kind(docs, "Deployment").items():
        for container in containers(deployment["spec"]["template"]["spec"]):
            for variable in container.get("env", []):
                found.setdefault(variable["name"], set()).add(f"{name}/{container['name']}")
    job = template["job_configuration"]["job_manifest"]
    for variable in job["spec"]["template"]["spec"]["containers"][0]["env"]:
        found.setdefault(variable["name"], set()).add("flow-run Job")
    return found


def env_value(container: dict[str, Any], name: str) -> Any:
    entry = next((e for e in container.get("env", []) if e["name"] == name), None)
    assert entry is not None, f"{container['name']} does not set {name}"
    return entry.get("value", entry.get("valueFrom"))


# --------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_offline(overlay: str) -> None:
    docs = docs_of(overlay)
    counts = dict(sorted(Counter(doc["kind"] for doc in docs).items()))
    print(f"{overlay}: {len(docs)} resources {counts}")
    assert counts == dict(sorted(EXPECTED_KINDS.items())), f"{overlay}: {counts}"
    namespace = f"tuneloop-{overlay}"
    for doc in docs:
        validate_strict(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]
    assert "Secret" not in counts, "secrets are created by hand (docs/kubernetes.md), never committed"


def test_autoscaling_on_request_rate_is_an_optional_component(tmp_path: Path) -> None:
    """components/hpa-requests-per-second on top of prod renders, validates, and targets a metric that
    prometheus-adapter derives from the counter the gateway exports."""
    relative = Path(os.path.relpath(K8S, tmp_path))
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [str(relative / "overlays" / "prod")],
                "components": [str(relative / "components" / "hpa-requests-per-second")],
            }
        )
    )
    docs = kustomize(tmp_path)
    for doc in docs:
        validate_strict(doc)
    hpa = of_kind(docs, "HorizontalPodAutoscaler")["tuneloop-serving"]
    assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] == [
        "tuneloop_gateway_requests_per_second"
    ]
    assert '"tuneloop_gateway_requests"' in (ROOT / "serving" / "metrics.py").read_text()
    assert "tuneloop_gateway_requests_total" in DOCS.read_text(), "the adapter rule is documented"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_rolls_with_zero_unavailable(overlay: str) -> None:
    for name, deployment in of_kind(docs_of(overlay), "Deployment").items():
        strategy = deployment["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate", name
        assert str(strategy["rollingUpdate"]["maxUnavailable"]) in ("0", "0%"), name
        assert strategy["rollingUpdate"]["maxSurge"] in (1, "25%", "100%"), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_the_two_tuneloop_images_with_the_overlay_tag(overlay: str) -> None:
    docs = docs_of(overlay)
    worker = f"{WORKER_IMAGE}:{overlay_tag(overlay, WORKER_IMAGE)}"
    serving = f"{SERVING_IMAGE}:{overlay_tag(overlay, SERVING_IMAGE)}"
    assert not worker.endswith(":latest") and not serving.endswith(":latest")
    for name, deployment in of_kind(docs, "Deployment").items():
        expected = serving if name == "tuneloop-serving" else worker
        for container in containers(deployment["spec"]["template"]["spec"]):
            assert container["image"] == expected, (name, container["name"], container["image"])
    template, _ = work_pool(overlay)
    assert template["variables"]["properties"]["image"]["default"] == worker, "flow runs use the worker image"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_command_port_and_probes_match_the_code(overlay: str) -> None:
    docs = docs_of(overlay)
    deployment = of_kind(docs, "Deployment")["tuneloop-serving"]
    pod = deployment["spec"]["template"]
    assert [c["name"] for c in containers(pod["spec"])] == ["gateway"], (
        "the model server is the gateway's child"
    )
    gateway = pod["spec"]["containers"][0]
    assert gateway["command"] == ["tuneloop"]
    args = gateway["args"]
    assert args[:2] == ["serve", "--env"] and args[3:6] == ["--host", "0.0.0.0", "--port"], args
    alias, port = args[2], int(args[6])
    assert alias == overlay, "each overlay serves its own alias"
    assert port == DEFAULT_GATEWAY_PORTS[alias], f"--port {port}, the code's default for {alias} is different"
    assert gateway["ports"] == [{"name": "http", "containerPort": port}]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    routes = gateway_routes()
    assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in routes
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {"/readyz", "/healthz"} <= routes, routes
    service = of_kind(docs, "Service")["tuneloop-serving"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert env_value(gateway, "MLFLOW_TRACKING_USERNAME") == stack_identities()["GATEWAY_IDENTITY"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_long_running_container_has_probes_on_a_declared_port(overlay: str) -> None:
    for name, deployment in of_kind(docs_of(overlay), "Deployment").items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            ports = {p["name"] for p in container["ports"]}
            for probe in ("readinessProbe", "livenessProbe"):
                assert container[probe]["httpGet"]["port"] in ports, (name, probe)
            assert (
                "cpu" in container["resources"]["requests"] and "memory" in container["resources"]["limits"]
            )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_and_prefect_run_as_the_code_runs_them(overlay: str) -> None:
    docs = docs_of(overlay)
    deployments = of_kind(docs, "Deployment")
    settings = generated_config_map(docs, "tuneloop-settings")
    ingresses = {name: doc["spec"]["rules"][0]["host"] for name, doc in of_kind(docs, "Ingress").items()}

    pod = deployments["mlflow"]["spec"]["template"]["spec"]
    mlflow = pod["containers"][0]
    ini, app_name = auth_config_written_by_the_code()
    assert mlflow["command"] == ["mlflow"]
    assert mlflow["args"][:5] == ["server", "--app-name", app_name, "--workers", "1"], mlflow["args"]
    assert "--artifacts-destination" in mlflow["args"] and "--backend-store-uri" not in mlflow["args"]
    assert mlflow["ports"][0]["containerPort"] == DEFAULT_MLFLOW_PORT
    # The ini: the code's, except database_uri, which the init container appends from the Secret.
    assert ini.pop("database_uri") == "<runtime>"
    shipped = configparser.ConfigParser(interpolation=None)
    shipped.read_string(generated_config_map(docs, "mlflow-auth")["mlflow-auth.ini"])
    assert dict(shipped["mlflow"]) == ini
    config_path = env_value(mlflow, "MLFLOW_AUTH_CONFIG_PATH")
    init_script = pod["initContainers"][0]["args"][0]
    assert f"> {config_path}" in init_script and "database_uri = " in init_script
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env_value(mlflow, name), f"{name} must come from a Secret"

    # In-cluster clients reach MLflow as http://mlflow:5000: that Host header must be allowed, and
    # the UI's public origin must be, or MLflow refuses an approval made in the UI.
    tracking = settings["MLFLOW_TRACKING_URI"]
    assert tracking == f"http://mlflow:{DEFAULT_MLFLOW_PORT}"
    allowed_hosts = settings["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert tracking.removeprefix("http://") in allowed_hosts and ingresses["mlflow"] in allowed_hosts
    assert settings["MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"] == f"https://{ingresses['mlflow']}"
    assert of_kind(docs, "Service")["mlflow"]["spec"]["ports"][0]["port"] == DEFAULT_MLFLOW_PORT

    server = deployments["prefect-server"]["spec"]["template"]["spec"]["containers"][0]
    assert (
        server["args"][:2] == ["server", "start"]
        and server["ports"][0]["containerPort"] == DEFAULT_PREFECT_PORT
    )
    assert settings["PREFECT_API_URL"] == f"http://prefect-server:{DEFAULT_PREFECT_PORT}/api"
    assert settings["PREFECT_SERVER_UI_API_URL"] == f"https://{ingresses['prefect-server']}/api"
    worker = deployments["prefect-worker"]["spec"]["template"]["spec"]
    assert worker["containers"][0]["args"][:6] == [
        "worker",
        "start",
        "--pool",
        "$(TUNELOOP_WORK_POOL)",
        "--type",
        "kubernetes",
    ]
    assert "tuneloop deploy" in worker["initContainers"][1]["args"][0]
    assert worker["initContainers"][1]["workingDir"] == "/app"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_environment_variable_is_one_the_code_or_its_tools_read(overlay: str) -> None:
    template, _ = work_pool(overlay)
    used = manifest_env(docs_of(overlay), template)
    tuneloop_names, tuneloop_patterns = env_read_by_config()
    model_server = model_server_environment()
    mlflow_source = package_text("mlflow", "environment_variables.py", "utils/cli_args.py", "cli/__init__.py")
    uvicorn_source = package_text("uvicorn", "config.py")
    prefect_names = prefect_setting_names()

    def reader(name: str) -> str | None:
        if name in tuneloop_names or any(p.fullmatch(name) for p in tuneloop_patterns):
            return "tuneloop/config.py"
        if name in model_server:
            return "serving/model_server.py (passed to the model server)"
        if name.startswith("MLFLOW_") and f'"{name}"' in mlflow_source:
            return "mlflow"
        if name.startswith("PREFECT_") and name in prefect_names:
            return "prefect"
        if f'"{name}"' in uvicorn_source:
            return "uvicorn"
        if name in AWS_NAMES:
            return "boto3"
        return None

    unknown = {name: sorted(where) for name, where in used.items() if reader(name) is None}
    assert unknown == {}, f"set in the manifests, read by nothing: {unknown}"
    for name in (
        "MLFLOW_TRACKING_URI",
        "TUNELOOP_HOME",
        "TUNELOOP_INFERENCE_LOG_URL",
        "TUNELOOP_API_KEYS_FILE",
        "TUNELOOP_WORK_POOL",
        "TUNELOOP_DEPLOYER_USERNAME",
        "TUNELOOP_DEPLOYER_PASSWORD_FILE",
    ):
        assert reader(name) == "tuneloop/config.py" and name in used, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_files_named_by_the_environment_are_mounted(overlay: str) -> None:
    """TUNELOOP_API_KEYS_FILE and TUNELOOP_DEPLOYER_PASSWORD_FILE point into their Secret's volume."""
    template, _ = work_pool(overlay)
    cases = [
        (
            of_kind(docs_of(overlay), "Deployment")["tuneloop-serving"]["spec"]["template"]["spec"],
            "TUNELOOP_API_KEYS_FILE",
        ),
        (
            template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"],
            "TUNELOOP_DEPLOYER_PASSWORD_FILE",
        ),
    ]
    for pod, variable in cases:
        path = Path(env_value(pod["containers"][0], variable))
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        volume = next(v for v in pod["volumes"] if v["name"] == mounts[str(path.parent)])
        files = [item["path"] for item in volume["secret"].get("items", [])] or [path.name]
        assert path.name in files, (variable, volume)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_work_pool_template_renders_valid_jobs_with_a_gpu_for_prod_training_only(overlay: str) -> None:
    from prefect.utilities.templating import find_placeholders

    template, training = work_pool(overlay)
    setup = work_pool_setup()
    # What the Prefect server checks when the pool is created: every placeholder is a declared variable.
    declared = set(template["variables"]["properties"])
    for value in template["job_configuration"].values():
        assert {p.name for p in find_placeholders(json.dumps(value))} <= declared
    setup.check_job_variables(training, template)
    with pytest.raises(ValueError, match="not declared"):
        setup.check_job_variables({"gpus": "1"}, template)

    identities = stack_identities()
    jobs = {"training": flow_run_job(template, training), "other flows": flow_run_job(template, {})}
    for which, job in jobs.items():
        validate_strict(without_prefect_quirks(job))
        pod = job["spec"]["template"]
        assert job["metadata"]["namespace"] == f"tuneloop-{overlay}"
        assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "flow-run"
        assert pod["spec"]["serviceAccountName"] == "tuneloop-training"
        container = pod["spec"]["containers"][0]
        assert env_value(container, "MLFLOW_TRACKING_USERNAME") == identities["TRAINER_IDENTITY"]
        assert env_value(container, "TUNELOOP_DEPLOYER_USERNAME") == identities["DEPLOYER_IDENTITY"]
        limits = container["resources"].get("limits", {})
        gpu_training = overlay == "prod" and which == "training"
        placement = pod["spec"].get("nodeSelector")
        print(f"{overlay} {which}: resources {container['resources']}, nodeSelector {placement}")
        if gpu_training:
            assert limits[GPU] == "1"
            assert pod["spec"]["nodeSelector"], "GPU pods go to the GPU nodes"
            assert any(t["key"] == GPU for t in pod["spec"]["tolerations"]), "and tolerate their taint"
        else:
            assert GPU not in limits
            assert "nodeSelector" not in pod["spec"] and "tolerations" not in pod["spec"]
    for name, deployment in of_kind(docs_of(overlay), "Deployment").items():
        for container in containers(deployment["spec"]["template"]["spec"]):
            assert GPU not in json.dumps(container["resources"]), f"{name} holds a GPU all the time"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_pod_security_standard(overlay: str) -> None:
    docs = docs_of(overlay)
    namespace = next(iter(of_kind(docs, "Namespace").values()))
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    template, training = work_pool(overlay)
    pods = {name: d["spec"]["template"]["spec"] for name, d in of_kind(docs, "Deployment").items()}
    pods["flow-run Job"] = flow_run_job(template, training)["spec"]["template"]["spec"]
    for name, pod in pods.items():
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["seccompProfile"] == {"type": "RuntimeDefault"}, (
            name
        )
        assert not any("hostPath" in volume for volume in pod.get("volumes", [])), name
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), name
        for container in containers(pod):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert security["capabilities"]["drop"] == ["ALL"], (name, container["name"])
            assert not security.get("privileged"), (name, container["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_let_only_the_intended_clients_in(overlay: str) -> None:
    docs = docs_of(overlay)
    policies = of_kind(docs, "NetworkPolicy")
    assert policies["default-deny-ingress"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}

    def sources(name: str) -> tuple[set[str], set[str]]:
        """(component labels of pods allowed in, namespaces allowed in) for the policy ``name``."""
        components: set[str] = set()
        namespaces: set[str] = set()
        (rule,) = policies[name]["spec"]["ingress"]
        for peer in rule["from"]:
            assert set(peer) in ({"podSelector"}, {"namespaceSelector"}), peer  # no widening combinations
            if "podSelector" in peer:
                selector = peer["podSelector"]
                if selector.keys() != {"matchExpressions"}:
                    components.add(f"pods {json.dumps(selector)}")  # {} is every pod of the namespace
                    continue
                (expression,) = selector["matchExpressions"]
                assert expression["key"] == "app.kubernetes.io/component" and expression["operator"] == "In"
                components |= set(expression["values"])
            else:
                namespaces.add(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
        assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
        return components, namespaces

    def selects(name: str) -> str:
        return policies[name]["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]

    # The gateway: only from the Ingress controller and Prometheus, no pod of the namespace.
    assert selects("tuneloop-serving") == "serving"
    assert sources("tuneloop-serving") == (set(), {"ingress-nginx", "monitoring"})
    # MLflow: the flow runs (workers) and the gateway, plus people through the Ingress.
    assert selects("mlflow") == "mlflow"
    assert sources("mlflow") == ({"flow-run", "serving"}, {"ingress-nginx"})
    # Prefect: the worker and the flow runs, plus people through the Ingress.
    assert selects("prefect-server") == "prefect-server"
    assert sources("prefect-server") == ({"prefect-worker", "flow-run"}, {"ingress-nginx"})

    # The labels the policies use are the pods' labels, and the named port exists on each target.
    template, _ = work_pool(overlay)
    labels = {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"][
            "spec"
        ]
        for d in of_kind(docs, "Deployment").values()
    }
    labels["flow-run"] = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    for name in ("tuneloop-serving", "mlflow", "prefect-server"):
        pod = labels[selects(name)]
        assert "http" in {p["name"] for c in pod["containers"] for p in c.get("ports", [])}, name
    for name in ("mlflow", "prefect-server"):
        assert sources(name)[0] <= set(labels), name
    # Model servers: loopback only, enforced by the code that starts them.
    assert "def require_loopback" in (ROOT / "serving" / "model_server.py").read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_budget_and_ingress_fit_the_serving_deployment(overlay: str) -> None:
    docs = docs_of(overlay)
    deployment = of_kind(docs, "Deployment")["tuneloop-serving"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the replica count"
    hpa = of_kind(docs, "HorizontalPodAutoscaler")["tuneloop-serving"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "tuneloop-serving",
    }
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    pdb = of_kind(docs, "PodDisruptionBudget")["tuneloop-serving"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    if "minAvailable" in pdb:
        assert pdb["minAvailable"] < hpa["minReplicas"], (
            "a budget as large as the replicas blocks every drain"
        )
    print(f"{overlay}: {hpa['minReplicas']}-{hpa['maxReplicas']} gateway replicas, budget {pdb}")

    hosts = []
    for name, ingress in of_kind(docs, "Ingress").items():
        rule_hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
        tls_hosts = {host for tls in ingress["spec"]["tls"] for host in tls["hosts"]}
        assert rule_hosts <= tls_hosts, f"{name}: every host over TLS"
        hosts += sorted(rule_hosts)
    assert len(hosts) == len(set(hosts))
    other = next(o for o in OVERLAYS if o != overlay)
    other_hosts = {r["host"] for i in of_kind(docs_of(other), "Ingress").values() for r in i["spec"]["rules"]}
    assert not set(hosts) & other_hosts, "dev and prod must not claim the same host names"


def referenced_secrets(docs: list[dict[str, Any]], template: dict[str, Any]) -> dict[str, set[str]]:
    """Secret name -> keys the pods read (env, volumes, the worker's secret for flow-run Jobs)."""
    secrets: dict[str, set[str]] = {}
    pods = [d["spec"]["template"]["spec"] for d in of_kind(docs, "Deployment").values()]
    pods.append(template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"])
    for pod in pods:
        for container in containers(pod):
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secrets.setdefault(ref["name"], set()).add(ref["key"])
            secret_name = {e["name"]: e.get("value") for e in container.get("env", [])}.get(
                "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME"
            )
            if secret_name:
                key = env_value(
                    container, "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY"
                )
                secrets.setdefault(secret_name, set()).add(key)
        for volume in pod.get("volumes", []):
            if "secret" not in volume:
                continue
            items = volume["secret"].get("items")
            if items:
                keys = {item["key"] for item in items}
            else:  # every key is a file: the ones the containers are pointed at
                mounts = {
                    m["mountPath"]
                    for c in containers(pod)
                    for m in c.get("volumeMounts", [])
                    if m["name"] == volume["name"]
                }
                values = [str(e.get("value", "")) for c in containers(pod) for e in c.get("env", [])]
                keys = {Path(v).name for v in values if str(Path(v).parent) in mounts}
                assert keys, f"nothing reads the Secret volume {volume['name']}"
            secrets.setdefault(volume["secret"]["secretName"], set()).update(keys)
    return secrets


def documented_secrets() -> dict[str, set[str]]:
    """`kubectl create secret generic NAME --from-literal=KEY=... --from-file=KEY=...` in the docs."""
    text = DOCS.read_text().replace("\\\n", " ")
    secrets: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = re.search(r"create secret generic ([a-z0-9-]+)(.*)", line)
        if match:
            keys = set(re.findall(r"--from-(?:literal|file)=([A-Za-z0-9_.-]+)=", match.group(2)))
            secrets.setdefault(match.group(1), set()).update(keys)
    return secrets


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_the_pods_read_is_documented_with_its_keys(overlay: str) -> None:
    template, _ = work_pool(overlay)
    needed = referenced_secrets(docs_of(overlay), template)
    documented = documented_secrets()
    missing = {name: sorted(keys - documented.get(name, set())) for name, keys in needed.items()}
    assert {name: keys for name, keys in missing.items() if keys} == {}, f"not in {DOCS.name}: {missing}"
    assert set(documented) == set(needed), "the docs create exactly the Secrets the manifests read"
