"""The import graph reads top-down, as DESIGN.md and README's Layout say: the command line, flows and
benchmarks on top; the stages, the registry and the monitor in the middle; evaluation and serving below;
the core settings at the ground. A package that reaches up (or sideways into a peer for its settings)
fails here, naming the file and the import.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import REPO_ROOT
from tests.unit.test_dvc_yaml import FIRST_PARTY, imported_modules

# package -> first-party packages it may import (besides itself).
ALLOWED = {
    "tuneloop": set(),
    "evaluation": {"tuneloop"},
    "serving": {"tuneloop"},
    "pipelines": {"tuneloop", "evaluation", "serving"},
    "registry": {"tuneloop", "evaluation", "serving"},
    "monitoring": {"tuneloop", "evaluation", "serving"},
    "flows": {"tuneloop", "evaluation", "serving", "pipelines", "registry", "monitoring"},
}


def package_files(package: str) -> list:
    return sorted((REPO_ROOT / package).rglob("*.py"))


def violations() -> list[str]:
    found = []
    for package, allowed in ALLOWED.items():
        for path in package_files(package):
            if path.relative_to(REPO_ROOT).as_posix() == "tuneloop/cli.py":
                continue  # the command line is the one module that may import every part
            for module in sorted(imported_modules(path)):
                if module == "tuneloop.cli" or module.startswith("tuneloop.cli."):
                    found.append(f"{path.relative_to(REPO_ROOT)} imports {module}: nothing imports the CLI")
                    continue
                target = module.split(".")[0]
                if target != package and target not in allowed:
                    found.append(f"{path.relative_to(REPO_ROOT)} imports {module} ({package} -> {target})")
    return found


def test_no_package_imports_upwards_or_into_a_peer() -> None:
    assert violations() == []


def test_every_first_party_package_has_a_rule() -> None:
    assert set(ALLOWED) == set(FIRST_PARTY)
    for package in ALLOWED:
        assert (REPO_ROOT / package / "__init__.py").is_file(), f"{package}/ is not a package"


@pytest.mark.parametrize("module", ["tuneloop", "tuneloop.config", "tuneloop.paths"])
def test_the_core_imports_no_heavy_library(module: str) -> None:
    """Settings load anywhere (and `tuneloop --help` answers at once): no torch, mlflow, prefect or dvc."""
    probe = (
        f"import sys, {module}; "
        "heavy = ('torch', 'mlflow', 'prefect', 'dvc', 'transformers'); "
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert loaded.stdout.strip() == ""


def test_cli_help_does_not_import_heavy_libraries() -> None:
    probe = (
        "import sys\nfrom tuneloop.cli import build_parser\nbuild_parser()\n"
        "print(','.join(m for m in ('torch', 'mlflow', 'prefect', 'dvc') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert loaded.stdout.strip() == ""
