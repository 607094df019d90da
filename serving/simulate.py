"""Send realistic traffic, with feedback, through a gateway, so a newcomer can watch the loop close.

Scenarios draw labelled utterances from the repo's own data:

- ``stable``: the sample's frozen test texts (``data/sample/intents-test.csv``): the same kind of
  traffic as the training data, but texts no model trained on, as live traffic is (training texts
  would look too easy: too few unseen words, too few errors); half the answers get feedback.
- ``data-drift``: the drifted batch (new products, voice/chat style); no feedback, as when labels
  have not arrived yet, so the drift job can only raise a data-drift alert.
- ``concept-drift``: the drifted batch with feedback on every answer, including the utterances whose
  correct intent changed with the 2026 policy change; quality on feedback drops.
"""

from __future__ import annotations

import random
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pandas as pd
from tqdm.auto import tqdm

from serving.auth import API_KEY_HEADER
from tuneloop.paths import DRIFTED_SAMPLE, SAMPLE_TEST_DATA
from tuneloop.progress import interactive


@dataclass(frozen=True)
class Scenario:
    source: Path
    feedback_share: float


SCENARIOS = {
    "stable": Scenario(SAMPLE_TEST_DATA, 0.5),
    "data-drift": Scenario(DRIFTED_SAMPLE, 0.0),
    "concept-drift": Scenario(DRIFTED_SAMPLE, 1.0),
}


@dataclass
class SimulationResult:
    scenario: str
    requests: int = 0
    texts: int = 0
    answered: int = 0
    feedback_sent: int = 0
    correct_on_feedback: int = 0
    rate_limited: int = 0
    statuses: Counter = field(default_factory=Counter)
    model_versions: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    @property
    def accuracy_on_feedback(self) -> float | None:
        return self.correct_on_feedback / self.feedback_sent if self.feedback_sent else None

    def summary(self) -> str:
        accuracy = self.accuracy_on_feedback
        return (
            f"{self.scenario}: {self.requests} requests ({self.texts} texts), {self.answered} answered, "
            f"statuses {dict(self.statuses)}, versions {dict(self.model_versions)}, "
            f"{self.feedback_sent} feedback, {self.rate_limited} waits on 429"
            + (f", accuracy on feedback {accuracy:.3f}" if accuracy is not None else "")
        )


def scenario_rows(source: Path, text_column: str, label_column: str, count: int, seed: int) -> pd.DataFrame:
    """``count`` labelled rows from ``source`` (drawn with replacement once the file is used up)."""
    frame = pd.read_csv(source)[[text_column, label_column]].set_axis(["text", "label"], axis=1)
    return frame.sample(n=count, replace=count > len(frame), random_state=seed).reset_index(drop=True)


MAX_RATE_LIMIT_WAITS = 5


def _post_politely(client: httpx.Client, path: str, body: dict, result: SimulationResult) -> httpx.Response:
    """POST, and on 429 wait as long as ``Retry-After`` says and send again (a few times at most)."""
    for _ in range(MAX_RATE_LIMIT_WAITS):
        response = client.post(path, json=body)
        if response.status_code != 429:
            return response
        result.rate_limited += 1
        time.sleep(float(response.headers.get("Retry-After", "1")))
    return response


def simulate_traffic(
    gateway_url: str,
    api_key: str,
    rows: pd.DataFrame,
    *,
    scenario: str,
    feedback_share: float,
    batch_size: int = 1,
    rate_per_s: float = 20.0,
    seed: int = 0,
    timeout_s: float = 60.0,
    verify: ssl.SSLContext | bool = True,
) -> SimulationResult:
    """POST ``rows`` to /v1/predict in batches at about ``rate_per_s`` requests/s; send feedback for a share.

    A 429 is waited out as its ``Retry-After`` asks; any other refusal or failure is counted, never
    retried: what the gateway answered is what you see. ``verify``: how an HTTPS gateway's certificate
    is checked (see ``tuneloop.config.Environment.tls_client_context``).
    """
    chooser = random.Random(seed)
    result = SimulationResult(scenario)
    headers = {API_KEY_HEADER: api_key}
    interval = 1.0 / rate_per_s
    batches = [rows.iloc[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    with httpx.Client(base_url=gateway_url, headers=headers, timeout=timeout_s, verify=verify) as client:
        for batch in tqdm(batches, desc=f"simulate {scenario}", unit="request", disable=not interactive()):
            started = time.monotonic()
            result.requests += 1
            result.texts += len(batch)
            try:
                response = _post_politely(client, "/v1/predict", {"texts": batch["text"].tolist()}, result)
            except httpx.HTTPError as error:
                result.statuses["no answer"] += 1
                result.errors.append(repr(error))
                continue
            result.statuses[response.status_code] += 1
            if response.status_code != 200:
                result.errors.append(response.text[:300])
            else:
                body = response.json()
                result.answered += 1
                result.model_versions[body["model_version"]] += len(batch)
                for index, (label, prediction) in enumerate(
                    zip(batch["label"], body["predictions"], strict=True)
                ):
                    if chooser.random() >= feedback_share:
                        continue
                    feedback = _post_politely(
                        client,
                        "/v1/feedback",
                        {"request_id": body["request_id"], "item_index": index, "true_label": label},
                        result,
                    )
                    if feedback.status_code == 200:
                        result.feedback_sent += 1
                        result.correct_on_feedback += prediction["label"] == label
                    else:
                        result.errors.append(f"feedback {feedback.status_code}: {feedback.text[:200]}")
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    return result
