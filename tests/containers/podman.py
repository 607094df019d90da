"""podman for the container tests: an isolated store, an offline base image, builds that reach this
machine's package indexes, and containers run in the background.

No container registry is reachable from the test machines, so the base image is made here:
`debootstrap --variant=minbase bookworm` from the machine's Debian mirror, imported with `podman import`.
The store (``--root``) lives in a cache folder keyed by the Dockerfile and constraints.txt, so a second
session finds the base and the build's layers there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tests.support import REPO_ROOT

DOCKERFILE = REPO_ROOT / "deploy/docker/Dockerfile"
BASE_IMAGE = "localhost/tuneloop-base:bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Inside a build, where the host's local package indexes and CA bundle are mounted (read-only).
BUILD_MOUNTS = "/tuneloop-build"
# An image imported from a tarball has no environment: RUN steps and `ENV PATH=...:$PATH` need one.
IMPORTED_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PIP_SETTINGS = ("index-url", "extra-index-url", "find-links", "trusted-host", "cert", "default-timeout")


def cache_key() -> str:
    """Changes when the Dockerfile or the pins change: then the base and every layer are made afresh."""
    digest = hashlib.sha256()
    for path in (DOCKERFILE, REPO_ROOT / "constraints.txt"):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("TUNELOOP_CONTAINER_CACHE", Path.home() / ".cache/tuneloop/containers"))


def missing_tools() -> list[str]:
    return [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]


def _ulimit(kind: int, wanted: int) -> int:
    """``wanted``, or the host's hard limit when that is lower (podman's defaults exceed it here)."""
    hard = resource.getrlimit(kind)[1]
    return wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)


def containers_conf() -> str:
    nofile = _ulimit(resource.RLIMIT_NOFILE, 1048576)
    nproc = _ulimit(resource.RLIMIT_NPROC, 32768)
    return (
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n"
        # crun fails on this machine's cgroups (hybrid mode); runc works.
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
    )


@dataclass(frozen=True)
class Podman:
    """podman on its own store under ``folder``; every call goes through :meth:`run`."""

    folder: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.folder / "containers.conf")}

    @property
    def runroot(self) -> Path:
        """podman refuses a runroot path over 50 characters; its database records it, so it stays put."""
        return Path(tempfile.gettempdir()) / f"tuneloop-podman-{self.folder.name}"

    def command(self, *args: str) -> list[str]:
        root = self.folder / "storage"
        return ["podman", "--root", str(root), "--runroot", str(self.runroot), *args]

    def prepare(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "containers.conf").write_text(containers_conf())

    def run(
        self, *args: str, check: bool = True, timeout: float | None = None, stdin=None
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            self.command(*args),
            env=self.env,
            capture_output=True,
            text=stdin is None,
            stdin=stdin,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            output = done.stdout + done.stderr
            tail = output[-6000:] if isinstance(output, str) else output[-6000:].decode(errors="replace")
            raise AssertionError(f"podman {' '.join(args[:3])} failed ({done.returncode}):\n{tail}")
        return done

    def image_exists(self, name: str) -> bool:
        done = self.run("image", "exists", name, check=False)
        if done.returncode not in (0, 1):
            raise AssertionError(f"podman image exists failed ({done.returncode}): {done.stderr[-2000:]}")
        return done.returncode == 0

    def image_size(self, name: str) -> int:
        return int(json.loads(self.run("image", "inspect", name).stdout)[0]["Size"])

    def image_config(self, name: str) -> dict:
        return json.loads(self.run("image", "inspect", name).stdout)[0]["Config"]


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 ``.sources`` or a ``sources.list`` line)."""
    apt = Path("/etc/apt")
    for path in sorted(apt.glob("sources.list.d/*.sources")):
        for stanza in path.read_text().split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:(.*)$", stanza, re.M)
            if uris and suites and "bookworm" in suites.group(1).split():
                return uris.group(1)
    for path in [apt / "sources.list", *sorted(apt.glob("sources.list.d/*.list"))]:
        if path.exists():
            for line in path.read_text().splitlines():
                match = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", line + " ")
                if match:
                    return match.group(1)
    return DEFAULT_MIRROR


