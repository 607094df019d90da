"""`tuneloop reproduce`: rebuild a registered version from its git commit and data, then compare.

A registered version carries its lineage as tags: the git commit the project was at when it was
registered (`tuneloop.git_commit`), the md5 of the raw data (`tuneloop.data_md5`), the md5 of
`dvc.lock` (`tuneloop.dvc_lock_md5`) and its headline metrics (`tuneloop.metric.*`). Reproducing it:

1. refuses a version whose commit is missing, `-dirty` (the code that trained it is not in git) or
   unknown to the project's git repository;
2. checks that commit out in a scratch `git worktree` (detached) in a temporary folder, whose DVC
   cache is the project's own and whose default remote is the project's remote, and pulls the data
   pointers there;
3. runs every stage again (`dvc repro --force`) with the interpreter running tuneloop, against a
   scratch MLflow store (its own ``TUNELOOP_HOME`` and ``MLFLOW_TRACKING_URI``), so that reproducing
   never logs into or registers in the real experiment;
4. compares each headline metric (registered vs reproduced, within ``registry.reproduce_tolerance``),
   the data md5, and the adapter files byte for byte against the version's `adapter` artifact (the
   manifest, which holds the training run id, is reported but not compared); weights that are not
   bit-equal are loaded and their largest absolute difference is measured;
5. removes the worktree unless asked to keep it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from registry.register import HEADLINE_METRICS, metrics_from_tags
from serving.inference import MANIFEST_FILE
from tuneloop import commands
from tuneloop.commands import CommandFailed, run_logged
from tuneloop.config import Environment, Params
from tuneloop.io import file_md5, read_json
from tuneloop.paths import ADAPTER_DIR, EVALUATE_METRICS, PREPARED_DIR

log = logging.getLogger(__name__)

COMMIT_TAG = "tuneloop.git_commit"
DATA_MD5_TAG = "tuneloop.data_md5"
DVC_LOCK_MD5_TAG = "tuneloop.dvc_lock_md5"
# The pyfunc artifact that holds the adapter folder (serving/pyfunc_model.py ADAPTER_ARTIFACT).
ADAPTER_ARTIFACT = "adapter"
# Files whose bytes are weights: when they differ, the tensors are loaded and compared numerically.
WEIGHT_SUFFIXES = (".safetensors",)
# peft keeps `target_modules` (and other list-like fields) as a Python set and writes it into this file
# in set iteration order, which follows the string hash seed (PYTHONHASHSEED) of the training process:
# two identical trainings can write the same modules in a different order. Compared as sets.
PEFT_CONFIG_FILE = "adapter_config.json"
# Variables that would send the scratch run's MLflow calls into the real store or an existing run.
MLFLOW_VARIABLES_TO_DROP = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_RUN_ID",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_EXPERIMENT_NAME",
)


class ReproductionRefused(Exception):
    """The version cannot be reproduced from git and DVC; the message says why."""


@dataclass(frozen=True)
class MetricRow:
    """One headline metric: as registered on the version and as the scratch run measured it."""

    name: str
    registered: float | None
    reproduced: float | None
    tolerance: float

    @property
    def delta(self) -> float | None:
        if self.registered is None or self.reproduced is None:
            return None
        return self.reproduced - self.registered

    @property
    def within_tolerance(self) -> bool:
        delta = self.delta
        # A tiny slack: both sides are decimal strings rounded to 6 places.
        return delta is not None and not math.isnan(delta) and abs(delta) <= self.tolerance + 1e-12


@dataclass(frozen=True)
class AdapterFile:
    """One file of the adapter folder: its SHA-256 on each side and, for weights, how far apart."""

    path: str
    registered_sha256: str | None
    reproduced_sha256: str | None
    # For weight files that are not bit-equal: the largest |registered - reproduced| over all tensors,
    # or None when the tensors could not be compared (different names or shapes: see ``note``).
    max_abs_diff: float | None = None
    note: str = ""
    # Bytes differ but the content is the same (the peft config's set-valued fields in another order).
    equivalent: bool = False

    @property
    def equal(self) -> bool:
        return self.registered_sha256 is not None and self.registered_sha256 == self.reproduced_sha256

    @property
    def is_weights(self) -> bool:
        return self.path.endswith(WEIGHT_SUFFIXES)

    @property
    def present_on_both_sides(self) -> bool:
        return self.registered_sha256 is not None and self.reproduced_sha256 is not None

    @property
    def acceptable(self) -> bool:
        """Equal bytes, equal content, or weights (whose difference the metrics then judge)."""
        return self.equal or self.equivalent or (self.is_weights and self.present_on_both_sides)


@dataclass
class ReproductionReport:
    """What `tuneloop reproduce` found; ``summary()`` renders it, ``reproduced`` is the verdict.

    ``reproduced`` is true when the data md5 matches, every headline metric is within ``tolerance``
    of its registered value, and the adapter has the same files with the same bytes except, at most,
    its weights and the order of the peft config's set-valued fields. ``bit_equal`` says whether every
    file matches byte for byte, ``weights_bit_equal`` whether the weights do.
    """

    model_name: str
    version: str
    requested: str
    tolerance: float
    git_commit: str = ""
    source_run_id: str = ""
    metrics: list[MetricRow] = field(default_factory=list)
    data_md5_registered: str | None = None
    data_md5_reproduced: str | None = None
    dvc_lock_md5_registered: str | None = None
    dvc_lock_md5_at_commit: str | None = None
    adapter_files: list[AdapterFile] = field(default_factory=list)
    manifest_note: str = ""
    repro_seconds: float = 0.0
    elapsed_seconds: float = 0.0
    scratch_dir: Path | None = None
    kept: bool = False
    refused: str | None = None
    error: str | None = None

    @property
    def data_match(self) -> bool:
        return self.data_md5_registered is not None and self.data_md5_registered == self.data_md5_reproduced

    @property
    def metrics_within_tolerance(self) -> bool:
        return bool(self.metrics) and all(row.within_tolerance for row in self.metrics)

    @property
    def bit_equal(self) -> bool:
        """Every adapter file (manifest excluded) has the same bytes on both sides."""
        return bool(self.adapter_files) and all(item.equal for item in self.adapter_files)

    @property
    def weights_bit_equal(self) -> bool:
        weights = [item for item in self.adapter_files if item.is_weights]
        return bool(weights) and all(item.equal for item in weights)

    @property
    def adapter_consistent(self) -> bool:
        """Same files; all but the weights identical (config up to set order, label map, tokenizer)."""
        return bool(self.adapter_files) and all(item.acceptable for item in self.adapter_files)

    @property
    def reproduced(self) -> bool:
        return (
            self.refused is None
            and self.error is None
            and self.data_match
            and self.metrics_within_tolerance
            and self.adapter_consistent
        )

    def reasons(self) -> list[str]:
        """Why the version was not reproduced; empty when it was."""
        if self.refused is not None:
            return [f"refused: {self.refused}"]
        if self.error is not None:
            return [f"failed: {self.error}"]
        reasons = []
        if not self.data_match:
            reasons.append(
                f"data md5 differs: registered {self.data_md5_registered}, "
                f"reproduced {self.data_md5_reproduced}"
            )
        reasons += [
            f"{row.name} outside ±{self.tolerance:g}: registered {_number(row.registered)}, "
            f"reproduced {_number(row.reproduced)}"
            for row in self.metrics
            if not row.within_tolerance
        ]
        if not self.metrics:
            reasons.append("no headline metric to compare")
        reasons += [
            f"adapter file {item.path} differs" + (f" ({item.note})" if item.note else "")
            for item in self.adapter_files
            if not item.acceptable
        ]
        if not self.adapter_files:
            reasons.append("no adapter files to compare")
        return reasons

    def verdict(self) -> str:
        if not self.reproduced:
            return "NOT REPRODUCED"
        if self.bit_equal:
            return "REPRODUCED bit-for-bit (every adapter file has the same bytes; metrics within tolerance)"
        if self.weights_bit_equal:
            reordered = ", ".join(item.path for item in self.adapter_files if item.equivalent)
            return (
                "REPRODUCED: adapter weights bit-equal, metrics within tolerance; "
                f"{reordered} equal up to the order of set-valued fields"
            )
        weights = [item for item in self.adapter_files if item.is_weights and not item.equal]
        worst = max((item.max_abs_diff or 0.0) for item in weights)
        return (
            f"REPRODUCED within tolerance; adapter weights NOT bit-equal (max |diff| {worst:.3g} "
            f"in {', '.join(item.path for item in weights)})"
        )

    def summary(self) -> str:
        """A readable report: verdict, metric table, data, adapter bytes, timings, scratch folder."""
        target = f"{self.model_name} v{self.version}" if self.version else self.model_name
        if self.requested and self.requested != f"v{self.version}":
            target += f" ({self.requested})"
        lines = [f"Reproducing {target}"]
        if self.git_commit:
            lines.append(f"  commit {self.git_commit}, source run {self.source_run_id or '-'}")
        lines.append(f"Verdict: {self.verdict()}")
        lines += [f"  - {reason}" for reason in self.reasons()]
        if self.refused is not None and self.git_commit:
            lines.append(
                "  A version can be reproduced only from a clean commit that this repository knows: "
                "register from a committed tree (`git commit`, then `tuneloop register`)."
            )
        if self.refused is not None:
            return "\n".join(lines)
        if self.metrics:
            lines += ["", f"Headline metrics (absolute tolerance {self.tolerance:g}):"]
            width = max(len(row.name) for row in self.metrics)
            lines.append(
                f"  {'metric':<{width}}  {'registered':>10}  {'reproduced':>10}  {'delta':>10}  within"
            )
            for row in self.metrics:
                delta = "-" if row.delta is None else f"{row.delta:+.6f}"
                lines.append(
                    f"  {row.name:<{width}}  {_number(row.registered):>10}  {_number(row.reproduced):>10}  "
                    f"{delta:>10}  {'yes' if row.within_tolerance else 'NO'}"
                )
        if self.data_md5_registered is not None or self.data_md5_reproduced is not None:
            lines += [
                "",
                f"Data md5: registered {self.data_md5_registered}, reproduced {self.data_md5_reproduced}: "
                + ("match" if self.data_match else "DIFFERENT"),
            ]
        if self.dvc_lock_md5_registered is not None:
            same = self.dvc_lock_md5_registered == self.dvc_lock_md5_at_commit
            lines.append(
                f"dvc.lock at the commit: md5 {self.dvc_lock_md5_at_commit} "
                + ("= the version's lineage" if same else f"!= the version's {self.dvc_lock_md5_registered}")
            )
        if self.adapter_files:
            equal = sum(item.equal for item in self.adapter_files)
            lines += [
                "",
                f"Adapter bytes (scratch {ADAPTER_DIR} vs the version's `{ADAPTER_ARTIFACT}` artifact): "
                + ("bit-equal" if self.bit_equal else "NOT bit-equal")
                + f", {equal} of {len(self.adapter_files)} files identical (manifest excluded)",
            ]
            for item in self.adapter_files:
                if item.equal:
                    state = f"equal  sha256 {(item.registered_sha256 or '')[:16]}"
                elif item.equivalent:
                    state = "bytes differ, content equal"
                elif item.registered_sha256 is None or item.reproduced_sha256 is None:
                    state = "missing on the " + (
                        "registered" if item.registered_sha256 is None else "reproduced"
                    )
                    state += " side"
                else:
                    state = "DIFFERENT"
                    if item.max_abs_diff is not None:
                        state += f"  max |diff| {item.max_abs_diff:.3g}"
                if item.note:
                    state += f"  ({item.note})"
                lines.append(f"  {item.path}: {state}")
            if self.manifest_note:
                lines.append(f"  {MANIFEST_FILE}: not compared ({self.manifest_note})")
        lines += [
            "",
            f"Time: {self.elapsed_seconds:.1f} s in all, {self.repro_seconds:.1f} s in `dvc repro --force`",
        ]
        if self.scratch_dir is not None:
            lines.append(
                f"Scratch worktree kept at {self.scratch_dir}" if self.kept else "Scratch worktree removed"
            )
        return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def sha256_of(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weight_difference(registered: Path, reproduced: Path) -> tuple[float | None, str]:
    """Largest absolute difference between two safetensors files' tensors, and a note when not comparable."""
    import torch
    from safetensors.torch import load_file

    left, right = load_file(str(registered)), load_file(str(reproduced))
    if set(left) != set(right):
        only = sorted(set(left) ^ set(right))
        return None, f"tensor names differ: {', '.join(only[:5])}"
    worst = 0.0
    differing = 0
    for name, tensor in left.items():
        other = right[name]
        if tensor.shape != other.shape:
            return None, f"shape of {name} differs: {tuple(tensor.shape)} vs {tuple(other.shape)}"
        diff = (
            (tensor.to(torch.float64) - other.to(torch.float64)).abs().max().item() if tensor.numel() else 0.0
        )
        if diff > 0 or not torch.equal(tensor, other):
            differing += 1
        worst = max(worst, diff)
    return worst, f"{differing} of {len(left)} tensors differ"


