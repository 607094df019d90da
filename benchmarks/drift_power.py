"""Power and false alarms of the concept-drift tests, before and after the redesign, on real answers.

    python -m benchmarks.drift_power --adapter /tmp/fresh/models/adapter \
        --prepared-dir /tmp/fresh/data/prepared [--windows 200] [--stable-windows 1000] [--no-mlflow]
    python -m benchmarks.drift_power --pools benchmarks/results/drift_power_pools.parquet   # no model

1. The model answers every text of the validation and test splits and of ``data/sample/drifted.csv``
   once. Those answers (``pool``, ``text``, ``true_label``, ``predicted``, ``score``, ``correct``) are
   written to ``--pools-out`` (default: beside ``--output``) so the simulation reruns without the
   model (``--pools``).
2. Pools: held-out H = val + test (the redesigned monitor's reference, and stable traffic S = H), the
   test split alone (the old monitor's reference), drifted D = the drifted texts, relabelled R = the
   held-out answers with the true label moved to another class, so every answer is wrong and its
   confidence unchanged (concept shift that confidence cannot see).
3. Windows of n labelled answers resampled (with replacement) from mixtures whose expected accuracy is
   ``acc(S) - d``: S and D, or, for drops larger than D alone gives, D and R (S and R when D is no worse
   than S). Each window is tested against a bootstrap resample of its reference, so the reference's own
   sampling error is in the rates. Stable windows (d = 0) give the false-alarm rate.
   - before: the two-proportion z-test of accuracy and the bootstrap macro-F1 test, each at
     ``false_alarm_rate / 7`` with the ``min_*_drop`` gates, against the test split;
   - after: the accuracy CUSUM, the accuracy estimated from confidence (CBPE) and the macro-F1 test at
     their weighted shares of ``false_alarm_rate`` (``monitoring.test_weights``), against H. The five
     data signals are not simulated; they only take their share of the budget.
4. CBPE's accuracy without labels: windows from D (and S) alone, the calibrator fitted on all of H;
   error of the estimated accuracy against the window's realised accuracy and coverage of its interval.

"combined" is the decision that retrains: accuracy or macro-F1 before; accuracy, the estimate from
confidence or macro-F1 after (an estimated drop retrains once there are labels; these windows have
them). ``--source relabelled`` makes the drops from relabelled answers alone, which confidence cannot
see: the accuracy CUSUM's own power. The macro-F1 tests use 1,000 bootstrap resamples
(``--bootstrap-samples``, as ``monitoring.bootstrap_samples``: fewer could not reach the after level of
0.002), and a window whose observed macro-F1 drop is below the gate is not bootstrapped at all: the
test could not flag it whatever its p-value.

Writes ``benchmarks/results/drift_power.json``, ``drift_power.png`` and ``drift_power_pools.parquet``,
and logs the JSON, the plot and the headline numbers to MLflow (experiment ``benchmarks``, run
``drift_power``) unless ``--no-mlflow``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from statsmodels.stats.proportion import proportion_confint
from tqdm.auto import tqdm

from evaluation.drift import (
    DATA_SIGNALS,
    ESTIMATED_ACCURACY,
    PREDICTED,
    SCORE,
    TEXT,
    TRUE_LABEL,
    accuracy_drop_decision,
    accuracy_drop_test,
    answers_frame,
    correctness,
    cusum_design,
    held_out_answers,
    held_out_splits,
    macro_f1_drop_test,
    macro_f1_from_codes,
)
from evaluation.performance import (
    ConfidenceCalibrator,
    SequentialDesign,
    budget_levels,
    estimate_accuracy,
    estimated_accuracy_drop_test,
)
from tuneloop.config import DataParams, MonitoringParams, load_params
from tuneloop.io import read_table, write_json
from tuneloop.progress import interactive

log = logging.getLogger("benchmarks.drift_power")
REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"

DROPS = (0.0, 0.02, 0.05, 0.10)
LABELS_PER_WINDOW = (100, 300, 600, 1200)
CBPE_SIZES = (100, 300, 500)
# The old monitor split false_alarm_rate evenly over its seven tests (5 data signals, accuracy, macro-F1).
BEFORE_TESTS = 7
AFTER_RUNNING = ("accuracy", ESTIMATED_ACCURACY, "macro_f1", *DATA_SIGNALS)
BOOTSTRAP_SAMPLES = 1000
TESTS = {
    "before": ("accuracy", "macro_f1", "combined"),
    "after": ("accuracy", ESTIMATED_ACCURACY, "macro_f1", "combined"),
}
POOL_COLUMNS = ("pool", "text", "true_label", "predicted", "score", "correct")
# The targets of the redesign: after, combined decision.
TARGET_DROP, TARGET_LABELS, TARGET_DETECTION = 0.05, 600, 0.80
TARGET_FALSE_ALARMS = 0.01
TARGET_CBPE_MAE = 0.02
TARGET_CBPE_SIZE = 500


# --- pools ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    """Answers as arrays: integer codes of the true and predicted labels, and top-1 confidence."""

    truth: np.ndarray
    predicted: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.truth)

    @property
    def correct(self) -> np.ndarray:
        return self.truth == self.predicted

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self) else float("nan")

    def take(self, rows: np.ndarray) -> Pool:
        return Pool(self.truth[rows], self.predicted[rows], self.score[rows])

    def resample(self, rng: np.random.Generator, size: int | None = None) -> Pool:
        """Rows drawn with replacement (a bootstrap resample when ``size`` is the pool's own)."""
        return self.take(rng.integers(0, len(self), len(self) if size is None else size))


@dataclass(frozen=True)
class Pools:
    """H (all held-out answers: the new reference), S = H (stable traffic), the test split alone (the old
    reference), D and R.

    Stable traffic is drawn from all held-out answers, the best sample of unchanged traffic there is:
    drawn from the test split alone it would share the old reference's own luck (and give the old
    monitor a head start against a reference it resamples), and the val and test accuracies differ by
    chance (0.94 and 0.96 on the sample).
    """

    held_out: Pool
    stable: Pool
    test: Pool
    drifted: Pool
    relabelled: Pool
    labels: tuple[str, ...]

    @property
    def before_reference(self) -> Pool:
        """The old monitor compared a window with the test split alone."""
        return self.test


def relabel(truth: np.ndarray, predicted: np.ndarray, n_labels: int) -> np.ndarray:
    """Each true label moved to the next class (cyclically) that is neither it nor the model's answer.

    Every answer becomes wrong. With two classes a wrong answer has no such class and keeps its label
    (it is wrong already).
    """
    moved = (truth + 1) % n_labels
    clash = moved == predicted
    moved[clash] = (truth[clash] + 2) % n_labels if n_labels > 2 else truth[clash]
    return moved


def build_pools(answers: pd.DataFrame) -> Pools:
    """Pools from the answers (``pool``: val, test or drifted; ``true_label``, ``predicted``, ``score``)."""
    labels = tuple(sorted(set(answers["true_label"].astype(str)) | set(answers["predicted"].astype(str))))
    codes = {label: index for index, label in enumerate(labels)}

    def pool(*names: str) -> Pool:
        part = answers[answers["pool"].isin(names)]
        return Pool(
            part["true_label"].astype(str).map(codes).to_numpy(dtype=np.int64),
            part["predicted"].astype(str).map(codes).to_numpy(dtype=np.int64),
            part["score"].to_numpy(dtype=float),
        )

    held_out, test, drifted = pool("val", "test"), pool("test"), pool("drifted")
    for name, part in (("test", test), ("drifted", drifted)):
        if not len(part):
            raise ValueError(f"the answers have no {name!r} rows")
    relabelled = Pool(
        relabel(held_out.truth, held_out.predicted, len(labels)), held_out.predicted, held_out.score
    )
    return Pools(held_out, held_out, test, drifted, relabelled, labels)


# --- windows -------------------------------------------------------------------------------------


def mixture(pools: Pools, drop: float, source: str = "drifted") -> dict[str, float]:
    """Chance that a window's row comes from S, D or R, so that its expected accuracy is acc(S) - drop.

    S and D while D alone is bad enough; beyond that, D and R (every R answer is wrong); S and R when
    D is no worse than S. ``source="relabelled"``: S and R only, a drop in which only the labels'
    meaning changed (confidence stays as it was).
    """
    stable, drifted = pools.stable.accuracy, pools.drifted.accuracy
    target = stable - drop
    if target < 0:
        raise ValueError(f"a drop of {drop} is more than the stable accuracy {stable:.3f}")
    if source == "relabelled":
        return {"stable": target / stable, "drifted": 0.0, "relabelled": 1 - target / stable}
    gap = stable - drifted
    if gap > 0 and drop <= gap:
        share = drop / gap
        return {"stable": 1 - share, "drifted": share, "relabelled": 0.0}
    if gap > 0:
        return {"stable": 0.0, "drifted": target / drifted, "relabelled": 1 - target / drifted}
    return {"stable": target / stable, "drifted": 0.0, "relabelled": 1 - target / stable}


def mixture_window(pools: Pools, shares: Mapping[str, float], size: int, rng: np.random.Generator) -> Pool:
    """``size`` answers, each drawn with replacement from S, D or R with chances ``shares``."""
    names = ("stable", "drifted", "relabelled")
    source = rng.choice(3, size=size, p=[shares[name] for name in names])
    truth = np.empty(size, dtype=np.int64)
    predicted = np.empty(size, dtype=np.int64)
    score = np.empty(size)
    for index, name in enumerate(names):
        at = np.flatnonzero(source == index)
        if not len(at):
            continue
        drawn = getattr(pools, name).resample(rng, len(at))
        truth[at], predicted[at], score[at] = drawn.truth, drawn.predicted, drawn.score
    return Pool(truth, predicted, score)


# --- tests ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What the tests are tuned to: the false-alarm budget, its split, the gates and the CUSUM's step."""

    false_alarm_rate: float
    min_accuracy_drop: float
    min_macro_f1_drop: float
    weights: Mapping[str, float]
    cusum_step: int
    bootstrap_samples: int = BOOTSTRAP_SAMPLES

    @classmethod
    def from_params(cls, params: MonitoringParams, bootstrap_samples: int = BOOTSTRAP_SAMPLES) -> Settings:
        configured = params.test_weights
        weights = {
            "accuracy": configured.accuracy,
            ESTIMATED_ACCURACY: configured.estimated_accuracy,
            "macro_f1": configured.macro_f1,
            **dict.fromkeys(DATA_SIGNALS, configured.each_data_signal),
        }
        return cls(
            false_alarm_rate=params.false_alarm_rate,
            min_accuracy_drop=params.min_accuracy_drop,
            min_macro_f1_drop=params.min_macro_f1_drop,
            weights=weights,
            cusum_step=params.cusum_step_labels,
            bootstrap_samples=bootstrap_samples,
        )

    @property
    def before_alpha(self) -> float:
        return self.false_alarm_rate / BEFORE_TESTS

    @property
    def levels(self) -> dict[str, float]:
        return budget_levels(self.weights, AFTER_RUNNING, self.false_alarm_rate)

    def design(self, reference: Pool, n_labels: int) -> SequentialDesign:
        """The CUSUM's design, at half the accuracy level (``accuracy_drop_decision`` splits it)."""
        return cusum_design(
            reference.correct, n_labels, self.min_accuracy_drop, self.cusum_step, self.levels["accuracy"] / 2
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "false_alarm_rate": self.false_alarm_rate,
            "min_accuracy_drop": self.min_accuracy_drop,
            "min_macro_f1_drop": self.min_macro_f1_drop,
            "before_alpha_per_test": self.before_alpha,
            "weights": dict(self.weights),
            "after_levels": self.levels,
            "cusum_step_labels": self.cusum_step,
            "macro_f1_bootstrap_samples": self.bootstrap_samples,
        }


def answer_frame(pool: Pool, labels: Sequence[str]) -> pd.DataFrame:
    names = np.asarray(labels, dtype=object)
    return pd.DataFrame({TRUE_LABEL: names[pool.truth], PREDICTED: names[pool.predicted]})


def macro_f1_flag(
    reference: Pool, window: Pool, labels: Sequence[str], level: float, settings: Settings, seed: int
) -> bool:
    """``macro_f1_drop_test`` at ``level`` with the ``min_macro_f1_drop`` gate, as the monitor decides.

    The observed drop is computed first: below the gate the test cannot flag, so the bootstrap is skipped.
    """
    n_labels = len(labels)
    drop = macro_f1_from_codes(reference.truth, reference.predicted, n_labels) - macro_f1_from_codes(
        window.truth, window.predicted, n_labels
    )
    if drop < settings.min_macro_f1_drop:
        return False
    test = macro_f1_drop_test(
        answer_frame(reference, labels),
        answer_frame(window, labels),
        labels,
        settings.bootstrap_samples,
        seed,
    )
    return bool(test["p_value"] < level and test["drop"] >= settings.min_macro_f1_drop)


def window_flags(
    pools: Pools, window: Pool, settings: Settings, rng: np.random.Generator
) -> dict[str, dict[str, bool]]:
    """Each test's flag on one window, before and after, against fresh bootstrap references."""
    labels = pools.labels
    before_reference = pools.before_reference.resample(rng)
    after_reference = pools.held_out.resample(rng)
    accuracy = accuracy_drop_test(before_reference.correct, window.correct)
    before = {
        "accuracy": bool(
            accuracy["p_value"] < settings.before_alpha and accuracy["drop"] >= settings.min_accuracy_drop
        ),
        "macro_f1": macro_f1_flag(
            before_reference, window, labels, settings.before_alpha, settings, int(rng.integers(2**31))
        ),
    }
    levels = settings.levels
    calibrator = ConfidenceCalibrator(after_reference.score, after_reference.correct)
    after = {
        "accuracy": bool(
            accuracy_drop_decision(
                after_reference.correct,
                window.correct,
                settings.min_accuracy_drop,
                settings.cusum_step,
                levels["accuracy"],
            )["drifted"]
        ),
        ESTIMATED_ACCURACY: bool(
            estimated_accuracy_drop_test(
                calibrator,
                after_reference.score,
                window.score,
                settings.min_accuracy_drop,
                levels[ESTIMATED_ACCURACY],
            )["drifted"]
        ),
        "macro_f1": macro_f1_flag(
            after_reference, window, labels, levels["macro_f1"], settings, int(rng.integers(2**31))
        ),
    }
    return {
        "before": {**before, "combined": any(before.values())},
        # The retraining decision: any of the three quality tests (an estimated drop retrains once
        # labels are there, and these windows are labelled).
        "after": {**after, "combined": any(after.values())},
    }


def rate(count: int, windows: int) -> dict[str, float | int]:
    """Share of flagged windows with its 95% Wilson interval."""
    low, high = proportion_confint(count, windows, alpha=0.05, method="wilson")
    return {"rate": count / windows, "low": float(low), "high": float(high), "windows": windows}


def drop_key(drop: float) -> str:
    return f"{drop:g}"


def run_cells(
    pools: Pools,
    settings: Settings,
    drops: Sequence[float] = DROPS,
    sizes: Sequence[int] = LABELS_PER_WINDOW,
    windows: int = 200,
    stable_windows: int = 1000,
    seed: int = 0,
    source: str = "drifted",
) -> dict[str, Any]:
    """Detection rate of every test per (drop, labels per window) cell; at drop 0 the false-alarm rate.

    ``source``: what makes the drop, the drifted batch (with R beyond it) or relabelled answers alone.

    Returns ``{"power": {side: {test: {drop: {labels: rate}}}}, "mixtures": {drop: shares}}`` with
    string keys (``drop_key``, ``str(labels)``); each rate entry also has the cell's mean realised drop.
    """
    power: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
        side: {test: {} for test in tests} for side, tests in TESTS.items()
    }
    mixtures: dict[str, dict[str, float]] = {}
    cells = [(drop, size) for drop in drops for size in sizes]
    streams = np.random.SeedSequence(seed).spawn(len(cells))
    for (drop, size), stream in zip(cells, streams, strict=True):
        rng = np.random.default_rng(stream)
        shares = mixtures.setdefault(drop_key(drop), mixture(pools, drop, source))
        count = stable_windows if drop == 0 else windows
        flagged = {side: dict.fromkeys(tests, 0) for side, tests in TESTS.items()}
        drops_seen = np.empty(count)
        started = time.perf_counter()
        for index in tqdm(
            range(count), desc=f"drop {drop:g}, {size} labels", unit="window", disable=not interactive()
        ):
            window = mixture_window(pools, shares, size, rng)
            drops_seen[index] = pools.stable.accuracy - window.accuracy
            for side, flags in window_flags(pools, window, settings, rng).items():
                for test, flag in flags.items():
                    flagged[side][test] += flag
        realised = float(drops_seen.mean())
        for side, tests in TESTS.items():
            for test in tests:
                entry = {**rate(flagged[side][test], count), "realised_drop": realised}
                power[side][test].setdefault(drop_key(drop), {})[str(size)] = entry
        log.info(
            "drop %-4g %4d labels: combined before %.3f, after %.3f (%d windows, realised drop %.3f, %.1fs)",
            drop,
            size,
            flagged["before"]["combined"] / count,
            flagged["after"]["combined"] / count,
            count,
            realised,
            time.perf_counter() - started,
        )
    return {"power": power, "mixtures": mixtures}


