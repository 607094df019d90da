"""The GitHub workflows are valid, and run only commands that the Makefile or the README offers."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from registry.model_gate import COMMENT_MARKER

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = REPO_ROOT / ".github" / "workflows"
WORKFLOWS = sorted(WORKFLOWS_DIR.glob("*.y*ml"))
BIN = Path(sys.executable).parent
# A Makefile rule's target (`name:`), not a variable assignment (`NAME := value`).
MAKE_TARGET = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)\s*:(?!=)", re.MULTILINE)


def check_workflow_schema(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *map(str, paths)],
        capture_output=True,
        text=True,
    )


def test_the_merge_gate_workflows_exist():
    assert {"ci.yml", "model-gate.yml", "release.yml"} <= {path.name for path in WORKFLOWS}


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_passes_githubs_schema(workflow):
    result = check_workflow_schema(workflow)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    # A step must either run a command or use an action.
    broken.write_text(
        "name: broken\non: [pull_request]\njobs:\n  test:\n    runs-on: ubuntu-latest\n"
        "    steps:\n      - name: neither run nor uses\n        with:\n          x: 1\n"
    )
    result = check_workflow_schema(broken)
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "Schema validation errors were encountered" in output
    assert "$.jobs.test" in output


def makefile_targets() -> set[str]:
    return set(MAKE_TARGET.findall((REPO_ROOT / "Makefile").read_text(encoding="utf-8"))) - {".PHONY"}


def run_lines(workflow: dict) -> list[str]:
    """Every command line of every `run:` step, comments and blank lines left out."""
    lines = []
    for job in workflow.get("jobs", {}).values():
        for step in job.get("steps", []):
            for line in str(step.get("run", "")).splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    lines.append(line)
    return lines


def unoffered_commands(lines: list[str], targets: set[str], readme: str) -> list[str]:
    """Lines that are neither `make <existing targets> [VAR=value]` nor shown verbatim in the README."""
    offending = []
    for line in lines:
        words = line.split()
        if words[0] == "make":
            wanted = [word for word in words[1:] if "=" not in word and not word.startswith("-")]
            if wanted and set(wanted) <= targets:
                continue
        elif line in readme:
            continue
        offending.append(line)
    return offending


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_runs_only_makefile_or_readme_commands(workflow):
    lines = run_lines(yaml.safe_load(workflow.read_text(encoding="utf-8")))
    assert lines, f"{workflow.name} runs no command"
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert unoffered_commands(lines, makefile_targets(), readme) == []


def test_command_check_flags_what_neither_the_makefile_nor_the_readme_offers():
    readme = "Run `make run`, or `dvc repro` by hand."
    lines = [
        "make setup",
        "make model-gate BASE_REF=origin/main",
        "dvc repro",
        "make deploy",
        "pip install x",
    ]
    assert unoffered_commands(lines, {"setup", "model-gate"}, readme) == ["make deploy", "pip install x"]


def test_makefile_offers_the_targets_the_merge_gate_docs_name():
    assert {
        "setup",
        "lint",
        "typecheck",
        "test",
        "run",
        "repro",
        "pull",
        "dvc-remote",
        "model-gate",
        "dist",
    } <= (makefile_targets())


def test_model_gate_comment_step_finds_the_marker_the_gate_script_writes():
    """Otherwise each push would add a new pull-request comment instead of updating the last one."""
    workflow = yaml.safe_load((WORKFLOWS_DIR / "model-gate.yml").read_text(encoding="utf-8"))
    scripts = [
        step["with"]["script"]
        for step in workflow["jobs"]["gate"]["steps"]
        if "github-script" in step.get("uses", "")
    ]
    assert len(scripts) == 1
    assert f'const marker = "{COMMENT_MARKER}";' in scripts[0]


def test_model_gate_runs_on_the_paths_that_change_the_model():
    workflow = yaml.safe_load((WORKFLOWS_DIR / "model-gate.yml").read_text(encoding="utf-8"))
    # PyYAML reads the bare key `on` as True.
    paths = workflow[True]["pull_request"]["paths"]
    assert {"pipelines/**", "evaluation/**", "params.yaml", "dvc.yaml", "data/**"} <= set(paths)


def validate_pre_commit_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "pre-commit"), "validate-config", str(path)], capture_output=True, text=True, cwd=REPO_ROOT
    )


def test_pre_commit_config_is_valid_and_runs_ruff_and_the_basic_hooks():
    config = REPO_ROOT / ".pre-commit-config.yaml"
    result = validate_pre_commit_config(config)
    assert result.returncode == 0, result.stdout + result.stderr
    hooks = {hook["id"] for repo in yaml.safe_load(config.read_text())["repos"] for hook in repo["hooks"]}
    assert {
        "ruff-check",
        "ruff-format",
        "trailing-whitespace",
        "end-of-file-fixer",
        "check-yaml",
        "check-added-large-files",
    } <= hooks


def test_pre_commit_validation_rejects_a_hook_repo_without_a_revision(tmp_path):
    broken = tmp_path / ".pre-commit-config.yaml"
    broken.write_text(
        "repos:\n  - repo: https://github.com/astral-sh/ruff-pre-commit\n    hooks:\n      - id: ruff\n"
    )
    result = validate_pre_commit_config(broken)
    assert result.returncode == 1
    assert "rev" in result.stdout + result.stderr


def test_pre_commit_hooks_use_the_tool_versions_that_make_lint_uses():
    """A hook newer or older than the pinned tool would let a commit pass that `make lint` rejects."""
    pins = dict(
        line.split("==", 1)
        for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    )
    repos = {
        repo["repo"]: repo["rev"]
        for repo in yaml.safe_load((REPO_ROOT / ".pre-commit-config.yaml").read_text())["repos"]
    }
    assert repos["https://github.com/astral-sh/ruff-pre-commit"] == f"v{pins['ruff']}"
    assert repos["https://github.com/python-jsonschema/check-jsonschema"] == pins["check-jsonschema"]
