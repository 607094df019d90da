"""Every third-party package our code imports is declared in pyproject.toml's ``[project] dependencies``.

A package that arrives only as another one's dependency (numpy through pandas, httpx through prefect)
works until that other package drops it or a resolver picks an older release, and then ``import``
fails on a fresh install. Import names are mapped to distributions with
``importlib.metadata.packages_distributions()``: ``yaml`` is PyYAML, ``sklearn`` is scikit-learn.
Imports in tests/ (dev-only) are out of scope; the few first-party files that only a developer runs
(``DEV_ONLY``: the locust users of the load test) may import the ``dev`` extra too.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = (
    "tuneloop",
    "pipelines",
    "evaluation",
    "registry",
    "monitoring",
    "serving",
    "flows",
    "benchmarks",
)


@dataclass(frozen=True)
class Import:
    path: str
    line: int
    name: str  # the top-level package: `sklearn` for `from sklearn.metrics import f1_score`


def third_party_imports(source: str, path: str, first_party: Iterable[str] = FIRST_PARTY) -> Iterator[Import]:
    """Absolute imports anywhere in ``source`` (function-level ones run too), stdlib and ours left out."""
    ours = set(first_party)
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in ours:
                yield Import(path, node.lineno, top)


DEV_ONLY = {"benchmarks/locustfile.py"}


def declared_distributions(pyproject: Mapping, extras: Iterable[str] = ()) -> set[str]:
    lines = [*pyproject["project"]["dependencies"]]
    for extra in extras:
        lines += pyproject["project"]["optional-dependencies"][extra]
    return {canonicalize_name(Requirement(line).name) for line in lines}


def undeclared(
    imports: Iterable[Import], declared: set[str], distributions: Mapping[str, list[str]]
) -> list[str]:
    """One line per import whose distribution is not declared (or that no installed distribution provides)."""
    problems = []
    for found in imports:
        providers = sorted({canonicalize_name(name) for name in distributions.get(found.name, [])})
        if not providers:
            problems.append(f"{found.path}:{found.line}: `{found.name}` comes from no installed distribution")
        elif not declared & set(providers):
            problems.append(
                f"{found.path}:{found.line}: `{found.name}` is imported but its distribution "
                f"({' or '.join(providers)}) is not in [project] dependencies"
            )
    return problems


def first_party_files() -> list[Path]:
    return sorted(path for package in FIRST_PARTY for path in (REPO_ROOT / package).rglob("*.py"))


def test_every_imported_distribution_is_declared():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    imports = [
        found
        for path in first_party_files()
        for found in third_party_imports(
            path.read_text(encoding="utf-8"), path.relative_to(REPO_ROOT).as_posix()
        )
    ]
    assert imports, "the scan found no third-party import at all: is FIRST_PARTY still right?"
    shipped = [found for found in imports if found.path not in DEV_ONLY]
    dev_only = [found for found in imports if found.path in DEV_ONLY]
    distributions = packages_distributions()
    assert undeclared(shipped, declared_distributions(pyproject), distributions) == []
    assert undeclared(dev_only, declared_distributions(pyproject, ["dev"]), distributions) == []


def test_first_party_packages_are_the_ones_that_exist():
    assert all((REPO_ROOT / package / "__init__.py").is_file() for package in FIRST_PARTY)


# The check itself, on inline micro-data.
DISTRIBUTIONS = {"yaml": ["PyYAML"], "numpy": ["numpy"], "mlflow": ["mlflow-skinny", "mlflow"]}


@pytest.mark.parametrize(
    ("source", "declared", "expected"),
    [
        ("import numpy as np\n", set(), ["m.py:1: `numpy` is imported but its distribution (numpy)"]),
        ("import numpy\n", {"numpy"}, []),
        # Import names differ from distribution names; any one provider being declared is enough.
        ("from yaml import safe_load\n", {"pyyaml"}, []),
        ("import mlflow.pyfunc\n", {"mlflow"}, []),
        # Imports inside functions count: they run as soon as the function does.
        ("def f():\n    import numpy\n", set(), ["m.py:2: `numpy` is imported"]),
        ("import nonexistent_pkg\n", set(), ["m.py:1: `nonexistent_pkg` comes from no installed"]),
        # The standard library, our own packages and relative imports are not third-party.
        ("import json, os.path\nfrom collections import abc\n", set(), []),
        ("from serving.inference import IntentClassifier\nimport tuneloop\n", set(), []),
        ("from . import sibling\nfrom .io import read_json\n", set(), []),
    ],
)
def test_undeclared_flags_only_imports_of_undeclared_distributions(source, declared, expected):
    problems = undeclared(third_party_imports(source, "m.py"), declared, DISTRIBUTIONS)
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start)


def test_declared_distributions_reads_names_without_versions_or_extras():
    pyproject = {
        "project": {"dependencies": ["PyJWT[crypto]>=2.10,<3", "ruamel.yaml>=0.18", "torch==2.13.0"]}
    }
    assert declared_distributions(pyproject) == {"pyjwt", "ruamel-yaml", "torch"}