def compare_adapters(registered: Path, reproduced: Path) -> tuple[list[AdapterFile], str]:
    """Compare two adapter folders file by file (manifest excluded); the manifest is described apart."""
    names = sorted(
        {p.relative_to(registered).as_posix() for p in registered.rglob("*") if p.is_file()}
        | {p.relative_to(reproduced).as_posix() for p in reproduced.rglob("*") if p.is_file()}
    )
    files = []
    for name in names:
        if name == MANIFEST_FILE:
            continue
        left, right = registered / name, reproduced / name
        left_sha = sha256_of(left) if left.is_file() else None
        right_sha = sha256_of(right) if right.is_file() else None
        item = AdapterFile(name, left_sha, right_sha)
        if left_sha and right_sha and left_sha != right_sha:
            if item.is_weights:
                diff, note = weight_difference(left, right)
                item = AdapterFile(name, left_sha, right_sha, diff, note)
            elif Path(name).name == PEFT_CONFIG_FILE:
                item = AdapterFile(name, left_sha, right_sha, *_config_difference(left, right))
        files.append(item)
    return files, _manifest_note(registered / MANIFEST_FILE, reproduced / MANIFEST_FILE)


def _config_difference(registered: Path, reproduced: Path) -> tuple[None, str, bool]:
    """(None, note, equivalent) for two peft configs whose bytes differ."""
    left, right = read_json(registered), read_json(reproduced)

    def canonical(config: dict) -> dict:
        return {
            key: sorted(value)
            if isinstance(value, list) and all(isinstance(v, str) for v in value)
            else value
            for key, value in config.items()
        }

    if canonical(left) == canonical(right):
        reordered = sorted(k for k in left if left[k] != right.get(k))
        return None, f"same content; order differs in {', '.join(reordered)} (a set in peft)", True
    changed = sorted(k for k in set(left) | set(right) if left.get(k) != right.get(k))
    return None, f"fields differ: {', '.join(changed)}", False


