"""Data versioning with DVC: put the raw data (and its frozen test file) under DVC, configure a remote,
push; and `tuneloop init --data`: check a user's file, track it, write its mapping into params.yaml.

Each operation opens its own ``Repo``: a long-lived one breaks when the cache changes under it.
"""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from dvc.repo import Repo

from tuneloop.io import file_md5, read_table
from tuneloop.text import fold_text, normalise_whitespace

log = logging.getLogger(__name__)

LOCAL_REMOTE_NAME = "tuneloop-local"
# Where `tuneloop init --data` keeps DVC-tracked copies of files that live outside the project, and the
# frozen test files it splits off.
RAW_DIR = Path("data/raw")
# What `tuneloop.io.read_table` reads.
TABLE_SUFFIXES = {".csv", ".parquet", ".pq", ".jsonl", ".ndjson"}
# A label needs this many (distinct-text) rows before any of them is drawn into the frozen test set.
MIN_ROWS_FOR_TEST = 3


@dataclass(frozen=True)
class InitResult:
    created_dvc_repo: bool
    copied_sample: bool
    data_md5: str
    remote: str
    remote_url: str
    pushed_files: int
    # The frozen test file (project-relative), its md5, and how it got there this time:
    # "kept", "restored from the DVC remote", "copied from the sample" or "split off the raw data".
    test_path: str | None = None
    test_md5: str | None = None
    test_source: str | None = None


@contextmanager
def quiet_dvc() -> Iterator[None]:
    """DVC's own hints ("To track the changes with git, run: ...") would bury tuneloop's summary."""
    logger = logging.getLogger("dvc")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def ensure_dvc_repo(project_dir: Path) -> bool:
    """Make ``project_dir`` a DVC repo (inside git when it is a git work tree); True if created now."""
    if (project_dir / ".dvc").is_dir():
        return False
    Repo.init(str(project_dir), no_scm=not (project_dir / ".git").exists())
    return True


def ensure_default_remote(
    project_dir: Path, remote_url: str, endpoint_url: str | None = None
) -> tuple[str, str]:
    """Keep the user's default remote if there is one; else make ``remote_url`` tuneloop's default remote.

    tuneloop's own remote goes into ``.dvc/config.local`` (not committed: a folder path or a team's
    bucket is machine- or deployment-specific) and follows ``remote_url``, so that switching the stack
    to shared stores (TUNELOOP_S3_URL) moves it too. ``endpoint_url`` is an S3-compatible endpoint.
    """
    with Repo(str(project_dir)) as repo:
        default = repo.config["core"].get("remote")
        if default and default != LOCAL_REMOTE_NAME:
            return default, repo.config["remote"][default]["url"]
        if "://" not in remote_url:
            Path(remote_url).mkdir(parents=True, exist_ok=True)
        settings = {"url": str(remote_url)}
        if endpoint_url:
            settings["endpointurl"] = endpoint_url
        if default == LOCAL_REMOTE_NAME and repo.config["remote"][default] == settings:
            return default, str(remote_url)
        with repo.config.edit("local") as config:
            config["remote"][LOCAL_REMOTE_NAME] = settings
            config["core"]["remote"] = LOCAL_REMOTE_NAME
    return LOCAL_REMOTE_NAME, str(remote_url)


def pointer_of(path: Path) -> Path:
    """The ``.dvc`` pointer file that tracks ``path``."""
    return path.with_name(path.name + ".dvc")


def tracked_md5(pointer_path: Path) -> str | None:
    """The md5 a ``.dvc`` pointer file records for its single output, if the pointer exists."""
    if not pointer_path.exists():
        return None
    return yaml.safe_load(pointer_path.read_text(encoding="utf-8"))["outs"][0]["md5"]


def imported_from(pointer_path: Path) -> str | None:
    """The origin a ``.dvc`` pointer records when its file came from `dvc import-url`; None otherwise."""
    if not pointer_path.exists():
        return None
    deps = yaml.safe_load(pointer_path.read_text(encoding="utf-8")).get("deps") or []
    return deps[0]["path"] if deps else None


