"""A generation model behind `tuneloop serve`: the stable address follows an alias move to a new version
under steady `/v1/generate` traffic, losing no request, as it does for classifiers (test_serving.py).

Version 1 is the tiny Llama adapter that answers `memorised_pairs` exactly; version 2 is the same
adapter whose generation settings cap answers at a few tokens, so which version answered shows in
every answer.
"""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest

from serving.inference import MANIFEST_FILE
from tests.integration.test_serving import RequestStream, served_status, wait_until
from tests.support import gateway_process, memorised_pairs, sqlite_registry_with

pytestmark = pytest.mark.slow

NAME = "tuneloop-generation-swap-test"
SHORT_ANSWER_TOKENS = 4


def generated(body: dict) -> str:
    return body["generations"][0]["text"]


@pytest.fixture(scope="module")
def generation_gateway(tiny_generator, tmp_path_factory):
    home = tmp_path_factory.mktemp("generation-swap-home")
    short = tmp_path_factory.mktemp("generation-swap-work") / "short"
    shutil.copytree(tiny_generator, short)
    manifest = json.loads((short / MANIFEST_FILE).read_text())
    (short / MANIFEST_FILE).write_text(json.dumps({**manifest, "max_new_tokens": SHORT_ANSWER_TOKENS}))
    uri, client = sqlite_registry_with(home, NAME, [tiny_generator, short], base=None)
    project = tmp_path_factory.mktemp("generation-swap-project")
    with gateway_process(project, NAME, uri, home) as running:
        yield running | {"client": client}


def test_an_alias_move_swaps_the_generation_model_under_traffic(generation_gateway):
    gateway = generation_gateway
    pairs = memorised_pairs()
    messages, targets = pairs["message"].tolist(), pairs["target"].tolist()
    before = httpx.post(
        f"{gateway['url']}/v1/generate", json={"texts": messages}, headers=gateway["headers"], timeout=60
    )
    assert before.status_code == 200, before.text
    assert [answer["text"] for answer in before.json()["generations"]] == targets

    stream = RequestStream(
        gateway["url"], messages, 8, 2, gateway["headers"], path="/v1/generate", read=generated
    )
    with stream:
        time.sleep(3)
        moved_at = time.monotonic()
        gateway["client"].set_registered_model_alias(NAME, "prod", "2")
        wait_until(lambda: any(a.version == "2" for a in list(stream.answers)), 180, "answers from v2")
        first_v2 = min(a.sent_at for a in list(stream.answers) if a.version == "2")
        time.sleep(3)
    answers = stream.answers
    failures = [a for a in answers if a.status != 200]
    assert failures == [], failures[:5]
    after = [a for a in answers if a.sent_at > first_v2]
    assert after and all(a.version == "2" for a in after), "an answer from v1 came after v2 took over"
    # v1 answers the memorised targets; v2 is cut to a few tokens, a strict prefix of them.
    assert all(a.label == targets[a.text_index] for a in answers if a.version == "1")
    for answer in (a for a in answers if a.version == "2"):
        assert answer.label != targets[answer.text_index]
        assert targets[answer.text_index].startswith(answer.label)
    swap = served_status(gateway)["swaps"][-1]
    assert swap["ok"] and (swap["from_version"], swap["to_version"]) == ("1", "2") and swap["drained"]
    print(
        f"\ngeneration swap under load: {len(answers)} requests, 0 failed; alias move -> first v2 answer "
        f"{first_v2 - moved_at:.2f}s; new server ready in {swap['ready_s']:.2f}s; swap incl. drain "
        f"{swap['total_s']:.2f}s"
    )
