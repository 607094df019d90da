"""`tuneloop demo`: the whole loop once, on the embedded defaults, told as a story with each step's numbers.

train v1 -> register -> approve (a reviewer, not the trainer) -> promote -> serve -> stable traffic (no
drift) -> drifted traffic with feedback -> drift detected -> feedback folded into a new data version ->
v2 trained by the stack's worker and registered -> approved -> hot swap under traffic -> rollback.

It runs in its own clone of this checkout (``$TUNELOOP_HOME/demo/project``, replaced on every run), so the
data commits the drift job makes never touch your branch; it shares ``$TUNELOOP_HOME`` (MLflow store,
DVC remote, inference log, API keys) with the stack it starts, so the UIs left running show it all.
Every part is the real one: `tuneloop up`'s servers, the Prefect flows, the gateway, the drift job.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from flows.stack import (
    DEPLOYER_IDENTITY,
    GATEWAY_IDENTITY,
    PID_FILE,
    TRAINER_IDENTITY,
    StackPorts,
    StackSecrets,
    down,
    running_stack_pid,
    up_in_background,
)
from serving.auth import API_KEY_HEADER, create_api_key, list_api_keys, revoke_api_key
from tuneloop.config import Environment, Params
from tuneloop.paths import DRIFTED_SAMPLE, SAMPLE_DATA
from tuneloop.tracking import acting_as

REVIEWER = "demo-reviewer"
DEMO_KEY_NAME = "tuneloop-demo"
PROD, DEV = "prod", "dev"


class DemoFailed(RuntimeError):
    """A step did not end as the story needs; the message says what happened instead."""


@dataclass
class StepRecord:
    name: str
    seconds: float
    outcome: str
    ok: bool


@dataclass
class Story:
    """A line when a step starts and one with its numbers and time when it ends; the table at the end."""

    write: Callable[[str], None] = print
    steps: list[StepRecord] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @contextlib.contextmanager
    def step(self, name: str, watch: str | None = None) -> Iterator[list[str]]:
        """Yield a list the step appends its numbers to; a failure is recorded with its reason.

        ``watch``: where to follow a long step while it runs (its log lines are not the story's).
        """
        number = len(self.steps) + 1
        self.write(f"[{number:2d}] {name} ...")
        if watch:
            self.write(f"     follow it in {watch}")
        outcome: list[str] = []
        began = time.monotonic()
        try:
            yield outcome
        except Exception as error:
            self.steps.append(StepRecord(name, time.monotonic() - began, f"FAILED: {error}", False))
            self.write(f"     FAILED after {time.monotonic() - began:.1f} s: {error}")
            raise
        record = StepRecord(name, time.monotonic() - began, "; ".join(outcome), True)
        self.steps.append(record)
        self.write(f"     {record.outcome} ({record.seconds:.1f} s)")

    def table(self) -> str:
        width = max((len(step.name) for step in self.steps), default=4)
        lines = [
            f"| {'#':>2} | {'step':<{width}} | {'time':>8} | outcome",
            f"|---|{'-' * (width + 2)}|---|---",
        ]
        for number, step in enumerate(self.steps, start=1):
            lines.append(f"| {number:2d} | {step.name:<{width}} | {step.seconds:7.1f}s | {step.outcome}")
        lines.append(f"total {time.monotonic() - self.started:.1f} s")
        return "\n".join(lines)


@dataclass
class SteadyTraffic:
    """Requests at a steady rate in a background thread, counting what each answer was (a swap's proof)."""

    url: str
    api_key: str
    texts: list[str]
    rate_per_s: float
    statuses: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> SteadyTraffic:
        self._thread = threading.Thread(target=self._send, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _send(self) -> None:
        headers = {API_KEY_HEADER: self.api_key}
        with httpx.Client(base_url=self.url, headers=headers, timeout=30) as client:
            index = 0
            while not self._stop.wait(1.0 / self.rate_per_s):
                began = time.monotonic()
                try:
                    answer = client.post("/v1/predict", json={"text": self.texts[index % len(self.texts)]})
                except httpx.HTTPError as error:
                    self.statuses[type(error).__name__] += 1
                    continue
                finally:
                    index += 1
                self.latencies_ms.append((time.monotonic() - began) * 1000)
                self.statuses[answer.status_code] += 1
                if answer.status_code == 200:
                    self.versions[answer.json()["model_version"]] += 1

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    @property
    def failed(self) -> int:
        return self.sent - self.statuses[200]

    def describe(self) -> str:
        p50 = statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")
        versions = ", ".join(f"v{version}: {count}" for version, count in sorted(self.versions.items()))
        return f"{self.sent} requests, {self.failed} failed, p50 {p50:.0f} ms, answered by {versions}"


def served_version(url: str) -> str | None:
    """What a gateway serves now (its /readyz), None when it serves nothing or does not answer."""
    try:
        version = httpx.get(f"{url}/readyz", timeout=3).json().get("model_version")
    except (httpx.HTTPError, ValueError):
        return None
    return str(version) if version else None


def wait_until_served(url: str, version: str, seconds: float) -> float:
    """Seconds until the gateway at ``url`` answers with ``version``."""
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        if served_version(url) == version:
            return time.monotonic() - began
        time.sleep(1)
    raise DemoFailed(f"{url} still serves v{served_version(url)} after {seconds:.0f} s, not v{version}")


def stack_is_ours(home: Path) -> bool | None:
    """None: no stack runs; True: the one a previous demo started; False: somebody else's."""
    pid = running_stack_pid(home)
    if pid is None:
        return None
    owner = home / "demo" / "stack.pid"
    return owner.exists() and owner.read_text().strip() == str(pid)


def prepare_workspace(checkout: Path, project: Path, env_for: Callable[[Path], Environment]) -> str:
    """A fresh clone of ``checkout``'s HEAD with the sample data tracked by DVC, committed."""
    from tuneloop.config import load_params
    from tuneloop.datastore import init_project

    if project.exists():
        shutil.rmtree(project)
    project.parent.mkdir(parents=True, exist_ok=True)
    _git(project.parent, "clone", "--quiet", "--no-hardlinks", str(checkout), str(project))
    _git(project, "config", "user.name", "tuneloop-demo")
    _git(project, "config", "user.email", "demo@tuneloop.invalid")
    # While init adds the data, DVC stages the pointers itself (the demo commits them) instead of asking
    # you to; not later, when it would also stage dvc.lock, which the drift job's data commit refuses.
    autostage = [sys.executable, "-m", "dvc", "config", "--local", "core.autostage"]
    subprocess.run([*autostage, "true"], cwd=project, check=True, capture_output=True)
    env = env_for(project)
    params = load_params(project / "params.yaml")
    result = init_project(
        project,
        project / SAMPLE_DATA,
        Path(params.data.raw_path),
        env.dvc_remote_url,
        remote_endpoint_url=env.s3_endpoint_url,
    )
    subprocess.run([*autostage, "--unset"], cwd=project, check=True, capture_output=True)
    _git(project, "add", "-A")
    _git(project, "commit", "--quiet", "--allow-empty", "-m", "demo: the sample data, tracked by DVC")
    cloned = _git(checkout, "rev-parse", "--short", "HEAD").strip()
    return f"clone of {cloned} at {project}; data md5 {result.data_md5[:8]}, pushed to {env.dvc_remote_url}"


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def demo_api_key(env: Environment) -> str:
    """A fresh key for the demo's traffic (predict, feedback, admin); the previous demo's is revoked."""
    for key in list_api_keys(env.api_keys_path):
        if key.get("name") == DEMO_KEY_NAME and not key.get("revoked"):
            revoke_api_key(env.api_keys_path, key["id"])
    return create_api_key(env.api_keys_path, DEMO_KEY_NAME, ["predict", "feedback", "admin"])


def wait_for_flow_run(flow_run_id: str, seconds: float) -> Any:
    from uuid import UUID

    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(UUID(flow_run_id))
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                raise DemoFailed(f"flow run {flow_run_id} still {run.state} after {seconds:.0f} s")
            time.sleep(3)


def describe_decision(result: dict[str, Any]) -> str:
    """One line of what the drift job decided, with the concept-drift tests' numbers."""
    decision = result.get("decision") or {}
    reasons = decision.get("reasons") or []
    concept = (result.get("summary") or {}).get("concept_drift") or {}
    tests = ", ".join(
        f"{name} {test['reference']:.3f} -> {test['current']:.3f} (p {test['p_value']:.2g})"
        for name, test in (concept.get("tests") or {}).items()
    )
    estimate = (result.get("summary") or {}).get("performance_estimate")
    if estimate:
        tests = ", ".join(
            part
            for part in (
                tests,
                f"accuracy estimated without labels {estimate['current']:.3f} "
                f"[{estimate['current_low']:.3f}, {estimate['current_high']:.3f}]",
            )
            if part
        )
    verdict = "; ".join(reasons) if reasons else "no drift"
    return verdict + (f"; {tests}" if tests else "")


@dataclass
class DemoRun:
    """What the scenes share: the project, the stack's addresses and credentials, the versions made."""

    checkout: Path
    params: Params
    env_for: Callable[[Path], Environment]
    story: Story = field(default_factory=Story)
    urls: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    api_key: str = ""

    @property
    def home(self) -> Path:
        return self.env_for(self.checkout).home_dir

    @property
    def project(self) -> Path:
        return self.home / "demo" / "project"

    @property
    def env(self) -> Environment:
        return self.env_for(self.project)

    @property
    def secrets(self) -> StackSecrets:
        return StackSecrets(self.home / "secrets")

    @property
    def runs_url(self) -> str:
        return f"{self.urls.get('Prefect UI', 'the Prefect UI')}/runs"

    @property
    def prod_url(self) -> str:
        return self.env.gateway_urls[PROD]

    def as_identity(self, identity: str) -> contextlib.AbstractContextManager[None]:
        return acting_as(identity, self.secrets.password(identity))

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.env.tracking_uri, self.env.tracking_uri)

    def start(self) -> None:
        with self.story.step("stop the previous demo's stack") as said:
            owned = stack_is_ours(self.home)
            if owned is False:
                raise DemoFailed(
                    f"a stack runs from another project ({self.home / PID_FILE}): `tuneloop down`"
                )
            if owned:
                down(self.env_for(self.checkout))
            said.append("stopped" if owned else "none was running")
        with self.story.step("workspace: clone + sample data in DVC") as said:
            said.append(prepare_workspace(self.checkout, self.project, self.env_for))
        with self.story.step("stack: MLflow (auth) + Prefect + worker + gateways") as said:
            captured = io.StringIO()
            with contextlib.redirect_stdout(captured):
                code = up_in_background(self.env, seconds=self.params.demo.stack_timeout_s)
            if code != 0:
                raise DemoFailed(f"`tuneloop up` failed:\n{captured.getvalue()}")
            (self.home / "demo" / "stack.pid").write_text(str(running_stack_pid(self.home)))
            ports = StackPorts.from_env(self.env)
            self.urls = {
                "MLflow UI": f"http://127.0.0.1:{ports.mlflow}",
                "Prefect UI": f"http://127.0.0.1:{ports.prefect}",
                **{f"gateway {alias} docs": f"{url}/docs" for alias, url in self.env.gateway_urls.items()},
            }
            said.append(", ".join(f"{label} {url}" for label, url in self.urls.items()))
        with self.story.step(f"people: reviewer `{REVIEWER}`, an API key for traffic") as said:
            from mlflow.server.auth.client import AuthServiceClient

            from registry.access import ADMIN_USERNAME, add_user

            with acting_as(ADMIN_USERNAME, self.secrets.admin_password(self.env)):
                reviews = AuthServiceClient(self.env.tracking_uri)
                add_user(reviews, REVIEWER, self.secrets.password(REVIEWER), ["approver"])
            self.api_key = demo_api_key(self.env)
            said.append(
                f"{REVIEWER} (approver, password in {self.secrets.password_file(REVIEWER)}); "
                f"trainer {TRAINER_IDENTITY}, deployer {DEPLOYER_IDENTITY}, gateway {GATEWAY_IDENTITY}; "
                f"key `{DEMO_KEY_NAME}` in {self.env.api_keys_path}"
            )

    def first_version(self) -> None:
        from flows.continuous_training import continuous_training

        title = "train + evaluate + register v1 (continuous-training flow, as trainer)"
        with self.story.step(title, watch=self.runs_url) as said:
            with self.as_identity(TRAINER_IDENTITY):
                first = continuous_training(project_dir=str(self.project), reason="demo", return_state=True)
            if not first.is_completed():
                raise DemoFailed(f"the training flow ended {first.type.value}: {first.message}")
            summary = first.result()
            registration = summary["registration"]
            self.versions["v1"] = str(registration["version"])
            said.append(_trained(summary))
            if not registration["promoted_to_dev"]:
                raise DemoFailed(f"v{registration['version']} did not reach dev: {registration}")
        self.approve_and_promote(self.versions["v1"])
        with self.story.step("serve v1: the prod gateway swaps to it") as said:
            waited = wait_until_served(self.prod_url, self.versions["v1"], self.params.demo.serve_timeout_s)
            said.append(
                f"{self.prod_url} answers with v{self.versions['v1']} {waited:.1f} s after the promotion"
            )

    def approve_and_promote(self, version: str) -> None:
        """The reviewer approves (the server records who), then the deployer moves `prod`."""
        from registry.promote import PromotionRefused, promote
        from registry.register import PROD_ALIAS
        from registry.server_rules import APPROVAL_TAG, VersionRecord

        client, name = self.client(), self.params.registry.model_name
        with self.story.step(
            f"approve v{version} as `{REVIEWER}` (neither trained nor registered it)"
        ) as said:
            with self.as_identity(REVIEWER):
                client.set_model_version_tag(name, version, APPROVAL_TAG, "approved")
                record = VersionRecord.from_tags(client.get_model_version(name, version).tags)
            if record.approved_by != REVIEWER:
                raise DemoFailed(f"the server recorded no approval by {REVIEWER} on v{version}")
            said.append(f"the server recorded approved by {record.approved_by} on v{version}")
        with self.story.step(f"promote v{version} to prod (as `{DEPLOYER_IDENTITY}`)") as said:
            try:
                with self.as_identity(DEPLOYER_IDENTITY):
                    entry = promote(
                        client,
                        name,
                        self.env.paths.registry_audit,
                        to=PROD_ALIAS,
                        version=version,
                        actor=DEPLOYER_IDENTITY,
                        reason="tuneloop demo",
                        gate_thresholds=self.params.evaluate.gate_thresholds(self.params.task),
                    )
            except PromotionRefused as refused:
                raise DemoFailed(str(refused)) from None
            before = f"v{entry.from_version}" if entry.from_version else "none"
            said.append(f"prod: {before} -> v{entry.to_version}, audit entry by {entry.actor}")

    def traffic(self, scenario: str, count: int) -> str:
        from serving.simulate import SCENARIOS, scenario_rows, simulate_traffic

        data = self.params.data
        settings = self.params.demo
        source = self.project / SCENARIOS[scenario].source
        rows = scenario_rows(source, data.text_column, data.label_column, count, settings.seed)
        result = simulate_traffic(
            self.prod_url,
            self.api_key,
            rows,
            scenario=scenario,
            feedback_share=SCENARIOS[scenario].feedback_share,
            rate_per_s=settings.request_rate_per_s,
            seed=settings.seed,
        )
        if result.answered != result.requests:
            raise DemoFailed(result.summary())
        accuracy = result.accuracy_on_feedback
        return f"{result.requests} requests answered by prod, {result.feedback_sent} with feedback" + (
            f", live accuracy {accuracy:.3f}" if accuracy is not None else ""
        )

    def drift_check(self) -> dict[str, Any]:
        from flows.monitor_drift import monitor_drift

        with self.as_identity(TRAINER_IDENTITY), contextlib.chdir(self.project):
            return monitor_drift(
                params_path=str(self.project / "params.yaml"),
                prepared_dir=str(self.project / "data" / "prepared"),
            )

    def drift_and_retrain(self) -> None:
        from serving.simulate import SCENARIOS

        settings = self.params.demo
        with self.story.step(f"stable traffic ({SCENARIOS['stable'].source.name})") as said:
            said.append(self.traffic("stable", settings.stable_requests))
        with self.story.step("drift check on stable traffic (monitor-drift flow)") as said:
            stable = self.drift_check()
            said.append(describe_decision(stable))
            if stable.get("training_flow_run_id"):
                said.append("a false alarm on stable traffic: it retrained anyway")
        with self.story.step(f"drifted traffic with feedback ({DRIFTED_SAMPLE.name})") as said:
            said.append(self.traffic("concept-drift", settings.drifted_requests))
        with self.story.step("drift check on drifted traffic: feedback -> data version -> training") as said:
            drifted = self.drift_check()
            said.append(describe_decision(drifted))
            if not drifted.get("training_flow_run_id"):
                raise DemoFailed("no retraining was started: " + describe_decision(drifted))
            appended = drifted.get("appended")
            if appended:
                said.append(
                    f"{appended['rows_added']} feedback rows appended (md5 {str(appended['md5'])[:8]}), "
                    f"commit {str(appended['data_commit'])[:8]}"
                )
            said.append(f"continuous-training/nightly started (flow run {drifted['training_flow_run_id']})")
        with self.story.step("v2 trained + registered by the stack's worker", watch=self.runs_url) as said:
            run = wait_for_flow_run(drifted["training_flow_run_id"], settings.training_timeout_s)
            if not run.state.is_completed():
                raise DemoFailed(f"the training run ended {run.state.type.value}: {run.state.message}")
            client = self.client()
            with self.as_identity(GATEWAY_IDENTITY):  # a viewer: reading needs an identity too
                dev = client.get_model_version_by_alias(self.params.registry.model_name, DEV)
                metrics = client.get_run(dev.run_id).data.metrics
            if str(dev.version) == self.versions["v1"]:
                with self.as_identity(GATEWAY_IDENTITY):
                    newest = max(
                        client.search_model_versions(f"name='{self.params.registry.model_name}'"),
                        key=lambda version: int(version.version),
                    )
                reason = newest.tags.get("tuneloop.blocked_reason") or "it did not pass its gates"
                raise DemoFailed(f"v{newest.version} is registered, dev is still v{dev.version}: {reason}")
            self.versions["v2"] = str(dev.version)
            said.append(
                f"v{dev.version} is dev: accuracy {metrics.get('quality/accuracy', float('nan')):.3f}, "
                f"macro-F1 {metrics.get('quality/macro_f1', float('nan')):.3f}"
            )

    def swap_and_roll_back(self) -> None:
        from registry.promote import rollback
        from registry.register import PROD_ALIAS
        from serving.simulate import scenario_rows

        settings = self.params.demo
        v1, v2 = self.versions["v1"], self.versions["v2"]
        data = self.params.data
        rows = scenario_rows(
            self.project / SAMPLE_DATA, data.text_column, data.label_column, 50, settings.seed
        )
        texts = rows["text"].tolist()
        with SteadyTraffic(self.prod_url, self.api_key, texts, settings.request_rate_per_s) as load:
            self.approve_and_promote(v2)
            with self.story.step(
                f"hot swap v{v1} -> v{v2} under {settings.request_rate_per_s:g} req/s"
            ) as said:
                waited = wait_until_served(self.prod_url, v2, settings.serve_timeout_s)
                time.sleep(2)  # a few requests on the new version too
                said.append(f"v{v2} answers {waited:.1f} s after the promotion; {load.describe()}")
                if load.failed:
                    raise DemoFailed(f"{load.failed} requests failed during the swap: {dict(load.statuses)}")
        with (
            SteadyTraffic(self.prod_url, self.api_key, texts, settings.request_rate_per_s) as load,
            self.story.step(f"rollback to v{v1} (as `{DEPLOYER_IDENTITY}`)") as said,
        ):
            with self.as_identity(DEPLOYER_IDENTITY):
                entry = rollback(
                    self.client(),
                    self.params.registry.model_name,
                    self.env.paths.registry_audit,
                    to=PROD_ALIAS,
                    actor=DEPLOYER_IDENTITY,
                    reason="tuneloop demo: rollback",
                )
            waited = wait_until_served(self.prod_url, v1, settings.serve_timeout_s)
            time.sleep(2)
            said.append(
                f"prod v{entry.from_version} -> v{entry.to_version}; v{v1} answers after {waited:.1f} s; "
                f"{load.describe()}"
            )
            if load.failed:
                raise DemoFailed(f"{load.failed} requests failed during the rollback: {dict(load.statuses)}")

    def ending(self, ok: bool) -> str:
        lines = ["", self.story.table()]
        if self.urls:
            lines.append("\nLeft running (`tuneloop down` stops them):")
            lines += [f"  {label:<18} {url}" for label, url in self.urls.items()]
            lines.append(f"  MLflow admin       user admin, password in {self.secrets.admin_password_file}")
            lines.append(f"  demo workspace     {self.project}")
        if self.api_key:
            prod = self.prod_url
            lines.append(f"  API key            {self.api_key}  ({DEMO_KEY_NAME}: predict, feedback, admin)")
            lines.append(
                f"Try it: curl -s {prod}/v1/predict -H 'X-API-Key: {self.api_key}' "
                """-H 'Content-Type: application/json' -d '{"text": "where is my refund"}'"""
            )
        lines.append("the demo ran end to end" if ok else "the demo stopped at the FAILED step above")
        return "\n".join(lines)


def run_demo(checkout: Path, params: Params, env_for: Callable[[Path], Environment]) -> int:
    """The story; 0 when every step ended as it should. The stack is left running either way.

    ``env_for(project)``: the environment of a project folder; it must name the stack's MLflow and
    Prefect servers already (the CLI sets their variables before anything imports Prefect).
    """
    demo = DemoRun(checkout, params, env_for)
    try:
        demo.start()
        demo.first_version()
        demo.drift_and_retrain()
        demo.swap_and_roll_back()
    except Exception:  # noqa: BLE001 - the failed step printed what went wrong; the ending says where to look
        print(demo.ending(ok=False))
        return 1
    print(demo.ending(ok=True))
    return 0


def _trained(summary: dict[str, Any]) -> str:
    registration = summary["registration"]
    metrics = summary["metrics"]
    return (
        f"v{registration['version']} registered, {'dev' if registration['promoted_to_dev'] else 'not dev'}; "
        f"accuracy {metrics.get('quality/accuracy', float('nan')):.3f}, "
        f"macro-F1 {metrics.get('quality/macro_f1', float('nan')):.3f}; "
        f"gates {'passed' if summary.get('gates_passed') else 'FAILED'}"
    )