def add_and_push(project_dir: Path, data_path: Path | Sequence[Path]) -> int:
    """Track the file(s) with DVC and push them (only them) to the default remote; returns files pushed.

    Stage outputs in the cache are not this step's to push: `dvc push` and the training flow send them.

    A file that came from `dvc import-url` keeps its pointer and origin: its current content (e.g. with
    feedback appended) is committed into that pointer instead of re-adding it as a new one.
    """
    paths = [data_path] if isinstance(data_path, Path | str) else list(data_path)
    # Absolute: DVC resolves a relative target against the process's working folder, not the repo.
    absolute = [Path(p) if Path(p).is_absolute() else project_dir / p for p in paths]
    imports = [p for p in absolute if imported_from(pointer_of(p)) is not None]
    to_add = [str(p) for p in absolute if p not in imports]
    with Repo(str(project_dir)) as repo:
        # The caller commits the pointer itself: DVC's "To track the changes with git, run: ..." hint
        # would tell a reader of a story or a flow log to do what is already being done.
        repo.scm_context.quiet = True
        if to_add:
            repo.add(to_add)
        for path in imports:
            repo.commit(str(pointer_of(path)), force=True)
    with Repo(str(project_dir)) as repo:
        return int(repo.push(targets=[str(pointer_of(p)) for p in absolute]))


def _restore_from_remote(project_dir: Path, path: Path) -> bool:
    """Pull ``path`` when its pointer exists but the file does not (a fresh clone); True if it came back."""
    pointer = pointer_of(path)
    if path.exists() or not pointer.exists():
        return path.exists()
    # On a fresh clone the remote is often empty: DVC's warnings about it are expected here, not news.
    loggers = [logging.getLogger(name) for name in ("dvc", "dvc_data")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with Repo(str(project_dir)) as repo:
            repo.pull(targets=[str(pointer)])
    except Exception as error:  # noqa: BLE001 - an empty or unreachable remote: fall back to the sample
        log.info("%s is not in the DVC remote (%s)", path, type(error).__name__)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    return path.exists()


def _must_match_pointer(path: Path, recorded: str | None, project_dir: Path) -> None:
    """A file re-made here must be the one its committed pointer records; never a silent substitute."""
    if recorded is None or file_md5(path) == recorded:
        return
    path.unlink()
    raise RuntimeError(
        f"{_display(path, project_dir)} is tracked by DVC (md5 {recorded}) but is neither here nor in "
        "the DVC remote; `dvc pull` it (`dvc update` for an import) — tuneloop init will not put "
        "different data in its place"
    )


def _frozen_test_settings(project_dir: Path) -> dict[str, Any]:
    """data.test_path, the label column and the split settings from the project's params.yaml."""
    params_file = project_dir / "params.yaml"
    raw = yaml.safe_load(params_file.read_text(encoding="utf-8")) if params_file.exists() else {}
    data, prepare = (raw or {}).get("data") or {}, (raw or {}).get("prepare") or {}
    return {
        "test_path": data.get("test_path"),
        "text_column": data.get("text_column", "text"),
        "label_column": data.get("label_column", "label"),
        "seed": prepare.get("seed", 42),
        "test_fraction": prepare.get("test_fraction", 0.15),
    }


def sample_test_file(sample_path: Path) -> Path:
    """The frozen test file that ships next to a sample (``intents.csv`` -> ``intents-test.csv``)."""
    return sample_path.with_name(f"{sample_path.stem}-test{sample_path.suffix}")


def init_project(
    project_dir: Path,
    sample_path: Path,
    raw_path: Path,
    remote_url: str,
    test_path: Path | None = None,
    remote_endpoint_url: str | None = None,
) -> InitResult:
    """Idempotently: DVC repo, raw data and frozen test file in place, both tracked, pushed.

    Raw data: restored from the remote when only its pointer is here, else the sample is copied. The
    frozen test file (``test_path``, default: data.test_path in the project's params.yaml) is never
    redrawn once it exists: restored from the remote, else the sample's own test file when the raw data
    is the sample, else split off the raw data once (seeded, stratified, prepare.test_fraction).
    """
    project_dir = project_dir.resolve()
    created = ensure_dvc_repo(project_dir)
    remote, url = ensure_default_remote(project_dir, remote_url, remote_endpoint_url)
    raw = raw_path if raw_path.is_absolute() else project_dir / raw_path
    copied = False
    if not _restore_from_remote(project_dir, raw):
        raw.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample_path, raw)
        _must_match_pointer(raw, tracked_md5(pointer_of(raw)), project_dir)
        copied = True
        log.info("copied the sample dataset %s to %s", sample_path, raw)
    settings = _frozen_test_settings(project_dir)
    if test_path is None and settings["test_path"]:
        test_path = Path(settings["test_path"])
    tracked = [raw]
    test = test_source = None
    if test_path is not None:
        test = test_path if test_path.is_absolute() else project_dir / test_path
        if test.exists():
            test_source = "kept"
        elif _restore_from_remote(project_dir, test):
            test_source = "restored from the DVC remote"
        elif sample_test_file(sample_path).exists() and file_md5(raw) == file_md5(sample_path):
            test.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sample_test_file(sample_path), test)
            _must_match_pointer(test, tracked_md5(pointer_of(test)), project_dir)
            test_source = "copied from the sample"
        else:
            frame = read_table(raw)
            split = split_frozen_test(
                frame,
                settings["text_column"],
                settings["label_column"],
                settings["test_fraction"],
                settings["seed"],
            )
            test.parent.mkdir(parents=True, exist_ok=True)
            write_table(split, test)
            _must_match_pointer(test, tracked_md5(pointer_of(test)), project_dir)
            test_source = "split off the raw data"
        log.info("frozen test file %s: %s", test, test_source)
        if test.is_relative_to(project_dir):
            tracked.append(test)
    pushed = add_and_push(project_dir, tracked)
    return InitResult(
        created,
        copied,
        file_md5(raw),
        remote,
        url,
        pushed,
        test_path=_display(test, project_dir) if test else None,
        test_md5=file_md5(test) if test else None,
        test_source=test_source,
    )


