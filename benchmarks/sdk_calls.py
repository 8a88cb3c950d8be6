"""CPU per model call in the calling process, for each way of calling the official SDKs.

``python -m benchmarks.sdk_calls --calls 3000 --in-flight 64`` starts a provider
simulator answering at once (``--latency-ms 0``) and, in this process with no Kafka, makes
the calls each way and divides the process's CPU time by the calls:

* ``openai-typed``: ``AsyncOpenAI.chat.completions.create`` (the SDK's typed method);
* ``openai-raw``: tierstream's call, the SDK's ``post(..., cast_to=httpx2.Response)``
  parsed with orjson (:class:`streams.providers.openai_client.OpenAIClient`);
* ``anthropic-typed`` and ``anthropic-raw``: the same for ``AsyncAnthropic``;
* ``aiohttp``: a plain aiohttp POST of the same body, the floor under any SDK.

Both SDK clients use their aiohttp transport, as the workers do. Each way runs
``--rounds`` times, interleaved; the median round is reported. One JSON object is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import anthropic
import openai
import orjson

from schemas.models import ChatMessage
from streams import processes
from streams.broker import free_ports
from streams.providers.anthropic_client import AnthropicClient
from streams.providers.openai_client import OpenAIClient
from streams.providers.transport import CALL_ENV

MESSAGES = [ChatMessage(role="user", content="Summarise the quarterly report in three bullet points.")]
MAX_TOKENS = 64
Call = Callable[[], Awaitable[object]]


async def _per_call_cpu(call: Call, calls: int, in_flight: int) -> float:
    """Milliseconds of this process's CPU per call, ``in_flight`` calls at a time."""
    queue = iter(range(calls))

    async def lane() -> None:
        for _ in queue:
            await call()

    for _ in range(min(50, calls)):  # warm the connections and the code paths
        await call()
    started = time.process_time()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    return (time.process_time() - started) * 1000 / calls


async def measure(base: str, calls: int, in_flight: int, rounds: int) -> dict[str, object]:
    os.environ[CALL_ENV] = "raw"
    openai_raw = OpenAIClient("sk-bench", f"{base}/v1", timeout=30, max_retries=0)
    anthropic_raw = AnthropicClient("sk-bench", base, timeout=30, max_retries=0)
    openai_sdk = openai.AsyncOpenAI(api_key="sk-bench", base_url=f"{base}/v1", max_retries=0,
                                    http_client=openai.DefaultAioHttpClient())
    anthropic_sdk = anthropic.AsyncAnthropic(api_key="sk-bench", base_url=base, max_retries=0,
                                             http_client=anthropic.DefaultAioHttpClient())
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight))
    chat = [{"role": m.role, "content": m.content} for m in MESSAGES]
    plain_body = orjson.dumps({"model": "gpt-5-nano", "messages": chat, "max_completion_tokens": MAX_TOKENS})

    async def openai_typed() -> object:
        response = await openai_sdk.chat.completions.create(
            model="gpt-5-nano", messages=chat, max_completion_tokens=MAX_TOKENS,  # type: ignore[arg-type]
        )
        return response.choices[0].message.content, response.usage

    async def anthropic_typed() -> object:
        response = await anthropic_sdk.messages.create(
            model="claude-haiku-4-5", messages=chat, max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
        )
        return response.content, response.usage

    async def plain() -> object:
        async with session.post(f"{base}/v1/chat/completions", data=plain_body,
                                headers={"content-type": "application/json", "authorization": "Bearer sk"}) as r:
            return orjson.loads(await r.read())

    ways: dict[str, Call] = {
        "openai-typed": openai_typed,
        "openai-raw": lambda: openai_raw.complete("gpt-5-nano", MESSAGES, MAX_TOKENS),
        "anthropic-typed": anthropic_typed,
        "anthropic-raw": lambda: anthropic_raw.complete("claude-haiku-4-5", MESSAGES, MAX_TOKENS),
        "aiohttp": plain,
    }
    per_round: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for _ in range(rounds):
            for name, call in ways.items():
                per_round[name].append(round(await _per_call_cpu(call, calls, in_flight), 4))
    finally:
        await session.close()
        for client in (openai_raw, anthropic_raw, openai_sdk, anthropic_sdk):
            await client.close()
    median = {name: statistics.median(values) for name, values in per_round.items()}
    return {
        "calls": calls, "in_flight": in_flight, "rounds": rounds,
        "cpu_ms_per_call": median,
        "raw_over_typed": {
            provider: round(median[f"{provider}-raw"] / median[f"{provider}-typed"], 3)
            for provider in ("openai", "anthropic")
        },
        "every_round": per_round,
        "basis": "CPU time of this process (time.process_time) per call, median round; "
                 "simulator at --latency-ms 0 in its own process",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sdk_calls", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000, help="calls per way and round")
    parser.add_argument("--in-flight", type=int, default=64, help="calls open at once")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every way, interleaved")
    args = parser.parse_args(argv)
    if min(args.calls, args.in_flight, args.rounds) < 1:
        parser.error("--calls, --in-flight and --rounds must be at least 1")
    (port,) = free_ports(1)
    logs = Path(tempfile.mkdtemp(prefix="tierstream-sdk-calls-"))
    sim = processes.spawn(["provider-sim", "--port", str(port), "--latency-ms", "0"], log_path=logs / "simulator.log")
    try:
        processes.wait_http_ok(f"http://127.0.0.1:{port}/health", 30, sim)
        report = asyncio.run(measure(f"http://127.0.0.1:{port}", args.calls, args.in_flight, args.rounds))
    finally:
        processes.stop(sim)
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
