"""The providers' batch APIs through the official SDKs: OpenAI's Batch API (a JSONL file,
then a batch) and Anthropic's Message Batches API.

Each item's custom_id is ``<job_key>-<index>``: results map back to the requests of the
job by index, and a job whose submission was not recorded can be recognised at the
provider (OpenAI keeps the job key in the batch's metadata; Anthropic batches carry no
metadata, so a candidate is confirmed by its custom_ids once its results are read).
Request bodies and answers are built and parsed by the same code as online calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import anthropic
import openai
import orjson

from schemas.models import ChatMessage
from streams.providers import Completion, anthropic_client, openai_client, resolve_endpoint
from streams.providers.base import error_from_status
from topologies.config import Settings

JOB_METADATA_KEY = "tierstream_job"
# How far back the provider's batch list is searched for an unrecorded submission.
FIND_SLACK_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class BatchItem:
    messages: list[ChatMessage]
    max_output_tokens: int


@dataclass(frozen=True, slots=True)
class ItemOutcome:
    """One item's answer, or why there is none (errored, expired, cancelled, missing)."""

    completion: Completion | None
    failure: str | None = None


@dataclass(frozen=True, slots=True)
class BatchStatus:
    status: str  # the provider's word
    ended: bool
    rejected: str | None = None  # the provider refused the batch whole: why


class BatchRejected(Exception):
    """The provider refused a whole batch (a bad line, over a limit): its reason."""


class NotThisJob(Exception):
    """A batch found at the provider turned out to carry another job's items."""


def custom_id(job_key: str, index: int) -> str:
    return f"{job_key}-{index}"


def item_index(job_key: str, value: str | None) -> int | None:
    prefix = f"{job_key}-"
    if not value or not value.startswith(prefix) or not value[len(prefix):].isdigit():
        return None
    return int(value[len(prefix):])


def _outcomes(job_key: str, count: int, found: dict[int, ItemOutcome]) -> list[ItemOutcome]:
    return [found.get(i, ItemOutcome(None, "missing from the batch's results")) for i in range(count)]


@contextmanager
def _calling(provider: str, sdk: Any, creating: bool = False) -> Iterator[None]:
    """The SDK's errors as the project's: a :class:`ProviderError` (retried at the next
    poll), or, for a batch being created, :class:`BatchRejected` when the status says
    retrying cannot help (a 4xx other than 408, 409 and 429)."""
    try:
        yield
    except sdk.APIStatusError as exc:
        error = error_from_status(provider, exc, exc.status_code)
        if creating and not error.retryable:
            raise BatchRejected(str(error)) from None
        raise error from None
    except sdk.APIError as exc:  # connection errors and timeouts
        raise error_from_status(provider, exc, None) from None


class BatchClient(Protocol):
    provider: str

    async def submit(self, job_key: str, model: str, items: list[BatchItem]) -> str: ...

    async def status(self, batch_id: str) -> BatchStatus: ...

    async def results(self, batch_id: str, job_key: str, count: int) -> list[ItemOutcome]: ...

    async def find(self, job_key: str, count: int, since: datetime, taken: set[str]) -> list[str]: ...

    async def close(self) -> None: ...