# ------------------------------------------------------------------------ the frozen test set


def split_frozen_test(
    frame: pd.DataFrame, text_column: str, label_column: str, fraction: float, seed: int
) -> pd.DataFrame:
    """The rows drawn ONCE as the frozen test set, in the file's own columns and order.

    Stratified by label and seeded; each distinct text (case and punctuation folded) is a candidate
    once, rows without text or label never are, and labels with fewer than ``MIN_ROWS_FOR_TEST``
    candidates are left out (all their rows stay for training). The raw file keeps every row: `prepare`
    drops the ones whose text is in the test file (prepare.drop_test_overlap).
    """
    from sklearn.model_selection import train_test_split

    texts = normalise_whitespace(frame[text_column].astype("string"))
    labels = frame[label_column].astype("string")
    folded = fold_text(texts)
    usable = texts.fillna("").str.len().gt(0) & labels.notna() & ~folded.duplicated(keep="first")
    counts = labels[usable].value_counts()
    usable &= labels.map(counts).fillna(0).ge(MIN_ROWS_FOR_TEST)
    candidates = frame.index[usable]
    if len(candidates) == 0 or labels[usable].nunique() < 2:
        raise DatasetRefused(
            f"cannot split off a frozen test set: need at least 2 labels with {MIN_ROWS_FOR_TEST} or "
            "more distinct texts each; give a test file with --test"
        )
    _, test_index = train_test_split(
        candidates, test_size=fraction, random_state=seed, stratify=labels[candidates]
    )
    return frame.loc[sorted(test_index)].reset_index(drop=True)


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """Write by extension (the formats ``read_table`` reads), atomically: a crash leaves the old file."""
    suffix = path.suffix.lower()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=suffix, delete=False) as handle:
        temporary = Path(handle.name)
    try:
        if suffix == ".csv":
            frame.to_csv(temporary, index=False)
        elif suffix in {".parquet", ".pq"}:
            frame.to_parquet(temporary, index=False)
        elif suffix in {".jsonl", ".ndjson"}:
            frame.to_json(temporary, orient="records", lines=True, force_ascii=False)
        else:
            raise ValueError(f"{path}: unsupported extension {suffix!r}; use .csv, .parquet or .jsonl")
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


# ------------------------------------------------------------------ `tuneloop init --data FILE`


class DatasetRefused(ValueError):
    """`tuneloop init --data` cannot use the given file(s); the message says exactly what is wrong."""


@dataclass(frozen=True)
class CheckedData:
    frame: pd.DataFrame
    test_frame: pd.DataFrame | None
    labels: tuple[str, ...]