def _manifest_note(registered: Path, reproduced: Path) -> str:
    if not registered.is_file() or not reproduced.is_file():
        return "missing on the " + ("registered" if not registered.is_file() else "reproduced") + " side"
    left, right = read_json(registered), read_json(reproduced)
    run_left, run_right = left.pop("mlflow_run_id", None), right.pop("mlflow_run_id", None)
    rest = "rest identical" if left == right else f"rest differs: {left} vs {right}"
    return f"training run {run_left} vs scratch run {run_right}; {rest}"


def resolve_version(client: MlflowClient, name: str, version: str | None, alias: str | None) -> ModelVersion:
    """The model version named by number or alias; ReproductionRefused when there is none."""
    if (version is None) == (alias is None):
        raise ReproductionRefused("name exactly one of a version number or an alias")
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except MlflowException as error:
        if error.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}:
            what = f"alias {alias!r}" if alias is not None else f"version {version}"
            raise ReproductionRefused(f"registered model {name!r} has no {what}") from error
        raise


def check_commit(project_dir: Path, commit: str | None) -> str:
    """The full commit id to reproduce from; ReproductionRefused when it is missing, dirty or unknown."""
    if not commit or commit == "unknown":
        raise ReproductionRefused(f"the version has no git commit in its `{COMMIT_TAG}` tag")
    if commit.endswith("-dirty"):
        raise ReproductionRefused(
            f"the version was registered from a tree with uncommitted changes ({commit}): "
            "the code that produced it is not in git"
        )
    found = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
        cwd=project_dir,
        capture_output=True,
        text=True,
    )
    if found.returncode != 0:
        raise ReproductionRefused(
            f"commit {commit} is unknown to the git repository at {project_dir} (fetch it, or reproduce "
            "from the clone it was registered in)"
        )
    return found.stdout.strip()


