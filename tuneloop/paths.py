"""Where each stage reads and writes (relative to the project folder), and where tuneloop keeps its own
state (under ``TUNELOOP_HOME``).

``dvc.yaml`` names the same project paths in its stage commands, deps and outs; a test
(``tests/unit/test_dvc_yaml.py``) fails when the two disagree, so a path changes here and there
together or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The stages' files, relative to the project folder.
PREPARED_DIR = Path("data/prepared")
SPLITS = ("train", "val", "test")
VALIDATION_REPORT_DIR = Path("reports/validation")
VALIDATION_SUMMARY = VALIDATION_REPORT_DIR / "summary.json"
ADAPTER_DIR = Path("models/adapter")
METRICS_DIR = Path("metrics")
TRAIN_METRICS = METRICS_DIR / "train.json"
EVALUATE_METRICS = METRICS_DIR / "evaluate.json"
GATES_FILE = METRICS_DIR / "gates.json"
PLOTS_DIR = Path("plots")
TRAINING_HISTORY = PLOTS_DIR / "training_history.csv"
REPORTS_DIR = Path("reports")
# A registered classifier's answers on every held-out split, in its training run's MLflow artifacts:
# the reference the drift job judges that version against (registry.register.record_reference).
HELD_OUT_ARTIFACT = "reference/held_out.parquet"

# The project's own sample data (in git), and its drifted batch for the drift scenarios.
SAMPLE_DATA = Path("data/sample/intents.csv")
# Its frozen test file (`tuneloop.datastore.sample_test_file`): texts no model here trained on.
SAMPLE_TEST_DATA = Path("data/sample/intents-test.csv")
DRIFTED_SAMPLE = Path("data/sample/drifted.csv")
# `task: generation`: customer messages -> the support tool's JSON (data/sample/SUPPORT_PAIRS_CARD.md).
SAMPLE_PAIRS = Path("data/sample/support-pairs.csv")


@dataclass(frozen=True)
class HomePaths:
    """tuneloop's own state under ``TUNELOOP_HOME`` (default ``<project>/.tuneloop``)."""

    home_dir: Path

    @property
    def mlflow_db(self) -> Path:
        return self.home_dir / "mlflow.db"

    @property
    def artifact_root(self) -> Path:
        return self.home_dir / "mlartifacts"

    @property
    def dvc_remote(self) -> Path:
        return self.home_dir / "dvc-remote"

    @property
    def inference_log_db(self) -> Path:
        return self.home_dir / "inference_log.db"

    @property
    def api_keys(self) -> Path:
        return self.home_dir / "api_keys.json"

    @property
    def registry_audit(self) -> Path:
        return self.home_dir / "registry_audit.jsonl"

    @property
    def monitoring_dir(self) -> Path:
        return self.home_dir / "monitoring"

    @property
    def drift_summary(self) -> Path:
        """The drift job's latest summary: written by the job, read by the gateway's /metrics."""
        return self.monitoring_dir / "latest.json"

    @property
    def monitor_state(self) -> Path:
        return self.monitoring_dir / "state.json"

    @property
    def reference_cache(self) -> Path:
        return self.monitoring_dir / "reference"

    def serving_dir(self, environment: str) -> Path:
        return self.home_dir / "serving" / environment