def _read_checked(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise DatasetRefused(f"{what} {path} does not exist or is not a file")
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise DatasetRefused(
            f"{what} {path}: unsupported extension {path.suffix!r}; use .csv, .parquet or .jsonl"
        )
    try:
        frame = read_table(path)
    except Exception as error:  # noqa: BLE001 - any parser error means the same thing to the user
        raise DatasetRefused(f"{what} {path} could not be read as {path.suffix}: {error}") from None
    if frame.empty:
        raise DatasetRefused(f"{what} {path} has no rows")
    return frame


def _line_numbers(frame: pd.DataFrame, mask: pd.Series, path: Path, limit: int = 5) -> str:
    """Where the failing rows are, as a user would find them (file lines for CSV, row numbers otherwise)."""
    rows = list(frame.index[mask.to_numpy()][:limit])
    if path.suffix.lower() == ".csv":
        return "lines " + ", ".join(str(row + 2) for row in rows) + (" ..." if mask.sum() > limit else "")
    return "rows " + ", ".join(str(row + 1) for row in rows) + (" ..." if mask.sum() > limit else "")


def _check_columns(
    frame: pd.DataFrame,
    path: Path,
    what: str,
    text_column: str,
    label_column: str,
    group_columns: Sequence[str],
) -> tuple[pd.Series, pd.Series]:
    wanted = [("--text-column", text_column), ("--label-column", label_column)]
    wanted += [("--group-column", column) for column in group_columns]
    missing = [f"{flag} '{column}'" for flag, column in wanted if column not in frame.columns]
    if missing:
        raise DatasetRefused(
            f"{what} {path} has no column {', '.join(missing)}; its columns are {list(frame.columns)}"
        )
    texts = normalise_whitespace(frame[text_column].astype("string"))
    empty = texts.fillna("").str.len().eq(0)
    if empty.any():
        raise DatasetRefused(
            f"{what} {path}: {int(empty.sum())} rows have an empty text in column '{text_column}' "
            f"({_line_numbers(frame, empty, path)}); remove or fill them"
        )
    # Labels as `prepare` reads them (not stripped), so data.labels matches what validate sees.
    labels = frame[label_column].astype("string")
    no_label = labels.fillna("").str.strip().str.len().eq(0)
    if no_label.any():
        raise DatasetRefused(
            f"{what} {path}: {int(no_label.sum())} rows have no label in column '{label_column}' "
            f"({_line_numbers(frame, no_label, path)}); remove or label them"
        )
    return texts, labels


def check_dataset(
    data_file: Path,
    test_file: Path | None,
    text_column: str,
    label_column: str,
    group_columns: Sequence[str] = (),
) -> CheckedData:
    """Refuse (DatasetRefused) unless the data can go through the pipeline as mapped.

    Readable CSV/Parquet/JSONL; the named columns exist; every text and label is non-empty; at least
    2 labels; a test file with the same columns and only labels the data has.
    """
    frame = _read_checked(data_file, "data file")
    _, labels = _check_columns(frame, data_file, "data file", text_column, label_column, group_columns)
    label_set = sorted(set(labels))
    if len(label_set) < 2:
        raise DatasetRefused(
            f"data file {data_file}: column '{label_column}' has {len(label_set)} distinct label "
            f"({', '.join(label_set)}); a classifier needs at least 2"
        )
    test_frame = None
    if test_file is not None:
        test_frame = _read_checked(test_file, "test file")
        other = [column for column in frame.columns if column not in test_frame.columns]
        if other:
            raise DatasetRefused(
                f"test file {test_file} lacks column(s) {other} of the data file {data_file}; "
                f"it has {list(test_frame.columns)}"
            )
        _, test_labels = _check_columns(
            test_frame, test_file, "test file", text_column, label_column, group_columns
        )
        unseen = test_labels[~test_labels.isin(label_set)].value_counts()
        if not unseen.empty:
            shown = ", ".join(f"'{label}' ({count} rows)" for label, count in unseen.head(10).items())
            raise DatasetRefused(
                f"test file {test_file} has {len(unseen)} label(s) that the data file never has: {shown}; "
                "a model cannot learn them"
            )
    return CheckedData(frame, test_frame, tuple(label_set))


@dataclass(frozen=True)
class TrackedFile:
    """A file under DVC: where it is in the project, its pointer, md5, and where it came from."""

    path: str
    pointer: str
    md5: str
    origin: str | None
    how: str


def _display(path: Path, project_dir: Path) -> str:
    return path.relative_to(project_dir).as_posix() if path.is_relative_to(project_dir) else str(path)


def _git_tracks(project_dir: Path, path: Path) -> bool:
    if not (project_dir / ".git").exists():
        return False
    listed = subprocess.run(
        ["git", "ls-files", "--error-unmatch", str(path)],
        cwd=project_dir,
        capture_output=True,
        check=False,
    )
    return listed.returncode == 0


def track_file(project_dir: Path, source: Path) -> TrackedFile:
    """Put ``source`` under DVC without ever handing its bytes to git.

    Inside the project (and not in git): `dvc add` in place. Outside it, or a file git already tracks:
    `dvc import-url` into data/raw/<name> — a DVC-tracked copy whose pointer records the origin and
    its md5 (refresh it deliberately with `dvc update data/raw/<name>.dvc`). Re-running with the same
    file changes nothing; a different file under the same name is refused.
    """
    source = source.resolve()
    if source.is_relative_to(project_dir) and not _git_tracks(project_dir, source):
        origin = imported_from(pointer_of(source))
        if origin is None:
            with Repo(str(project_dir)) as repo:
                repo.add([str(source)])
        return TrackedFile(
            _display(source, project_dir),
            _display(pointer_of(source), project_dir),
            tracked_md5(pointer_of(source)) or file_md5(source),
            origin,
            "dvc add (in place)" if origin is None else f"dvc import-url from {origin}",
        )
    target = project_dir / RAW_DIR / source.name
    pointer = pointer_of(target)
    origin = str(source) if not source.is_relative_to(project_dir) else None
    recorded = imported_from(pointer)
    if pointer.exists():
        if recorded is None or (project_dir / RAW_DIR / recorded).resolve() != source:
            raise DatasetRefused(
                f"{_display(target, project_dir)} already tracks "
                f"{recorded or 'a file added in place'}, not {source}; rename your file or remove "
                f"{_display(pointer, project_dir)} (and the data) first"
            )
        before = tracked_md5(pointer)
        with Repo(str(project_dir)) as repo:
            repo.update([str(pointer)])
        how = "dvc import-url (unchanged)" if tracked_md5(pointer) == before else "dvc update (refreshed)"
    else:
        if target.exists():
            raise DatasetRefused(
                f"{_display(target, project_dir)} exists and is not tracked by DVC; move it away or use "
                "it directly with --data"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        with Repo(str(project_dir)) as repo:
            repo.imp_url(str(source), out=str(target))
        how = "dvc import-url"
    return TrackedFile(
        _display(target, project_dir),
        _display(pointer, project_dir),
        tracked_md5(pointer) or file_md5(target),
        origin or imported_from(pointer),
        how,
    )


def _yaml_safe(value: Any) -> Any:
    """Quote a string that YAML 1.1 readers (PyYAML: `load_params`) would read as something else."""
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
        return DoubleQuotedScalarString(value)
    return value


def _set_sequence(mapping: Any, key: str, values: Sequence[Any], flow: bool) -> None:
    """Replace a list's items in place, so that comments attached to it survive."""
    from ruamel.yaml.comments import CommentedSeq

    current = mapping.get(key)
    if isinstance(current, CommentedSeq):
        # A comment or blank line after the list hangs on its last item: move it to the new last item.
        trailing = current.ca.items.get(len(current) - 1)
        current.clear()
        current.ca.items.clear()
        current.extend(values)
        if trailing and values:
            current.ca.items[len(values) - 1] = trailing
    else:
        current = CommentedSeq(values)
        mapping[key] = current
    if flow:
        current.fa.set_flow_style()
    else:
        current.fa.set_block_style()


def write_data_params(params_path: Path, values: dict[str, Any]) -> list[str]:
    """Set ``data.<key>`` in params.yaml keeping every comment and all other keys; returns keys changed."""
    from ruamel.yaml import YAML

    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    yaml_rt.width = 4096
    yaml_rt.indent(mapping=2, sequence=4, offset=2)
    yaml_rt.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    document = yaml_rt.load(params_path.read_text(encoding="utf-8"))
    data = document["data"]
    changed = []
    for key, value in values.items():
        old = data.get(key)
        if isinstance(value, list | tuple):
            if list(old or []) != list(value):
                _set_sequence(data, key, [_yaml_safe(item) for item in value], flow=key != "labels")
                changed.append(key)
        elif old != value:
            data[key] = _yaml_safe(value)
            changed.append(key)
    if changed:
        out = io.StringIO()
        yaml_rt.dump(document, out)
        params_path.write_text(out.getvalue(), encoding="utf-8")
    return changed


@dataclass(frozen=True)
class DatasetResult:
    data: TrackedFile
    test: TrackedFile
    rows: int
    test_rows: int
    labels: tuple[str, ...]
    text_column: str
    label_column: str
    group_columns: tuple[str, ...]
    test_split_off: bool
    params_path: str
    params_changed: list[str]
    remote: str
    remote_url: str
    pushed_files: int
    created_dvc_repo: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        shown = ", ".join(self.labels[:8]) + (
            f", ... ({len(self.labels)} in all)" if len(self.labels) > 8 else ""
        )
        groups = ", ".join(f"{c} -> group {c}" for c in self.group_columns) or "none"
        origin = f" (copy of {self.data.origin})" if self.data.origin else ""
        test_origin = f" (copy of {self.test.origin})" if self.test.origin else ""
        if self.test_split_off:
            test_how = "split off the data once (seeded, stratified; frozen from now on)"
        else:
            test_how = self.test.how
        lines = [
            f"data: {self.rows} rows, {len(self.labels)} labels: {shown}",
            f"columns: {self.text_column} -> text, {self.label_column} -> label; groups: {groups}",
            f"tracked: {self.data.path}{origin} by {self.data.how}; pointer {self.data.pointer} "
            f"(md5 {self.data.md5})",
            f"frozen test: {self.test.path}{test_origin}, {self.test_rows} rows, {test_how}; pointer "
            f"{self.test.pointer} (md5 {self.test.md5})",
            f"remote '{self.remote}' at {self.remote_url}: {self.pushed_files} file(s) pushed",
            (
                f"{self.params_path}: set data." + ", data.".join(self.params_changed)
                if self.params_changed
                else f"{self.params_path}: already up to date"
            ),
            *self.notes,
            f"git: commit {self.data.pointer}, {self.test.pointer}, their .gitignore and "
            f"{self.params_path} (never the data itself)",
            "next: tuneloop run",
        ]
        return "\n".join(lines)


def init_dataset(
    project_dir: Path,
    params_path: Path,
    data_file: Path,
    test_file: Path | None,
    text_column: str,
    label_column: str,
    group_columns: Sequence[str],
    remote_url: str,
    remote_endpoint_url: str | None = None,
) -> DatasetResult:
    """`tuneloop init --data`: check, DVC-track (never git), push, write the mapping into params.yaml.

    Without ``test_file`` a test set is split off the data once into data/raw/<name>-test<ext> and kept
    frozen: later runs (and appended feedback) never redraw it.
    """
    with quiet_dvc():
        return _init_dataset(
            project_dir.resolve(),
            params_path,
            Path(data_file).resolve(),
            Path(test_file).resolve() if test_file else None,
            text_column,
            label_column,
            tuple(group_columns),
            remote_url,
            remote_endpoint_url,
        )


def _init_dataset(
    project_dir: Path,
    params_path: Path,
    data_file: Path,
    test_file: Path | None,
    text_column: str,
    label_column: str,
    group_columns: tuple[str, ...],
    remote_url: str,
    remote_endpoint_url: str | None,
) -> DatasetResult:
    if test_file is not None and test_file == data_file:
        raise DatasetRefused(
            "--test is the same file as --data; a model would be scored on its training data"
        )
    checked = check_dataset(data_file, test_file, text_column, label_column, group_columns)
    created = ensure_dvc_repo(project_dir)
    remote, url = ensure_default_remote(project_dir, remote_url, remote_endpoint_url)
    data = track_file(project_dir, data_file)
    notes = []
    if test_file is not None and checked.test_frame is not None:
        test = track_file(project_dir, test_file)
        test_rows = len(checked.test_frame)
    else:
        split_path = project_dir / RAW_DIR / f"{Path(data.path).stem}-test{Path(data.path).suffix}"
        settings = _frozen_test_settings(project_dir)
        if split_path.exists():
            frozen = _read_checked(split_path, "frozen test file")
            _check_columns(frozen, split_path, "frozen test file", text_column, label_column, group_columns)
            notes.append(
                f"kept the existing frozen test file {_display(split_path, project_dir)}; delete it and "
                "its .dvc pointer to draw a new one"
            )
        else:
            frozen = split_frozen_test(
                checked.frame, text_column, label_column, settings["test_fraction"], settings["seed"]
            )
            split_path.parent.mkdir(parents=True, exist_ok=True)
            write_table(frozen, split_path)
        test = track_file(project_dir, split_path)
        test = TrackedFile(test.path, test.pointer, test.md5, None, "split off the data once")
        test_rows = len(frozen)
    with Repo(str(project_dir)) as repo:
        pushed = int(repo.push(targets=[str(project_dir / data.pointer), str(project_dir / test.pointer)]))
    changed = write_data_params(
        params_path,
        {
            "raw_path": data.path,
            "test_path": test.path,
            "text_column": text_column,
            "label_column": label_column,
            "group_columns": list(group_columns),
            "labels": list(checked.labels),
        },
    )
    return DatasetResult(
        data=data,
        test=test,
        rows=len(checked.frame),
        test_rows=test_rows,
        labels=checked.labels,
        text_column=text_column,
        label_column=label_column,
        group_columns=group_columns,
        test_split_off=test_file is None,
        params_path=_display(params_path.resolve(), project_dir),
        params_changed=changed,
        remote=remote,
        remote_url=url,
        pushed_files=pushed,
        created_dvc_repo=created,
        notes=notes,
    )


# ------------------------------------------------------------------ data versions committed to git
# A data version can be checked out again only once its `.dvc` pointer is in a commit.
# `commit_data_version` commits exactly the pointer files it is given (with the data folder's
# .gitignore when DVC changed it), never anything else in the work tree.

FALLBACK_GIT_NAME = "tuneloop-monitor"
FALLBACK_GIT_EMAIL = "tuneloop@localhost"
_GIT_IN_PROGRESS = ("MERGE_HEAD", "CHERRY_PICK_HEAD", "REVERT_HEAD", "rebase-merge", "rebase-apply")


class DataCommitRefused(RuntimeError):
    """Committing a data version here is unsafe or impossible; nothing was committed (see the message)."""


@dataclass(frozen=True)
class DataCommit:
    sha: str
    branch: str
    # The project-relative paths the commit changed.
    paths: tuple[str, ...]


def _git_run(project: Path, *args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> str:
    """``git args`` in ``project``; its stdout, stripped. Raises CalledProcessError carrying stderr."""
    import os

    result = subprocess.run(
        ["git", *args],
        cwd=project,
        capture_output=True,
        text=True,
        input=stdin,
        env={**os.environ, **env} if env else None,
    )
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, ["git", *args], result.stdout, result.stderr)
    return result.stdout.strip()


def _git_try(project: Path, *args: str) -> str:
    """``git args`` stdout, or "" when git exits non-zero (a missing ref, a detached HEAD)."""
    try:
        return _git_run(project, *args)
    except subprocess.CalledProcessError:
        return ""


def git_identity_options(project_dir: Path) -> list[str]:
    """``-c user.name=...`` / ``-c user.email=...`` for whichever of the two git config has no value for.

    A configured identity (repository, global or system config) is used as it is, and the
    ``GIT_AUTHOR_*`` / ``GIT_COMMITTER_*`` variables override config as always; only where config has
    nothing does the commit get ``tuneloop-monitor <tuneloop@localhost>``.
    """
    options = []
    for key, fallback in (("user.name", FALLBACK_GIT_NAME), ("user.email", FALLBACK_GIT_EMAIL)):
        if not _git_try(Path(project_dir), "config", "--get", key):
            options += ["-c", f"{key}={fallback}"]
    return options


def _project_relative(project: Path, path: str | Path) -> str:
    absolute = Path(path) if Path(path).is_absolute() else project / path
    return absolute.resolve().relative_to(project).as_posix()


def _top_relative(project: Path, path: str) -> str:
    top = Path(_git_run(project, "rev-parse", "--show-toplevel")).resolve()
    return (project / path).resolve().relative_to(top).as_posix()


def _staged_paths(project: Path) -> set[str]:
    """Top-level-relative paths whose index entry differs from HEAD (all of them before a first commit)."""
    if _git_try(project, "rev-parse", "--verify", "-q", "HEAD"):
        listing = _git_run(project, "diff", "--cached", "--name-only", "--no-renames", "-z", "HEAD")
    else:
        listing = _git_run(project, "ls-files", "--full-name", "-z")
    return {path for path in listing.split("\0") if path}


def check_data_commit(
    project_dir: Path, paths: Sequence[str | Path], branch: str | None = None
) -> str | None:
    """The branch a data commit of ``paths`` would go to; :class:`DataCommitRefused` when it is unsafe.

    None when ``project_dir`` is not in a git work tree (there is nothing to commit to). Refused: a
    merge, rebase, cherry-pick or revert in progress; on the current branch (``branch`` None or the
    checked-out one), a detached HEAD, or other files than ``paths`` staged (they would not be swept
    into the data commit, but someone is half-way through a commit of their own); on another branch,
    a name git rejects or a branch checked out in another work tree. Call it before writing any data,
    so that a refusal leaves everything as it was.
    """
    project = Path(project_dir).resolve()
    if _git_try(project, "rev-parse", "--is-inside-work-tree") != "true":
        return None
    for marker in _GIT_IN_PROGRESS:
        if (project / _git_run(project, "rev-parse", "--git-path", marker)).exists():
            raise DataCommitRefused(
                f"{project}: a git operation is in progress ({marker}); finish or abort it, then run the "
                "drift job again"
            )
    current = _git_try(project, "symbolic-ref", "-q", "--short", "HEAD")
    if branch is None or branch == current:
        if not current:
            raise DataCommitRefused(
                f"{project}: HEAD is detached; check out a branch (or set monitoring.data_branch) so that "
                "the data version is committed on a branch"
            )
        own = {_top_relative(project, _project_relative(project, p)) for p in paths}
        others = sorted(_staged_paths(project) - own)
        if others:
            raise DataCommitRefused(
                f"{project}: other changes are staged ({', '.join(others[:10])}); a data version is "
                "committed on its own: commit or unstage them first (`git restore --staged <file>`)"
            )
        return current
    if _git_try(project, "check-ref-format", "--branch", branch) != branch:
        raise DataCommitRefused(f"monitoring.data_branch {branch!r} is not a valid git branch name")
    if f"branch refs/heads/{branch}" in _git_run(project, "worktree", "list", "--porcelain").splitlines():
        raise DataCommitRefused(
            f"monitoring.data_branch {branch!r} is checked out in another work tree; a commit made "
            "behind its back would leave that work tree out of date"
        )
    return branch


def commit_data_version(
    project_dir: Path, paths: Sequence[str | Path], message: str, branch: str | None = None
) -> DataCommit | None:
    """Commit exactly ``paths`` (a data version's pointer files, project-relative) with ``message``.

    ``branch`` None or the checked-out branch: `git add` + `git commit -- <paths>` (an ordinary commit,
    hooks run). Another branch: the work tree's ``paths`` committed on top of that branch (made from
    HEAD when missing) through a temporary index and a compare-and-swap ref update, so that the work
    tree, the index and HEAD stay as they are; a training of the current branch then records a dirty
    lineage, since its data is not in its commit. The committer is git's own identity, else
    ``tuneloop-monitor <tuneloop@localhost>`` (:func:`git_identity_options`).

    Returns None when ``project_dir`` is not in a git work tree or ``paths`` have no change to commit.
    Raises :class:`DataCommitRefused` (see :func:`check_data_commit`).
    """
    project = Path(project_dir).resolve()
    target = check_data_commit(project, paths, branch)
    if target is None:
        log.warning("%s is not in a git work tree: the data version is not committed", project)
        return None
    relative = tuple(_project_relative(project, p) for p in paths)
    identity = git_identity_options(project)
    if target == _git_try(project, "symbolic-ref", "-q", "--short", "HEAD"):
        if not _git_run(project, "status", "--porcelain", "--untracked-files=all", "--", *relative):
            log.info("%s unchanged: no data commit", ", ".join(relative))
            return None
        _git_run(project, "add", "--", *relative)
        _git_run(project, *identity, "commit", "-q", "-F", "-", "--", *relative, stdin=message)
        sha: str | None = _git_run(project, "rev-parse", "HEAD")
    else:
        sha = _commit_on_other_branch(project, target, relative, message, identity)
    if sha is None:
        return None
    log.info("committed the data version as %s on %s: %s", sha[:12], target, ", ".join(relative))
    return DataCommit(sha, target, relative)


def _commit_on_other_branch(
    project: Path, branch: str, paths: tuple[str, ...], message: str, identity: list[str]
) -> str | None:
    import tempfile

    ref = f"refs/heads/{branch}"
    base = _git_try(project, "rev-parse", "--verify", "-q", f"{ref}^{{commit}}")
    expected_old = base  # compare-and-swap; "" = create only
    if not base:
        base = _git_run(project, "rev-parse", "--verify", "HEAD^{commit}")
        log.info("creating branch %s at HEAD (%s) for the data version", branch, base[:12])
    with tempfile.TemporaryDirectory() as folder:
        index = {"GIT_INDEX_FILE": str(Path(folder) / "index")}
        _git_run(project, "read-tree", base, env=index)
        for path in paths:
            blob = _git_run(project, "hash-object", "-w", "--", path)
            top_path = _top_relative(project, path)
            _git_run(project, "update-index", "--add", "--cacheinfo", f"100644,{blob},{top_path}", env=index)
        tree = _git_run(project, "write-tree", env=index)
    if tree == _git_run(project, "rev-parse", f"{base}^{{tree}}"):
        log.info("%s unchanged on %s: no data commit", ", ".join(paths), branch)
        return None
    sha = _git_run(project, *identity, "commit-tree", tree, "-p", base, "-F", "-", stdin=message)
    try:
        _git_run(project, "update-ref", "-m", "tuneloop: data version", ref, sha, expected_old)
    except subprocess.CalledProcessError as error:
        raise DataCommitRefused(
            f"branch {branch} moved while the data version was being committed ({error.stderr.strip()}); "
            f"the commit {sha[:12]} was not recorded"
        ) from error
    return sha