def scratch_environment(home: Path, remote_url: str) -> dict[str, str]:
    """The child's environment: this interpreter first on PATH, MLflow and tuneloop state in ``home``."""
    env = commands.venv_environment()
    for name in MLFLOW_VARIABLES_TO_DROP:
        env.pop(name, None)
    env.update(
        {
            "TUNELOOP_HOME": str(home),
            "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
            "TUNELOOP_DVC_REMOTE": remote_url,
        }
    )
    return env


def configure_dvc(project_dir: Path, worktree: Path, remote_url: str) -> None:
    """Give the worktree the project's DVC cache and default remote (in its uncommitted config.local).

    The project's local config (remote URLs, credentials) is copied with its paths made absolute;
    when the project has no default remote at all, ``remote_url`` becomes the default.
    """
    from dvc.repo import Repo

    from tuneloop.datastore import LOCAL_REMOTE_NAME

    cache_dir: str | None = None
    local: dict = {}
    default: str | None = None
    if (project_dir / ".dvc").is_dir():
        with Repo(str(project_dir)) as main:
            cache_dir = main.cache.local_cache_dir
            local = _plain(main.config.read("local"))
            default = main.config["core"].get("remote")
    with Repo(str(worktree)) as scratch, scratch.config.edit("local") as config:
        for section, values in local.items():
            if isinstance(values, dict):
                config[section].update(values)
            else:
                config[section] = values
        if cache_dir:
            config["cache"]["dir"] = str(cache_dir)
        if default is None:
            config["remote"][LOCAL_REMOTE_NAME] = {"url": str(remote_url)}
            config["core"]["remote"] = LOCAL_REMOTE_NAME


