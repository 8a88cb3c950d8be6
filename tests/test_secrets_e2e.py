"""No secret leaves the process: a pipeline runs with sentinel API keys, through good
requests, provider errors and bad input, and then every log line, every message on
every topic and every worker's /metrics are searched for the sentinels. Prompts and
outputs are searched for in the logs too (they are only logged with worker.log_prompts).
"""

from __future__ import annotations

import re
import urllib.request

import orjson
import pytest

from tests.support import Pipeline, collect, produce_raw, read_to_end
from topologies.topics import ALL_ROLES

pytestmark = pytest.mark.e2e

OPENAI_KEY = "sk-SENTINEL-openai-7f3a9c1e5b"
ANTHROPIC_KEY = "sk-ant-SENTINEL-anthropic-2d8e4f6a0c"
PROMPT = "PROMPT-SENTINEL-3b7d"
OUTPUT = "OUTPUT-SENTINEL-9e1f"


def request(n: int, tier: str, task: str) -> tuple[bytes, bytes]:
    return b"wf-secret", orjson.dumps({
        "request_id": f"sec-{n}", "workflow_id": "wf-secret", "agent_type": "writer",
        "task": task, "max_output_tokens": 32, "tier_hint": tier,
    })


async def every_message(pipeline: Pipeline) -> list[bytes]:
    """Keys and values of every message on every topic of the pipeline."""
    records = await read_to_end(pipeline, *(spec.name for spec in pipeline.topology.all()))
    return [r.key or b"" for r in records] + [r.value or b"" for r in records]


def metrics_pages(pipeline: Pipeline) -> list[str]:
    pages = []
    for port in re.findall(r"health server on [0-9.]+:(\d+)", pipeline.logs()):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            pages.append(response.read().decode())
    return pages


async def test_no_secret_in_logs_topics_or_metrics(pipeline_factory, simulator_port: int) -> None:
    simulator = f"http://127.0.0.1:{simulator_port}"
    pipeline = pipeline_factory(
        # The production configuration (real keys, use_simulator never), pointed at the
        # simulator: the keys really travel, in the SDKs' auth headers.
        OPENAI_API_KEY=OPENAI_KEY,
        ANTHROPIC_API_KEY=ANTHROPIC_KEY,
        TIERSTREAM__PROVIDERS__OPENAI__USE_SIMULATOR="never",
        TIERSTREAM__PROVIDERS__OPENAI__BASE_URL=f"{simulator}/v1",
        TIERSTREAM__PROVIDERS__ANTHROPIC__USE_SIMULATOR="never",
        TIERSTREAM__PROVIDERS__ANTHROPIC__BASE_URL=simulator,
        TIERSTREAM__CLASSIFIER__STRATEGY="llm",  # the classifier calls a model too
        TIERSTREAM__PROVIDERS__OPENAI__MAX_RETRIES="1",
        TIERSTREAM__PROVIDERS__ANTHROPIC__MAX_RETRIES="1",
    )
    await pipeline.start_workers("all")
    messages = [request(n, tier, f"{PROMPT} write line {n}. #sim:reply={OUTPUT}")
                for n, tier in enumerate(["nano", "standard", "premium"] * 3)]
    messages += [
        request(100, "standard", "Rejected. #sim:status=401"),  # authentication error
        request(101, "nano", "Broken. #sim:status=500"),  # retried, then dead-lettered
        (b"wf-secret", b'{"request_id": "sec-bad", "task": '),  # not JSON
    ]
    await produce_raw(pipeline.settings.kafka.bootstrap_servers, pipeline.topology.requests.name, messages)

    collected = await collect(pipeline, expected=len(messages), timeout=180)
    assert len(collected.results) == 9, f"logs in {pipeline.log_dir}"
    assert {d["code"] for d in collected.dead_letters} == {"provider_error", "invalid_json"}
    assert all(OUTPUT in r["output"] for r in collected.results), "the sentinel output never came back"

    topics = await every_message(pipeline)
    pages = metrics_pages(pipeline)
    logs = pipeline.logs()
    assert len(pages) == len(ALL_ROLES), "expected one /metrics page per role"
    assert len(topics) > 2 * len(messages), "the topics were not read"
    assert "provider_error" in logs or collected.dead_letters, "the error path was not exercised"
    # Booleans only: a failing assertion must not print what it found.
    for secret in (OPENAI_KEY, ANTHROPIC_KEY):
        needle = secret.encode()
        in_topics = any(needle in message for message in topics)
        in_metrics = any(secret in page for page in pages)
        in_logs = secret in logs
        assert not (in_topics or in_metrics or in_logs), (
            f"a sentinel API key leaked: topics={in_topics} metrics={in_metrics} logs={in_logs}"
        )
    assert PROMPT not in logs, "a prompt was logged with worker.log_prompts off"
    assert OUTPUT not in logs, "a model output was logged with worker.log_prompts off"