# --- CBPE without labels -------------------------------------------------------------------------


def cbpe_accuracy(
    pools: Pools, sizes: Sequence[int] = CBPE_SIZES, windows: int = 200, seed: int = 0
) -> dict[str, Any]:
    """Accuracy estimated from confidence against realised accuracy, on windows from D and from S.

    The calibrator is fitted on all of H. S is part of H, so its numbers are in-sample (optimistic);
    D is what the estimate is for.
    """
    calibrator = ConfidenceCalibrator(pools.held_out.score, pools.held_out.correct)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    result: dict[str, Any] = {
        "calibrated_on": "all of H (val + test)",
        "windows": windows,
        "whole_pool": {},
    }
    for name in ("drifted", "stable"):
        pool: Pool = getattr(pools, name)
        whole = estimate_accuracy(calibrator.chance_correct(pool.score))
        result["whole_pool"][name] = {
            "n": len(pool),
            "estimate": whole["estimate"],
            "low": whole["low"],
            "high": whole["high"],
            "realised": pool.accuracy,
            "error": whole["estimate"] - pool.accuracy,
        }
        per_size: dict[str, Any] = {}
        for size in sizes:
            errors = np.empty(windows)
            covered = np.empty(windows, dtype=bool)
            for index in range(windows):
                window = pool.resample(rng, size)
                estimate = estimate_accuracy(calibrator.chance_correct(window.score))
                realised = window.accuracy
                errors[index] = estimate["estimate"] - realised
                covered[index] = estimate["low"] <= realised <= estimate["high"]
            per_size[str(size)] = {
                "mae": float(np.abs(errors).mean()),
                "bias": float(errors.mean()),
                "coverage": float(covered.mean()),
                "windows": windows,
            }
            log.info(
                "CBPE on %s windows of %d: MAE %.4f, bias %+.4f, coverage %.3f",
                name,
                size,
                per_size[str(size)]["mae"],
                per_size[str(size)]["bias"],
                per_size[str(size)]["coverage"],
            )
        result[name] = per_size
    return result


