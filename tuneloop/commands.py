"""The DVC and git commands that flows and the registry run, as plain functions over a project folder.

They run the same CLI a user would type (`dvc pull`, `dvc repro -s <stage>`, `dvc push`), in a
subprocess, so that a stage's output streams into the caller's logger line by line and a stage that
overruns its time limit can be killed together with everything it started (DVC runs a stage through a
shell, which runs Python: three processes deep).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

STAGES = ("prepare", "validate", "train", "evaluate")


class CommandFailed(RuntimeError):
    """A command exited non-zero; the message carries its last output lines."""

    def __init__(self, args: list[str], returncode: int, tail: list[str]):
        self.returncode = returncode
        super().__init__(f"`{' '.join(args)}` exited with {returncode}:\n" + "\n".join(tail))


class CommandTimedOut(TimeoutError):
    """A command ran past its limit and was killed with its children."""


def venv_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """DVC runs stage commands through the shell: make `python` there the interpreter running this one."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.update(extra or {})
    return env


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (children first found, then killed together)."""
    try:
        root = psutil.Process(pid)
        victims = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(victims, timeout=10)


def run_logged(
    args: list[str],
    cwd: Path,
    logger: logging.Logger | logging.LoggerAdapter,
    timeout_s: float | None = None,
    tail_lines: int = 40,
    env: dict[str, str] | None = None,
) -> list[str]:
    """Run ``args`` in ``cwd``, logging each output line; returns the output lines.

    Raises CommandFailed on a non-zero exit and CommandTimedOut past ``timeout_s``. Whatever ends the
    wait early (a timeout, an exception Prefect raises into this thread, Ctrl-C) kills the whole tree.
    """
    process = subprocess.Popen(
        args,
        cwd=cwd,
        env=env if env is not None else venv_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines: list[str] = []

    def forward() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            lines.append(line)
            logger.info("%s", line)

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    finished = False
    try:
        # Short waits in a loop, not one long wait: an exception raised into this thread (Prefect's
        # task timeout) only lands between Python calls.
        while process.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise CommandTimedOut(f"`{' '.join(args)}` ran past its limit of {timeout_s:.0f} s")
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.5)
        finished = True
    finally:
        if not finished:
            kill_tree(process.pid)
        reader.join(timeout=5)
    if process.returncode != 0:
        raise CommandFailed(args, process.returncode, lines[-tail_lines:])
    return lines


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def data_pointers(project_dir: Path, rev: str | None = None) -> list[str]:
    """The `.dvc` pointer files git tracks (at ``rev``, or in the work tree): the project's input data."""
    if rev is None:
        listing = ["git", "ls-files", "--", "*.dvc"]
    else:
        listing = ["git", "ls-tree", "-r", "--name-only", rev]
    out = subprocess.run(listing, cwd=project_dir, capture_output=True, text=True, check=True).stdout
    return sorted(p for p in out.splitlines() if p.endswith(".dvc") and not p.startswith(".dvc/"))


def resolve_rev(project_dir: Path, rev: str) -> str:
    """The commit ``rev`` names; a clear error for a rev git does not know."""
    result = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        cwd=project_dir,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise ValueError(f"data_rev {rev!r} is not a commit, branch or tag of {project_dir}")
    return result.stdout.strip()


def write_pointers(project_dir: Path, pointers: dict[str, str]) -> list[str]:
    """Write `.dvc` pointer files given by content (path relative to the project -> YAML text).

    How a data version travels to a machine or pod whose git work tree lacks the commit that made it
    (a drift job's append): the pointer names the data by md5 and the data is in the shared remote.
    Each path must be a `.dvc` file inside the project, each text a pointer with an md5, or nothing is
    written.
    """
    root = project_dir.resolve()
    checked = {}
    for name, text in pointers.items():
        target = (root / name).resolve()
        if not name.endswith(".dvc") or not target.is_relative_to(root) or name.startswith(".dvc/"):
            raise ValueError(f"data pointer {name!r} is not a .dvc file inside {root}")
        outs = (yaml.safe_load(text) or {}).get("outs") if text.strip() else None
        if not outs or not all(isinstance(out, dict) and out.get("md5") for out in outs):
            raise ValueError(f"data pointer {name!r} names no output with an md5")
        checked[target] = text
    for target, text in checked.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return sorted(str(target.relative_to(root)) for target in checked)


def pull_data(
    project_dir: Path,
    logger: logging.Logger | logging.LoggerAdapter,
    rev: str | None = None,
    pointer_files: dict[str, str] | None = None,
) -> list[str]:
    """Bring the input data (the `.dvc` pointers' outputs) into the work tree from the DVC remote.

    With ``pointer_files`` (path -> content), those pointer files are written first and pulled: the data
    version they name, wherever this runs. Else with ``rev``, the pointer files are restored from that
    commit (`git checkout <rev> -- *.dvc`), so the run trains on that data version; they stay changed
    in the work tree, visible in `git status`. Returns the pointer files pulled.
    """
    if pointer_files:
        written = write_pointers(project_dir, pointer_files)
        logger.info("data version given by its pointers: %s", ", ".join(written))
        run_logged(dvc("pull", *written), project_dir, logger)
        return written
    if rev is not None:
        commit = resolve_rev(project_dir, rev)
        pointers = data_pointers(project_dir, commit)
        if not pointers:
            raise ValueError(f"commit {commit} tracks no .dvc pointer files: no data version to pull")
        run_logged(["git", "checkout", commit, "--", *pointers], project_dir, logger)
    else:
        pointers = data_pointers(project_dir)
    if not pointers:
        raise ValueError(f"{project_dir} tracks no .dvc pointer files: run `tuneloop init` first")
    run_logged(dvc("pull", *pointers), project_dir, logger)
    return pointers


def repro_stage(
    project_dir: Path,
    stage: str,
    logger: logging.Logger | logging.LoggerAdapter,
    timeout_s: float | None = None,
) -> bool:
    """`dvc repro --pull -s <stage>`: run one stage if its inputs changed; True if it ran.

    `--pull` fetches an unchanged stage's outputs from the remote when the local cache lacks them (a
    fresh machine resumes from what another already computed) instead of recomputing them.
    """
    lines = run_logged(dvc("repro", "--pull", "--single-item", stage), project_dir, logger, timeout_s)
    return any(f"Running stage '{stage}'" in line for line in lines)


def push_outputs(project_dir: Path, logger: logging.Logger | logging.LoggerAdapter) -> None:
    """`dvc push`: share the data and every cached stage output through the remote."""
    run_logged(dvc("push"), project_dir, logger)