def make_base_image(podman: Podman) -> float:
    """Debian bookworm (minbase, no Python) as ``BASE_IMAGE``; returns the seconds it took."""
    started = time.monotonic()
    rootfs = podman.folder / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    try:
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), debian_mirror()],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, f"debootstrap failed:\n{(done.stdout + done.stderr)[-4000:]}"
        for package in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            package.unlink()
        # --one-file-system: nothing of a /proc or /sys debootstrap may have left mounted.
        tar = subprocess.Popen(
            ["tar", "--one-file-system", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE
        )
        podman.run(
            "import",
            "--change",
            f"ENV PATH={IMPORTED_PATH}",
            "--change",
            'CMD ["/bin/bash"]',
            "-",
            BASE_IMAGE,
            stdin=tar.stdout,
            timeout=600,
        )
        assert tar.wait() == 0, "tar of the debootstrap root failed"
    finally:
        for mount in ("proc", "sys", "dev/pts"):
            subprocess.run(["umount", "-l", str(rootfs / mount)], capture_output=True, check=False)
        shutil.rmtree(rootfs, ignore_errors=True)
    return time.monotonic() - started


def _host_pip_settings() -> dict[str, str]:
    """pip's index settings on this machine (files, then PIP_* variables, which win)."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    files, variables = {}, {}
    for line in listing.splitlines():
        match = re.match(r"^(:env:|[\w-]+)\.([\w-]+)=(.*)$", line.strip())
        if match and match.group(2) in PIP_SETTINGS:
            scope, name, value = match.groups()
            (variables if scope == ":env:" else files)[name] = value.strip("'\"")
    return {**files, **variables}


def build_pip_config(folder: Path) -> tuple[Path, list[str]]:
    """A pip.conf for the build with this machine's indexes, and the ``--volume`` options it needs.

    Local folders (find-links, file:// indexes) and the CA bundle are mounted read-only under
    BUILD_MOUNTS and the settings rewritten to point there; so nothing of /opt ends up in an image.
    """
    settings = _host_pip_settings()
    volumes: dict[str, str] = {}

    def mounted(host: str) -> str:
        if host not in volumes:
            volumes[host] = f"{BUILD_MOUNTS}/{len(volumes)}"
        return volumes[host]

    def local_location(location: str, is_index: bool) -> str:
        if location.startswith("file://"):
            path = Path(urlsplit(location).path)
        elif "://" not in location:
            path = Path(location)
        else:
            return location
        if not path.exists():
            return ""
        # A simple index links its files relative to itself (../../files/...): mount its parent.
        root = path.parent if is_index else path
        inside = f"{mounted(str(root))}/{path.relative_to(root)}".rstrip("/.")
        return f"file://{inside}" if location.startswith("file://") or is_index else inside

    lines = ["[global]"]
    for name, value in settings.items():
        if name in ("index-url", "extra-index-url", "find-links"):
            locations = [local_location(item, name != "find-links") for item in value.split()]
            value = " ".join(location for location in locations if location)
        elif name == "cert" and Path(value).is_file():
            value = f"{mounted(str(Path(value).parent))}/{Path(value).name}"
        if value:
            lines.append(f"{name} = {value}")
    config = folder / "pip.conf"
    config.write_text("\n".join(lines) + "\n")
    options = [f"--volume={host}:{inside}:ro" for host, inside in volumes.items()]
    options.append(f"--volume={folder}:{BUILD_MOUNTS}/pip:ro")
    return config, options


@dataclass(frozen=True)
class Build:
    image: str
    seconds: float
    size_bytes: int


def build_image(podman: Podman, target: str, tag: str, build_args: dict[str, str]) -> Build:
    """``podman build --target``; the layers are reused when their inputs did not change."""
    pip_folder = podman.folder / "pip"
    pip_folder.mkdir(exist_ok=True)
    _, volumes = build_pip_config(pip_folder)
    args = [f"--build-arg={name}={value}" for name, value in build_args.items()]
    started = time.monotonic()
    podman.run(
        "build",
        "--layers",
        "--file",
        str(DOCKERFILE),
        "--target",
        target,
        "--tag",
        tag,
        f"--build-arg=BASE_IMAGE={BASE_IMAGE}",
        f"--build-arg=PIP_CONFIG_FILE={BUILD_MOUNTS}/pip/pip.conf",
        # The CPU wheel comes from this machine's find-links; PyTorch's index is not reachable here.
        "--build-arg=TORCH_CPU_INDEX_URL=",
        *args,
        *volumes,
        str(REPO_ROOT),
        timeout=3600,
    )
    return Build(tag, time.monotonic() - started, podman.image_size(tag))


@contextmanager
def running_container(podman: Podman, name: str, *args: str) -> Iterator[str]:
    """``podman run -d --name NAME ARGS``; the container (and its output) goes when the block ends."""
    podman.run("rm", "--force", "--ignore", name, check=False)
    podman.run("run", "--detach", "--name", name, *args, timeout=300)
    try:
        yield name
    finally:
        podman.run("rm", "--force", "--time", "10", name, check=False, timeout=120)


def logs(podman: Podman, name: str, tail: int = 80) -> str:
    done = podman.run("logs", "--tail", str(tail), name, check=False)
    return done.stdout + done.stderr


def wait_ready(url: str, podman: Podman, container: str, seconds: float) -> float:
    """Seconds until ``url`` answers 200; fails with the container's log when it exits or times out."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        state = podman.run("inspect", "--format", "{{.State.Running}}", container, check=False).stdout
        if state.strip() == "false":
            break
        time.sleep(0.5)
    raise AssertionError(
        f"{url} not ready after {time.monotonic() - started:.0f} s:\n{logs(podman, container)}"
    )


def world_readable(path: Path) -> Path:
    """Mounted into a container that runs as uid 10001, a root-owned 0700 temp folder is closed."""
    path.chmod(0o755)
    for child in path.iterdir():
        child.chmod(0o755 if child.is_dir() else 0o644)
    return path


def unmount_below(folder: Path) -> None:
    """Lazily unmount whatever is mounted under ``folder``, deepest first."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    inside = [mount for mount in mounts if mount == str(folder) or mount.startswith(f"{folder}/")]
    for mount in sorted(inside, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
