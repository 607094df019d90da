"""Model quality on live traffic: a sequential accuracy test, and accuracy estimated before labels arrive.

Pure functions over numpy arrays; :mod:`evaluation.drift` puts them into a window's summary and
``benchmarks/drift_power.py`` measures their power.

- :func:`accuracy_cusum`: Page's CUSUM (Page 1954) on per-example correctness, the log-likelihood
  ratio of "accuracy = reference - min drop" against "accuracy = reference". CUSUM restarts its
  evidence whenever it falls below zero, so a drop that starts after a long good stretch is caught as
  fast as one that starts at once; it is the optimal detector of a change at an unknown time (Lorden
  1971; Moustakides 1986). A plain SPRT (Wald 1945) would first have to climb back out of all the
  evidence of the good stretch. Its threshold is set by simulating the statistic under the reference
  accuracy (:func:`cusum_threshold`): unchanged quality crosses it within ``horizon`` labels with
  probability at most ``alpha``.
- :class:`ConfidenceCalibrator` and :func:`estimate_accuracy`: confidence-based performance estimation
  (CBPE, as in NannyML: https://nannyml.readthedocs.io/en/stable/how_it_works/performance_estimation.html).
  The chance that an answer is right is learned from held-out data as a monotone function of the
  model's top-1 confidence (isotonic regression, the calibrator NannyML uses); the expected accuracy of
  a window is the mean of those chances, with the variance of a sum of independent Bernoulli trials
  for its interval. It assumes that the relation of confidence to correctness did not change (no
  concept shift): it sees inputs the model is unsure of, not labels that changed meaning. NannyML
  itself is not used: 0.13.1 pulls FLAML, LightGBM, kaleido, gcsfs, s3fs and a usage-telemetry client,
  and pins plotly < 6, for about forty lines of arithmetic here.
- :func:`budget_levels`: the false-alarm budget split by weights (weighted Bonferroni; Holm 1979, §5),
  so that the tests that matter most get the larger share instead of an even split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy.stats import norm


def correctness_log_ratios(
    correct: np.ndarray, reference_accuracy: float, drifted_accuracy: float
) -> np.ndarray:
    """Per-example log-likelihood ratio of accuracy ``drifted_accuracy`` against ``reference_accuracy``."""
    right = np.log(drifted_accuracy / reference_accuracy)
    wrong = np.log((1 - drifted_accuracy) / (1 - reference_accuracy))
    return wrong + (right - wrong) * np.asarray(correct, dtype=float)


def cusum_path(log_ratios: np.ndarray) -> np.ndarray:
    """Page's CUSUM: ``S_n = max(0, S_{n-1} + l_n)``, ``S_0 = 0``; one value per example.

    ``S_n`` equals the cumulative sum minus its running minimum (and never less than the sum itself),
    so whole paths, one per row of a 2-D array, come from numpy calls instead of a Python loop.
    """
    cumulative = np.cumsum(log_ratios, axis=-1)
    return cumulative - np.minimum(np.minimum.accumulate(cumulative, axis=-1), 0.0)


def bounded_accuracy(accuracy: float, n_reference: int) -> float:
    """An accuracy kept half an example away from 0 and 1, so that log ratios stay finite."""
    margin = 0.5 / max(n_reference, 1)
    return float(min(max(accuracy, margin), 1 - margin))


@lru_cache(maxsize=256)
def unchanged_maxima(
    reference_accuracy: float,
    drifted_accuracy: float,
    horizon: int,
    n_reference: int,
    paths: int = 4000,
    seed: int = 0,
) -> np.ndarray:
    """Sorted maxima of ``paths`` simulated CUSUM paths of ``horizon`` labels of an unchanged model.

    The reference accuracy is itself measured on ``n_reference`` answers, so the model's true
    accuracy may sit a little below it: each path draws its true accuracy from the Jeffreys
    posterior of the reference, Beta(k + 1/2, n - k + 1/2). A threshold from paths at exactly the
    measured accuracy would let a reference measured on 450 answers raise several times its share
    of false alarms. Deterministic for a seed, and cached: a monitor or a benchmark asks for the same
    few designs again and again.
    """
    rng = np.random.default_rng(seed)
    hits = reference_accuracy * n_reference
    true_accuracy = rng.beta(hits + 0.5, n_reference - hits + 0.5, size=paths)
    maxima = np.empty(paths)
    # In chunks: 4,000 x 1,200 float64 paths would hold 38 MB at once.
    chunk = 500
    for start in range(0, paths, chunk):
        size = min(chunk, paths - start)
        correct = rng.random((size, horizon)) < true_accuracy[start : start + size, None]
        log_ratios = correctness_log_ratios(correct, reference_accuracy, drifted_accuracy)
        maxima[start : start + size] = cusum_path(log_ratios).max(axis=1)
    maxima.sort()
    maxima.flags.writeable = False
    return maxima


def cusum_threshold(
    reference_accuracy: float, drifted_accuracy: float, horizon: int, alpha: float, n_reference: int
) -> float:
    """The CUSUM threshold that unchanged quality crosses within ``horizon`` labels with chance ``alpha``.

    The ``1 - alpha`` quantile of simulated path maxima (:func:`unchanged_maxima`). Simulated, not a
    closed form: the usual bound (Ville's inequality per start point, summed over ``horizon`` start
    points) is several times too cautious for Bernoulli data and would cost half the power. Beyond
    ``horizon`` labels of one version the chance of a false alarm keeps growing slowly.
    """
    maxima = unchanged_maxima(reference_accuracy, drifted_accuracy, horizon, n_reference)
    return float(np.quantile(maxima, 1 - alpha))


@dataclass(frozen=True)
class SequentialDesign:
    """What a CUSUM on correctness is tuned to: the accuracies it tells apart and its threshold."""

    reference_accuracy: float
    drifted_accuracy: float
    threshold: float
    horizon: int
    alpha: float
    n_reference: int

    @classmethod
    def for_reference(
        cls, reference_accuracy: float, n_reference: int, min_drop: float, horizon: int, alpha: float
    ) -> SequentialDesign:
        reference = bounded_accuracy(reference_accuracy, n_reference)
        drifted = bounded_accuracy(reference - min_drop, n_reference)
        threshold = cusum_threshold(reference, drifted, horizon, alpha, n_reference)
        return cls(reference, drifted, threshold, horizon, alpha, n_reference)


def accuracy_cusum(correct: np.ndarray, design: SequentialDesign) -> dict[str, Any]:
    """CUSUM of the correctness of one model version's labelled answers, oldest first.

    ``drifted`` when the statistic reached the threshold at any label; ``alarm_at`` is the first
    label that did (1-based), ``statistic`` the value now. ``p_value`` is the share of simulated
    unchanged ``horizon``-label paths whose maximum reached the observed maximum: the decision does
    not use it (the threshold already spends ``alpha``); it shows a person how close it came.
    """
    correct = np.asarray(correct, dtype=bool)
    maxima = unchanged_maxima(
        design.reference_accuracy, design.drifted_accuracy, design.horizon, design.n_reference
    )
    path = cusum_path(correctness_log_ratios(correct, design.reference_accuracy, design.drifted_accuracy))
    crossed = np.flatnonzero(path >= design.threshold)
    current = float(correct.mean()) if len(correct) else float("nan")
    peak = float(path.max()) if len(path) else 0.0
    exceeding = len(maxima) - int(np.searchsorted(maxima, peak, side="left"))
    return {
        "method": "CUSUM on per-example correctness (Page 1954)",
        "n": int(len(correct)),
        "reference": design.reference_accuracy,
        "current": current,
        "drop": design.reference_accuracy - current,
        "alternative": design.drifted_accuracy,
        "statistic": float(path[-1]) if len(path) else 0.0,
        "max_statistic": peak,
        "p_value": (exceeding + 1) / (len(maxima) + 1),
        "threshold": design.threshold,
        "horizon": design.horizon,
        "alpha": design.alpha,
        "alarm_at": int(crossed[0] + 1) if len(crossed) else None,
        "drifted": bool(len(crossed)),
    }


class ConfidenceCalibrator:
    """Chance that an answer is right, as a monotone function of the model's top-1 confidence.

    Fitted with scikit-learn's isotonic regression on held-out answers the model never trained on.
    """

    def __init__(self, confidence: np.ndarray, correct: np.ndarray) -> None:
        from sklearn.isotonic import IsotonicRegression

        confidence = np.asarray(confidence, dtype=float)
        correct = np.asarray(correct, dtype=float)
        if len(confidence) == 0:
            raise ValueError("a calibrator needs held-out answers; none were given")
        self.n_fitted = len(confidence)
        self.reference_accuracy = float(correct.mean())
        # How far the calibrated level itself may be off: the reference accuracy's sampling variance.
        self.level_variance = self.reference_accuracy * (1 - self.reference_accuracy) / self.n_fitted
        self._isotonic = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(
            confidence, correct
        )

    def chance_correct(self, confidence: np.ndarray) -> np.ndarray:
        return np.asarray(self._isotonic.predict(np.asarray(confidence, dtype=float)), dtype=float)


def estimate_accuracy(
    chances: np.ndarray, confidence_level: float = 0.95, calibration_variance: float = 0.0
) -> dict[str, float]:
    """Expected accuracy of a window from each answer's chance of being right, with an interval.

    The realised accuracy of independent answers is a mean of Bernoulli trials with those chances
    (a Poisson binomial): its variance is ``sum p (1 - p) / n**2``. ``calibration_variance`` adds
    the calibrator's own uncertainty (:attr:`ConfidenceCalibrator.level_variance`); the interval
    still assumes the calibration carries over to the window's inputs, which
    ``benchmarks/drift_power.py`` checks as coverage on the drifted batch.
    """
    chances = np.asarray(chances, dtype=float)
    if len(chances) == 0:
        raise ValueError("no answers to estimate an accuracy from")
    estimate = float(chances.mean())
    spread = float(np.sqrt(np.sum(chances * (1 - chances)) / len(chances) ** 2 + calibration_variance))
    half_width = float(norm.ppf(0.5 + confidence_level / 2) * spread)
    return {
        "estimate": estimate,
        "low": max(0.0, estimate - half_width),
        "high": min(1.0, estimate + half_width),
        "standard_error": spread,
    }


def estimated_accuracy_drop_test(
    calibrator: ConfidenceCalibrator,
    reference_confidence: np.ndarray,
    current_confidence: np.ndarray,
    min_drop: float,
    alpha: float,
) -> dict[str, Any]:
    """Did the accuracy expected from the window's confidences fall below the reference's?

    One-sided two-sample z-test on the calibrated chances (reference: the held-out answers; current:
    the window, no labels needed), significant at ``alpha``. No gate on the size of the estimated
    drop: like a gate on the observed drop, it would miss half the drops of exactly that size, and
    this test only alerts (retraining waits for labels). ``min_drop`` is reported next to it.
    """
    reference = calibrator.chance_correct(reference_confidence)
    current = calibrator.chance_correct(current_confidence)
    drop = float(reference.mean() - current.mean())
    spread = float(np.sqrt(reference.var(ddof=1) / len(reference) + current.var(ddof=1) / len(current)))
    p_value = float(norm.sf(drop / spread)) if spread > 0 else float(drop <= 0)
    window = estimate_accuracy(current, calibration_variance=calibrator.level_variance)
    return {
        "method": "confidence-based performance estimation (CBPE), isotonic calibration, one-sided z-test",
        "reference": float(reference.mean()),
        "current": window["estimate"],
        "current_low": window["low"],
        "current_high": window["high"],
        "drop": drop,
        "p_value": p_value,
        "threshold": alpha,
        "min_drop": min_drop,
        "drifted": bool(p_value < alpha),
    }


def budget_levels(
    weights: Mapping[str, float], running: Sequence[str], false_alarm_rate: float
) -> dict[str, float]:
    """Each running test's share of the false-alarm budget: its weight over the running tests' weights.

    Weighted Bonferroni (Holm 1979, §5): the chance that unchanged traffic raises any flag stays at
    most ``false_alarm_rate``, whatever the weights. A window's decision is "any flag", so passing a
    rejected test's share on to the others (Holm's step-down) would name more signals but never turn
    a quiet window into a drifted one; the weights are where the power is decided.
    """
    missing = [name for name in running if name not in weights]
    if missing:
        raise KeyError(f"monitoring.test_weights has no weight for {missing}")
    total = sum(weights[name] for name in running)
    return {name: false_alarm_rate * weights[name] / total for name in running}
