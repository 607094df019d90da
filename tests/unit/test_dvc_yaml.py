"""dvc.yaml must tell the truth: every repo file a stage imports is one of its deps, and the paths a
stage command passes are the ones the code (tuneloop/paths.py) uses.

An under-declared dependency lets `dvc repro` skip a stage whose code changed, which breaks the
promise that any model can be reproduced; a path written differently in dvc.yaml and in the code makes
one of them read or write the wrong file.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.support import REPO_ROOT
from tuneloop import paths

FIRST_PARTY = ("tuneloop", "pipelines", "evaluation", "registry", "monitoring", "serving", "flows")
STAGE_MODULE = re.compile(r"python -m (pipelines\.\w+)")


def module_file(module: str) -> Path | None:
    """The repo file that ``import module`` runs (a module or a package's __init__), or None."""
    base = REPO_ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """First-party modules a file imports anywhere (function-level imports run too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import name` imports pkg, and pkg.name too when that is a module.
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] in FIRST_PARTY)
    return found


def repo_files_imported_by(module: str) -> set[str]:
    """Every repo file importing ``module`` executes, transitively, packages' __init__ files included."""
    seen: set[str] = set()
    pending = [module]
    files: set[str] = set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        parts = current.split(".")
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
        pending.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        path = module_file(current)
        if path is None:
            continue
        files.add(path.relative_to(REPO_ROOT).as_posix())
        pending.extend(imported_modules(path))
    return files


def missing_deps(module: str, deps: list[str]) -> list[str]:
    """Repo files the stage module imports that no dep (file or folder) covers."""
    declared = [dep.rstrip("/") for dep in deps]
    return sorted(
        file
        for file in repo_files_imported_by(module)
        if not any(file == dep or file.startswith(f"{dep}/") for dep in declared)
    )


def load_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def stage_module(stage: dict) -> str:
    match = STAGE_MODULE.search(" ".join(stage["cmd"]) if isinstance(stage["cmd"], list) else stage["cmd"])
    assert match, f"stage command does not run a pipelines module: {stage['cmd']}"
    return match.group(1)


def declared(stage: dict, key: str) -> list[str]:
    """Paths of a stage's deps/outs/metrics/plots (entries may be dicts with options)."""
    entries = stage.get(key, [])
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries]


STAGES = load_stages()


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_repo_file_a_stage_imports_is_a_dep(name: str) -> None:
    stage = STAGES[name]
    missing = missing_deps(stage_module(stage), declared(stage, "deps"))
    assert not missing, f"stage {name!r} imports {missing} but dvc.yaml does not list them under deps"


def test_the_check_fails_when_a_dep_is_removed() -> None:
    """The guard itself: drop one real dep of `train` and the check names exactly that file."""
    deps = declared(STAGES["train"], "deps")
    assert "serving/inference.py" in deps
    without = [dep for dep in deps if dep != "serving/inference.py"]
    assert missing_deps("pipelines.train", without) == ["serving/inference.py"]


def test_the_walk_follows_imports_transitively_and_into_functions() -> None:
    files = repo_files_imported_by("pipelines.evaluate")
    # evaluate -> serving.inference (module level); tuneloop.config via tuneloop.tracking; __init__ files.
    assert {"serving/inference.py", "tuneloop/config.py", "tuneloop/paths.py", "serving/__init__.py"} <= files
    # registry/ is not imported by the evaluate stage: it must not become a dep by accident.
    assert not any(file.startswith("registry/") for file in files)


def command_args(stage: dict) -> dict[str, str]:
    words = shlex.split(stage["cmd"] if isinstance(stage["cmd"], str) else " ".join(stage["cmd"]))
    return {word: words[i + 1] for i, word in enumerate(words[:-1]) if word.startswith("--")}


# What each stage passes on its command line, as the code names it.
EXPECTED_ARGS = {
    "prepare": {"--out-dir": paths.PREPARED_DIR},
    "validate": {"--prepared-dir": paths.PREPARED_DIR, "--report-dir": paths.VALIDATION_REPORT_DIR},
    "train": {
        "--prepared-dir": paths.PREPARED_DIR,
        "--out-dir": paths.ADAPTER_DIR,
        "--metrics-path": paths.TRAIN_METRICS,
        "--history-path": paths.TRAINING_HISTORY,
    },
    "evaluate": {
        "--prepared-dir": paths.PREPARED_DIR,
        "--model-dir": paths.ADAPTER_DIR,
        "--metrics-dir": paths.METRICS_DIR,
        "--plots-dir": paths.PLOTS_DIR,
        "--reports-dir": paths.REPORTS_DIR,
    },
}
# Where each path must be declared in dvc.yaml for DVC to track it.
EXPECTED_DECLARATIONS = {
    ("prepare", "outs"): [paths.PREPARED_DIR],
    ("validate", "deps"): [paths.PREPARED_DIR],
    ("validate", "metrics"): [paths.VALIDATION_SUMMARY],
    ("train", "deps"): [paths.PREPARED_DIR, paths.VALIDATION_SUMMARY],
    ("train", "outs"): [paths.ADAPTER_DIR],
    ("train", "metrics"): [paths.TRAIN_METRICS],
    ("train", "plots"): [paths.TRAINING_HISTORY],
    ("evaluate", "deps"): [paths.PREPARED_DIR, paths.ADAPTER_DIR],
    ("evaluate", "metrics"): [paths.EVALUATE_METRICS, paths.GATES_FILE],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_ARGS))
def test_stage_commands_pass_the_paths_the_code_uses(name: str) -> None:
    args = command_args(STAGES[name])
    for flag, path in EXPECTED_ARGS[name].items():
        assert args.get(flag) == path.as_posix(), f"{name}: {flag} is {args.get(flag)!r}, code says {path}"


@pytest.mark.parametrize(("name", "key"), sorted(EXPECTED_DECLARATIONS))
def test_stage_outputs_and_inputs_are_declared_where_the_code_writes_them(name: str, key: str) -> None:
    listed = declared(STAGES[name], key)
    for path in EXPECTED_DECLARATIONS[(name, key)]:
        assert path.as_posix() in listed, f"{name}.{key} lacks {path} (has {listed})"