# --- report --------------------------------------------------------------------------------------


def _cell(power: Mapping[str, Any], side: str, test: str, drop: float, size: int) -> dict[str, Any] | None:
    return power.get(side, {}).get(test, {}).get(drop_key(drop), {}).get(str(size))


def headline(power: Mapping[str, Any], cbpe: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The numbers a reader looks for first, and whether the redesign's targets are met (None: not run)."""
    false_alarms = {
        side: {size: entry["rate"] for size, entry in power[side]["combined"].get(drop_key(0.0), {}).items()}
        for side in TESTS
    }
    detection = {
        side: (
            entry["rate"] if (entry := _cell(power, side, "combined", TARGET_DROP, TARGET_LABELS)) else None
        )
        for side in TESTS
    }
    cbpe_drifted = cbpe.get("drifted", {}).get(str(TARGET_CBPE_SIZE))
    numbers = {
        "false_alarm_rate_combined": false_alarms,
        "detection_5pt_drop_at_600_labels": detection,
        "cbpe_drifted_500": (
            None if cbpe_drifted is None else {key: cbpe_drifted[key] for key in ("mae", "bias", "coverage")}
        ),
    }
    after_alarms = false_alarms["after"]
    targets = {
        "after_detects_5pt_drop_at_600_labels_at_least_0.80": (
            None if detection["after"] is None else detection["after"] >= TARGET_DETECTION
        ),
        "after_false_alarms_at_most_0.01_at_every_size": (
            None if not after_alarms else all(value <= TARGET_FALSE_ALARMS for value in after_alarms.values())
        ),
        "cbpe_mae_at_most_0.02_on_drifted_500": (
            None if cbpe_drifted is None else cbpe_drifted["mae"] <= TARGET_CBPE_MAE
        ),
    }
    return numbers, targets


def pool_summary(pools: Pools) -> dict[str, Any]:
    return {
        "labels": len(pools.labels),
        "pool_sizes": {
            "held_out": len(pools.held_out),
            "stable": len(pools.stable),
            "test": len(pools.test),
            "drifted": len(pools.drifted),
            "relabelled": len(pools.relabelled),
        },
        "accuracy": {
            "held_out": pools.held_out.accuracy,
            "stable": pools.stable.accuracy,
            "test": pools.test.accuracy,
            "drifted": pools.drifted.accuracy,
            "relabelled": pools.relabelled.accuracy,
        },
        # acc(test) - acc(S): the old reference sees this much "drop" on stable windows before any drift.
        "test_minus_stable_accuracy": pools.test.accuracy - pools.stable.accuracy,
    }


def build_report(
    pools: Pools,
    settings: Settings,
    cells: Mapping[str, Any],
    cbpe: Mapping[str, Any],
    inputs: Mapping[str, Any],
    run: Mapping[str, Any],
    seconds: Mapping[str, float],
) -> dict[str, Any]:
    numbers, targets = headline(cells["power"], cbpe)
    designs = {n: settings.design(pools.held_out, n) for n in run["labels_per_window"]}
    return {
        "what": "power and false alarms of the concept-drift tests before/after the redesign, "
        "by resampling the model's real answers",
        "inputs": {**inputs, **pool_summary(pools)},
        "settings": {
            **settings.as_dict(),
            "not_simulated": list(DATA_SIGNALS),
            "cusum_designs_at_full_held_out": {
                str(n): {
                    "reference_accuracy": design.reference_accuracy,
                    "drifted_accuracy": design.drifted_accuracy,
                    "threshold": design.threshold,
                    "horizon": design.horizon,
                    "alpha": design.alpha,
                }
                for n, design in designs.items()
            },
            **run,
        },
        "mixtures": cells["mixtures"],
        "power": cells["power"],
        "cbpe": cbpe,
        "headline": numbers,
        "targets": {
            "after_detects_5pt_drop_at_600_labels_at_least_0.80": "after, combined decision",
            "after_false_alarms_at_most_0.01_at_every_size": "after, combined decision, stable windows",
            "cbpe_mae_at_most_0.02_on_drifted_500": "CBPE, windows of 500 from the drifted pool",
        },
        "targets_met": targets,
        "seconds": {name: round(value, 1) for name, value in seconds.items()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def plot_rates(axis: Any, cells: Mapping[str, Any] | None, style: str, **line: Any) -> None:
    """One line of rates over labels per window (``cells``: labels -> entry with ``rate``); none if empty."""
    if not cells:
        return
    sizes = sorted(cells, key=int)
    axis.plot(
        [int(size) for size in sizes], [cells[size]["rate"] for size in sizes], style, marker="o", **line
    )


def plot_report(report: Mapping[str, Any], path: Path) -> Path:
    """Detection rate against labels per window: a panel per test, a colour per drop, before dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    power = report["power"]
    figure, axes = plt.subplots(2, 3, figsize=(15, 9), constrained_layout=True)
    panels = [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), (ESTIMATED_ACCURACY, "CBPE (after only)")]
    panels.append(("combined", "combined: the retraining decision"))
    drops = [key for key in next(iter(power["after"].values())) if float(key) > 0]
    colours = dict(
        zip(drops, plt.get_cmap("viridis")(np.linspace(0.1, 0.85, max(len(drops), 1))), strict=False)
    )
    for axis, (test, title) in zip(axes.flat, panels, strict=False):
        for side, style in (("before", "--"), ("after", "-")):
            for drop in drops:
                cells = power[side].get(test, {}).get(drop)
                plot_rates(axis, cells, style, color=colours[drop], label=f"{side}, drop {float(drop):.0%}")
        if test == "combined":
            axis.axhline(TARGET_DETECTION, color="grey", linewidth=0.8, linestyle=":")
        axis.set(title=title, xlabel="labels per window", ylabel="detection rate", ylim=(-0.02, 1.02))
        axis.set_xscale("log")
        axis.legend(fontsize=7)
    alarms = axes.flat[4]
    for side, style in (("before", "--"), ("after", "-")):
        for test in TESTS[side]:
            plot_rates(alarms, power[side][test].get(drop_key(0.0)), style, label=f"{side}: {test}")
    alarms.axhline(TARGET_FALSE_ALARMS, color="grey", linewidth=0.8, linestyle=":")
    alarms.set(title="false alarms (stable windows)", xlabel="labels per window", ylabel="false-alarm rate")
    alarms.set_xscale("log")
    alarms.legend(fontsize=7)
    cbpe_axis = axes.flat[5]
    for name in ("drifted", "stable"):
        cells = report["cbpe"].get(name, {})
        sizes = sorted(cells, key=int)
        cbpe_axis.plot(
            [int(s) for s in sizes], [cells[s]["mae"] for s in sizes], marker="o", label=f"MAE, {name}"
        )
        cbpe_axis.plot(
            [int(s) for s in sizes], [cells[s]["bias"] for s in sizes], ":", marker="x", label=f"bias, {name}"
        )
    cbpe_axis.axhline(TARGET_CBPE_MAE, color="grey", linewidth=0.8, linestyle=":")
    cbpe_axis.axhline(0, color="black", linewidth=0.5)
    cbpe_axis.set(title="CBPE: estimated - realised accuracy", xlabel="rows per window", ylabel="error")
    cbpe_axis.legend(fontsize=7)
    figure.suptitle("Concept-drift tests: before (dashed) and after (solid) the redesign")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# --- the model's answers -------------------------------------------------------------------------


def read_drifted(path: Path, data: DataParams) -> pd.DataFrame:
    """``text`` and ``label`` of the drifted file, whose columns may use params.yaml's names (``intent``)."""
    frame = read_table(path)
    if "label" not in frame.columns:
        frame = frame.rename(columns={data.text_column: "text", data.label_column: "label"})
    missing = {"text", "label"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path} has no {sorted(missing)} column (nor {data.label_column!r})")
    return frame[["text", "label"]]


def predict_answers(adapter: Path, prepared_dir: Path, drifted: Path, data: DataParams) -> pd.DataFrame:
    """Every text of val, test and the drifted file through the model, once."""
    from monitoring.monitor import adapter_predictor

    predictor = adapter_predictor(adapter)
    started = time.perf_counter()
    held_out = held_out_answers(predictor, held_out_splits(prepared_dir, ("val", "test")))
    drifted_texts = read_drifted(drifted, data)
    drifted_answers = answers_frame(drifted_texts["text"], drifted_texts["label"], predictor)
    answers = pd.concat([held_out, drifted_answers.assign(split="drifted")], ignore_index=True)
    log.info("predicted %d texts in %.1fs", len(answers), time.perf_counter() - started)
    return pd.DataFrame(
        {
            "pool": answers["split"],
            "text": answers[TEXT],
            "true_label": answers[TRUE_LABEL],
            "predicted": answers[PREDICTED],
            "score": answers[SCORE].astype(float),
            "correct": correctness(answers),
        }
    )


def log_to_mlflow(report: Mapping[str, Any], files: Sequence[Path]) -> str:
    """The JSON, the plot and the headline numbers in the ``benchmarks`` experiment."""
    import mlflow

    from tuneloop.config import Environment
    from tuneloop.tracking import flatten, use_experiment

    use_experiment(Environment.from_env().model_copy(update={"experiment_name": "benchmarks"}))
    with mlflow.start_run(run_name="drift_power") as run:
        settings = {key: value for key, value in report["settings"].items() if not isinstance(value, dict)}
        mlflow.log_params({**settings, **flatten("", {"levels": report["settings"]["after_levels"]})})
        metrics = flatten("", report["headline"])
        mlflow.log_metrics({key: float(value) for key, value in metrics.items() if value is not None})
        for path in files:
            mlflow.log_artifact(str(path))
        return run.info.run_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter", type=Path, help="a trained adapter folder (models/adapter)")
    parser.add_argument("--prepared-dir", type=Path, help="folder with val.parquet and test.parquet")
    parser.add_argument("--drifted", type=Path, default=REPO_ROOT / "data/sample/drifted.csv")
    parser.add_argument("--pools", type=Path, help="answers written by an earlier run: skip the model")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--windows", type=int, default=200, help="windows per cell with a drop")
    parser.add_argument("--stable-windows", type=int, default=1000, help="windows per stable cell")
    parser.add_argument("--drops", type=float, nargs="+", default=list(DROPS))
    parser.add_argument(
        "--source",
        choices=("drifted", "relabelled"),
        default="drifted",
        help="what makes the drop: the drifted batch, or relabelled held-out answers alone",
    )
    parser.add_argument("--labels", type=int, nargs="+", default=list(LABELS_PER_WINDOW))
    parser.add_argument("--cbpe-sizes", type=int, nargs="+", default=list(CBPE_SIZES))
    parser.add_argument("--bootstrap-samples", type=int, default=BOOTSTRAP_SAMPLES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "drift_power.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "drift_power.png")
    parser.add_argument("--pools-out", type=Path, help="default: <output stem>_pools.parquet beside --output")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args(argv)
    if args.pools is None and (args.adapter is None or args.prepared_dir is None):
        parser.error("give --adapter and --prepared-dir, or --pools")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    params = load_params(args.params)
    pools_out = args.pools_out or args.output.with_name(f"{args.output.stem}_pools.parquet")

    if args.pools is not None:
        answers = pd.read_parquet(args.pools)
        inputs: dict[str, Any] = {"pools": str(args.pools), "adapter": None}
    else:
        answers = predict_answers(args.adapter, args.prepared_dir, args.drifted, params.data)
        inputs = {
            "adapter": str(args.adapter),
            "prepared_dir": str(args.prepared_dir),
            "drifted": str(args.drifted),
        }
    predicted_at = time.perf_counter()
    if args.pools is None or pools_out.resolve() != args.pools.resolve():
        pools_out.parent.mkdir(parents=True, exist_ok=True)
        answers[list(POOL_COLUMNS)].to_parquet(pools_out, index=False)
    inputs["pools_out"] = str(pools_out)

    pools = build_pools(answers)
    settings = Settings.from_params(params.monitoring, args.bootstrap_samples)
    log.info(
        "pools: H %d (acc %.3f), S %d (acc %.3f), D %d (acc %.3f)",
        len(pools.held_out),
        pools.held_out.accuracy,
        len(pools.stable),
        pools.stable.accuracy,
        len(pools.drifted),
        pools.drifted.accuracy,
    )
    cells = run_cells(
        pools, settings, args.drops, args.labels, args.windows, args.stable_windows, args.seed, args.source
    )
    simulated_at = time.perf_counter()
    cbpe = cbpe_accuracy(pools, args.cbpe_sizes, args.windows, args.seed)
    run = {
        "windows_per_cell": args.windows,
        "stable_windows_per_cell": args.stable_windows,
        "drops": list(args.drops),
        "source": args.source,
        "labels_per_window": list(args.labels),
        "cbpe_sizes": list(args.cbpe_sizes),
        "seed": args.seed,
    }
    seconds = {
        "predict": predicted_at - started,
        "power": simulated_at - predicted_at,
        "cbpe": time.perf_counter() - simulated_at,
        "total": time.perf_counter() - started,
    }
    report = build_report(pools, settings, cells, cbpe, inputs, run, seconds)
    write_json(args.output, report)
    plot_report(report, args.plot)
    if not args.no_mlflow:
        report["mlflow_run_id"] = log_to_mlflow(report, [args.output, args.plot])
        write_json(args.output, report)
    numbers = report["headline"]
    log.info(
        "5-point drop at 600 labels: before %s, after %s; false alarms after %s; targets met %s -> %s",
        numbers["detection_5pt_drop_at_600_labels"]["before"],
        numbers["detection_5pt_drop_at_600_labels"]["after"],
        numbers["false_alarm_rate_combined"]["after"],
        report["targets_met"],
        args.output,
    )


if __name__ == "__main__":
    main()