class OpenAIBatches:
    provider = "openai"
    _ENDED = {"completed", "expired", "cancelled", "failed"}

    def __init__(self, api_key: str, base_url: str | None, timeout: float, max_retries: int) -> None:
        self._sdk = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries)

    async def submit(self, job_key: str, model: str, items: list[BatchItem]) -> str:
        lines = b"".join(
            orjson.dumps({
                "custom_id": custom_id(job_key, i), "method": "POST", "url": "/v1/chat/completions",
                "body": openai_client.request_body(model, item.messages, item.max_output_tokens),
            }) + b"\n"
            for i, item in enumerate(items)
        )
        with _calling(self.provider, openai, creating=True):
            file = await self._sdk.files.create(file=(f"{job_key}.jsonl", lines, "application/jsonl"), purpose="batch")
            batch = await self._sdk.batches.create(
                input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h",
                metadata={JOB_METADATA_KEY: job_key},
            )
        return batch.id

    async def status(self, batch_id: str) -> BatchStatus:
        with _calling(self.provider, openai):
            batch = await self._sdk.batches.retrieve(batch_id)
        rejected = None
        if batch.status == "failed":
            errors = batch.errors.data if batch.errors and batch.errors.data else []
            rejected = "; ".join(f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "") for e in errors)
            rejected = rejected or "the batch failed validation"
        return BatchStatus(batch.status, batch.status in self._ENDED, rejected)

    async def _lines(self, file_id: str | None) -> list[dict[str, Any]]:
        if not file_id:
            return []
        content = await self._sdk.files.content(file_id)
        return [orjson.loads(line) for line in content.content.splitlines() if line.strip()]

    async def results(self, batch_id: str, job_key: str, count: int) -> list[ItemOutcome]:
        with _calling(self.provider, openai):
            batch = await self._sdk.batches.retrieve(batch_id)
            lines = await self._lines(batch.output_file_id) + await self._lines(batch.error_file_id)
        found: dict[int, ItemOutcome] = {}
        for line in lines:
            index = item_index(job_key, line.get("custom_id"))
            if index is None:
                raise NotThisJob(f"batch {batch_id} holds custom_id {line.get('custom_id')!r}")
            response = line.get("response") or {}
            body = response.get("body") or {}
            if response.get("status_code") == 200:
                found[index] = ItemOutcome(openai_client.completion_from_payload(body, ""))
                continue
            error = line.get("error") or body.get("error") or {}
            found[index] = ItemOutcome(None, f"{error.get('code') or response.get('status_code')}: {error.get('message', '')}")
        return _outcomes(job_key, count, found)

    async def find(self, job_key: str, count: int, since: datetime, taken: set[str]) -> list[str]:
        floor = since.timestamp() - FIND_SLACK_SECONDS
        with _calling(self.provider, openai):
            async for batch in self._sdk.batches.list(limit=100):
                if batch.created_at < floor:
                    break
                if (batch.metadata or {}).get(JOB_METADATA_KEY) == job_key and batch.id not in taken:
                    return [batch.id]
        return []

    async def close(self) -> None:
        await self._sdk.close()


class AnthropicBatches:
    provider = "anthropic"

    def __init__(self, api_key: str, base_url: str | None, timeout: float, max_retries: int) -> None:
        self._sdk = anthropic.AsyncAnthropic(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries)

    async def submit(self, job_key: str, model: str, items: list[BatchItem]) -> str:
        requests: list[Any] = [
            {"custom_id": custom_id(job_key, i),
             "params": anthropic_client.request_body(model, item.messages, item.max_output_tokens)}
            for i, item in enumerate(items)
        ]
        with _calling(self.provider, anthropic, creating=True):
            batch = await self._sdk.messages.batches.create(requests=requests)
        return batch.id

    async def status(self, batch_id: str) -> BatchStatus:
        with _calling(self.provider, anthropic):
            batch = await self._sdk.messages.batches.retrieve(batch_id)
        return BatchStatus(batch.processing_status, batch.processing_status == "ended")

    async def results(self, batch_id: str, job_key: str, count: int) -> list[ItemOutcome]:
        found: dict[int, ItemOutcome] = {}
        with _calling(self.provider, anthropic):
            async for entry in await self._sdk.messages.batches.results(batch_id):
                index = item_index(job_key, entry.custom_id)
                if index is None:
                    raise NotThisJob(f"batch {batch_id} holds custom_id {entry.custom_id!r}")
                result = entry.result
                if result.type == "succeeded":
                    found[index] = ItemOutcome(anthropic_client.completion_from_payload(result.message.model_dump(), ""))
                elif result.type == "errored":
                    error = result.error.error
                    found[index] = ItemOutcome(None, f"{error.type}: {error.message}")
                else:  # expired, canceled
                    found[index] = ItemOutcome(None, f"{result.type}: not processed within the batch")
        return _outcomes(job_key, count, found)

    async def find(self, job_key: str, count: int, since: datetime, taken: set[str]) -> list[str]:
        """Candidates only: batches of the right size created since the job was recorded
        (the API keeps no metadata); the results' custom_ids confirm one."""
        floor = since.timestamp() - FIND_SLACK_SECONDS
        found = []
        with _calling(self.provider, anthropic):
            async for batch in self._sdk.messages.batches.list(limit=100):
                if batch.created_at.timestamp() < floor:
                    break
                counts = batch.request_counts
                total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
                if total == count and batch.id not in taken:
                    found.append(batch.id)
        return found

    async def close(self) -> None:
        await self._sdk.close()


_CLIENTS = {"openai": OpenAIBatches, "anthropic": AnthropicBatches}


def batch_client(settings: Settings, provider: str) -> BatchClient:
    """The provider's batch client, reaching the same endpoint as its online calls."""
    endpoint = resolve_endpoint(settings, provider)  # type: ignore[arg-type]
    conf = settings.providers[provider]  # type: ignore[index]
    return _CLIENTS[provider](endpoint.api_key, endpoint.base_url, conf.timeout_seconds, conf.max_retries)


__all__ = [
    "BatchClient", "BatchItem", "BatchRejected", "BatchStatus", "ItemOutcome", "NotThisJob",
    "batch_client", "custom_id", "item_index",
]