def _plain(config: dict) -> dict:
    """A DVC config as plain dicts and strings (resolved relative paths become absolute strings)."""
    return {
        k: _plain(v) if isinstance(v, dict) else (str(v) if isinstance(v, str) else v)
        for k, v in config.items()
    }


def download_adapter(client: MlflowClient, version: ModelVersion, tracking_uri: str, dst: Path) -> Path:
    """The version's `adapter` artifact (the folder the pyfunc was logged with), downloaded into ``dst``."""
    import mlflow

    location = client.get_model_version_download_uri(version.name, version.version).rstrip("/")
    dst.mkdir(parents=True, exist_ok=True)
    path = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{location}/artifacts/{ADAPTER_ARTIFACT}", dst_path=str(dst), tracking_uri=tracking_uri
    )
    return Path(path)


def remove_worktree(project_dir: Path, worktree: Path) -> None:
    """`git worktree remove --force`, then prune, so git forgets the scratch checkout."""
    subprocess.run(
        ["git", "worktree", "remove", "--force", str(worktree)],
        cwd=project_dir,
        capture_output=True,
        text=True,
    )
    subprocess.run(["git", "worktree", "prune"], cwd=project_dir, capture_output=True, text=True)


def reproduce_version(
    env: Environment,
    params: Params,
    version: str | None = None,
    alias: str | None = None,
    keep_worktree: bool = False,
    client: MlflowClient | None = None,
) -> ReproductionReport:
    """Rebuild one registered version from its commit and data in a scratch worktree and compare.

    A refusal (unknown version, dirty or unknown commit) or a failed stage is returned as a report
    whose ``reproduced`` is false and whose summary says why; other errors propagate. ``client`` must
    point at the registry holding ``params.registry.model_name`` (default: ``env.tracking_uri``).
    """
    started = time.perf_counter()
    client = client or MlflowClient(tracking_uri=env.tracking_uri, registry_uri=env.tracking_uri)
    name = params.registry.model_name
    report = ReproductionReport(
        model_name=name,
        version=str(version or ""),
        requested=f"alias {alias}" if alias else f"v{version}",
        tolerance=params.registry.reproduce_tolerance,
    )
    try:
        _reproduce(env, version, alias, keep_worktree, client, report)
    except ReproductionRefused as refused:
        report.refused = str(refused)
    except CommandFailed as failed:
        report.error = str(failed)
    finally:
        report.elapsed_seconds = time.perf_counter() - started
    log.info("reproduce %s v%s: %s", name, report.version, report.verdict())
    return report


def _reproduce(
    env: Environment,
    version: str | None,
    alias: str | None,
    keep_worktree: bool,
    client: MlflowClient,
    report: ReproductionReport,
) -> None:
    project = env.project_dir
    model_version = resolve_version(client, report.model_name, version, alias)
    report.version = str(model_version.version)
    tags = dict(model_version.tags or {})
    report.git_commit = tags.get(COMMIT_TAG, "")
    report.source_run_id = model_version.run_id or ""
    commit = check_commit(project, report.git_commit)
    report.data_md5_registered = tags.get(DATA_MD5_TAG)
    report.dvc_lock_md5_registered = tags.get(DVC_LOCK_MD5_TAG)
    registered = metrics_from_tags(tags)
    if report.source_run_id and any(key not in registered for key in HEADLINE_METRICS):
        # Older versions may lack a metric tag: fall back to what the evaluate stage logged on the run.
        with contextlib.suppress(MlflowException):
            run_metrics = client.get_run(report.source_run_id).data.metrics
            registered = {**{k: run_metrics[k] for k in HEADLINE_METRICS if k in run_metrics}, **registered}

    scratch = Path(tempfile.mkdtemp(prefix=f"tuneloop-reproduce-{report.model_name}-v{report.version}-"))
    worktree, home = scratch / "worktree", scratch / "home"
    report.scratch_dir = scratch
    report.kept = keep_worktree
    added = False
    try:
        log.info("checking out %s into %s", commit, worktree)
        run_logged(["git", "worktree", "add", "--detach", str(worktree), commit], project, log)
        added = True
        if not (worktree / ".dvc").is_dir() or not (worktree / "dvc.yaml").is_file():
            raise ReproductionRefused(f"commit {commit} has no DVC pipeline (.dvc/ and dvc.yaml)")
        lock = worktree / "dvc.lock"
        report.dvc_lock_md5_at_commit = file_md5(lock) if lock.is_file() else None
        configure_dvc(project, worktree, env.dvc_remote_url)
        child_env = scratch_environment(home, env.dvc_remote_url)
        pointers = commands.data_pointers(worktree)
        if pointers:
            run_logged(commands.dvc("pull", *pointers), worktree, log, env=child_env)
        repro_started = time.perf_counter()
        run_logged(commands.dvc("repro", "--force"), worktree, log, env=child_env)
        report.repro_seconds = time.perf_counter() - repro_started

        reproduced = read_json(worktree / EVALUATE_METRICS)
        report.metrics = [
            MetricRow(
                key,
                registered.get(key),
                float(reproduced[key]) if isinstance(reproduced.get(key), int | float) else None,
                report.tolerance,
            )
            for key in HEADLINE_METRICS
            # A classifier has no generation metrics and a generator no accuracy: compare what exists.
            if key in registered or key in reproduced
        ]
        meta = worktree / PREPARED_DIR / "meta.json"
        report.data_md5_reproduced = read_json(meta).get("source_md5") if meta.is_file() else None
        downloaded = download_adapter(client, model_version, env.tracking_uri, scratch / "registered")
        report.adapter_files, report.manifest_note = compare_adapters(downloaded, worktree / ADAPTER_DIR)
    finally:
        if not keep_worktree:
            if added:
                remove_worktree(project, worktree)
            shutil.rmtree(scratch, ignore_errors=True)
