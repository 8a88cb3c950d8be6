"""The OpenAI Batch API (with the Files API it needs) and the Anthropic Message Batches API.

Routes (OpenAI under ``/v1``, where the OpenAI SDK's base URL ends; Anthropic's at the
root, where its SDK puts them)::

    POST /v1/files                 GET /v1/files            GET /v1/files/{id}
    DELETE /v1/files/{id}          GET /v1/files/{id}/content
    POST /v1/batches               GET /v1/batches          GET /v1/batches/{id}
    POST /v1/batches/{id}/cancel
    POST /v1/messages/batches      GET /v1/messages/batches GET /v1/messages/batches/{id}
    DELETE /v1/messages/batches/{id}
    POST /v1/messages/batches/{id}/cancel                   GET /v1/messages/batches/{id}/results

Timing (monotonic clock, computed when a batch is looked at, no background task): item
``i`` of ``n`` is answered at ``created + batch_delay_seconds * (i + 1) / n``, so a batch
ends ``batch_delay_seconds`` after its creation. The first read at or after that moment
(a retrieve, a list, a cancel, ``GET /stats``, or a create that checks the enqueued
tokens) *settles* the batch once: it builds every item's answer with the online
endpoints' code, writes the OpenAI output and error files and counts the outcomes. A
cancel settles the batch at the cancel's moment: items due by then keep their answer,
the others are canceled. Answers to a create are ``validating`` (OpenAI) /
``in_progress`` (Anthropic) and to a cancel ``cancelling`` / ``canceling``, as the real
APIs answer; every later read shows where the batch really is.

Which items fail: a body the online endpoint would refuse (400, e.g. an Anthropic item
without ``max_tokens``); ``#sim:batch-error`` (500 ``api_error``), ``#sim:batch-error=<code>``
or ``#sim:batch-expire`` in the last user message; else a draw against
``batch_item_error_rate`` / ``batch_item_expire_rate`` (one draw per item, from a
generator seeded by ``seed``). The online directives and fault injection
(``#sim:status``, ``error_rate``, bursts, latency, rate limits) do not apply to batches.
"""

from __future__ import annotations

import itertools
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson
from aiohttp import web

from .config import SimulatorConfig
from .content import Answer, find_batch_directive
from .limiter import retry_after_header
from .responses import error_response, json_response, read_json_object, request_error_response
from .stats import SimulatorStats
from .wire import (
    ORGANIZATION,
    STREAM_UNSUPPORTED,
    ApiName,
    ParsedRequest,
    RequestError,
    Wire,
    rfc3339,
)

BATCH_WINDOW_SECONDS = 24 * 3600
"""Both APIs expire a batch 24 h after its creation (``expires_at``)."""
CHAT_COMPLETIONS = "/v1/chat/completions"
"""The one OpenAI batch endpoint the simulator serves."""

_CUSTOM_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_FILE_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
_INJECTED_ITEM_ERROR = (
    "The server had an error while processing your request (batch item error injected by "
    "provider-sim)."
)
_EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
_CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."

Fate = Literal["answer", "error", "expire"]
Outcome = Literal["succeeded", "errored", "expired", "canceled"]
Handler = Callable[[web.Request, str], Awaitable[web.Response]]


class BatchHost(Protocol):
    """What the batch queue uses of the simulator."""

    config: SimulatorConfig

    @property
    def counters(self) -> SimulatorStats: ...
    def answer_for(self, parsed: ParsedRequest) -> Answer: ...
    def next_serial(self) -> int: ...


@dataclass(slots=True)
class BatchItem:
    custom_id: str
    model: str
    parsed: ParsedRequest | None
    """``None`` when the body is one the online endpoint would refuse (``fate`` is error)."""
    fate: Fate
    due: float
    """Monotonic time it is answered; an expiring item's is the batch's end."""
    charge: int
    """Enqueued tokens: input tokens + max tokens, as the online limiter charges."""
    status: int = 0
    """HTTP status of the error, when ``fate`` is ``"error"``."""
    message: str = ""
    param: str | None = None


@dataclass(slots=True)
class ItemResult:
    custom_id: str
    outcome: Outcome
    serial: int
    """Numbers the line (``batch_req_sim<serial>``) and its request id (``req_sim<serial>``)."""
    status: int = 0
    body: dict[str, Any] | None = None
    """The online endpoint's response body, or its error body."""


@dataclass(slots=True)
class StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


@dataclass(slots=True)
class Batch:
    id: str
    api: ApiName
    created_wall: float
    created: float
    """Monotonic time of the create call."""
    ends: float
    """Monotonic time its last item is answered."""
    items: list[BatchItem] = field(default_factory=list)
    charges: dict[str, int] = field(default_factory=dict)
    """Enqueued tokens by model, while the batch is unfinished."""
    errors: list[dict[str, Any]] = field(default_factory=list)
    """OpenAI validation errors: the batch failed and holds no items."""
    input_file_id: str = ""
    endpoint: str = ""
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
    model: str | None = None
    cancelled: float | None = None
    """Monotonic time of the cancel call (always before ``ends``)."""
    results: list[ItemResult] | None = None
    """Set when the batch settles (it ended, or was cancelled)."""
    outcomes: Counter[str] = field(default_factory=Counter)
    input_tokens: int = 0
    output_tokens: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None

    def wall(self, moment: float) -> float:
        """A monotonic moment as a Unix time."""
        return self.created_wall + (moment - self.created)

    @property
    def ended_at(self) -> float:
        return self.cancelled if self.cancelled is not None else self.ends


def _batch_error(code: str, message: str, line: int | None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def _openai_line_problem(line: dict[str, Any], endpoint: str) -> tuple[str, str, str] | None:
    """``(code, message, param)`` of what is wrong with one OpenAI input line."""
    for name in ("custom_id", "method", "url", "body"):
        if line.get(name) is None:
            return "missing_required_parameter", f"Missing required parameter: '{name}'.", name
    custom_id = line["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        return "invalid_value", "Invalid 'custom_id': expected a non-empty string.", "custom_id"
    if line["method"] != "POST":
        return "invalid_value", "Invalid 'method': only POST is supported.", "method"
    if line["url"] != endpoint:
        message = f"The provided URL '{line['url']}' does not match the batch endpoint '{endpoint}'."
        return "url_mismatch", message, "url"
    if not isinstance(line["body"], dict):
        return "invalid_value", "Invalid 'body': expected a JSON object.", "body"
    return None


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 16:
        raise RequestError(400, "Invalid 'metadata': expected an object of at most 16 pairs.", param="metadata")
    for key, item in value.items():
        if not isinstance(item, str) or len(key) > 64 or len(item) > 512:
            message = "Invalid 'metadata': keys up to 64 characters, string values up to 512."
            raise RequestError(400, message, param="metadata")
    return dict(value)


def _required_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        message = f"Missing required parameter: '{name}'."
        raise RequestError(400, message, param=name, code="missing_required_parameter")
    if not isinstance(value, str):
        raise RequestError(400, f"Invalid type for '{name}': expected a string.", param=name)
    return value


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        message = f"Invalid '{name}': expected an integer from {low} to {high}, got {raw!r}."
        raise RequestError(400, message, param=name)
    return value


def _page(
    ids: list[str], limit: int, after: str | None, before: str | None
) -> tuple[list[str], bool]:
    """A page of ``ids`` (newest first) after or before a cursor, and whether more follow."""
    cursor = after if after is not None else before
    if cursor is not None and cursor not in ids:
        name = "after" if after is not None else "before"
        raise RequestError(400, f"Invalid '{name}': no object with id '{cursor}'.", param=name)
    if after is not None:
        start = ids.index(after) + 1
        return ids[start : start + limit], start + limit < len(ids)
    if before is not None:
        end = ids.index(before)
        start = max(0, end - limit)
        return ids[start:end], start > 0
    return ids[:limit], limit < len(ids)


class BatchQueue:
    """Files, batches and their results, for both APIs; served on the simulator's app."""

    def __init__(self, host: BatchHost, openai_wire: Wire, anthropic_wire: Wire) -> None:
        self._host = host
        self._config = host.config
        seed = self._config.seed
        self._rng = random.Random(None if seed is None else f"batches:{seed}")
        self._wires: dict[ApiName, Wire] = {"openai": openai_wire, "anthropic": anthropic_wire}
        self._ids = itertools.count(1)
        self._files: dict[str, StoredFile] = {}
        self._batches: dict[str, Batch] = {}
        self._order: dict[ApiName, list[str]] = {"openai": [], "anthropic": []}
        self._open: dict[str, Batch] = {}

    # -- routes ------------------------------------------------------------------

    def add_routes(self, router: web.UrlDispatcher) -> None:
        openai, anthropic = self._wires["openai"], self._wires["anthropic"]
        routes: list[tuple[str, str, Wire, Handler]] = [
            ("POST", "/v1/files", openai, self._file_create),
            ("GET", "/v1/files", openai, self._file_list),
            ("GET", "/v1/files/{file_id}", openai, self._file_retrieve),
            ("DELETE", "/v1/files/{file_id}", openai, self._file_delete),
            ("GET", "/v1/files/{file_id}/content", openai, self._file_content),
            ("POST", "/v1/batches", openai, self._openai_create),
            ("GET", "/v1/batches", openai, self._openai_list),
            ("GET", "/v1/batches/{batch_id}", openai, self._openai_retrieve),
            ("POST", "/v1/batches/{batch_id}/cancel", openai, self._openai_cancel),
            ("POST", "/v1/messages/batches", anthropic, self._anthropic_create),
            ("GET", "/v1/messages/batches", anthropic, self._anthropic_list),
            ("GET", "/v1/messages/batches/{batch_id}", anthropic, self._anthropic_retrieve),
            ("DELETE", "/v1/messages/batches/{batch_id}", anthropic, self._anthropic_delete),
            ("POST", "/v1/messages/batches/{batch_id}/cancel", anthropic, self._anthropic_cancel),
            ("GET", "/v1/messages/batches/{batch_id}/results", anthropic, self._anthropic_results),
        ]  # fmt: skip
        for method, path, wire, handler in routes:
            router.add_route(method, path, self._endpoint(wire, handler))

    def _endpoint(self, wire: Wire, handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
        """API key check (401), request id header, errors in the provider's shape, counting."""

        async def endpoint(request: web.Request) -> web.Response:
            request_id = f"req_sim{self._host.next_serial():020d}"
            if not wire.authenticated(request.headers):
                response = error_response(wire, request_id, 401, wire.missing_key_message)
            else:
                try:
                    response = await handler(request, request_id)
                    response.headers[wire.request_id_header] = request_id
                except RequestError as exc:
                    response = request_error_response(wire, request_id, exc)
            self._host.counters.batch_calls[response.status] += 1
            return response

        return endpoint

    # -- state -------------------------------------------------------------------

    def enqueued_tokens(self, now: float | None = None) -> dict[tuple[str, str], int]:
        """Tokens of unfinished batches by (api, model); settles the batches that ended."""
        self._advance_all(time.monotonic() if now is None else now)
        totals: Counter[tuple[str, str]] = Counter()
        for batch in self._open.values():
            for model, tokens in batch.charges.items():
                totals[(batch.api, model)] += tokens
        return dict(totals)

    def _advance(self, batch: Batch, now: float) -> None:
        if batch.id in self._open and now >= batch.ends:
            self._settle(batch)

    def _advance_all(self, now: float) -> None:
        for batch in [b for b in self._open.values() if now >= b.ends]:
            self._settle(batch)

    def _get(self, api: ApiName, batch_id: str) -> Batch:
        batch = self._batches.get(batch_id)
        if batch is None or batch.api != api:
            if api == "openai":
                raise RequestError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
            raise RequestError(404, f"Message Batch {batch_id} not found.")
        self._advance(batch, time.monotonic())
        return batch

    def _register(self, batch: Batch) -> None:
        self._batches[batch.id] = batch
        self._order[batch.api].append(batch.id)
        if batch.items:
            self._open[batch.id] = batch
        stats = self._host.counters
        stats.batches_created[batch.api] += 1
        for item in batch.items:
            stats.batch_items_submitted[(batch.api, item.model)] += 1

    def _store_file(self, filename: str, purpose: str, data: bytes, created_at: int) -> StoredFile:
        stored = StoredFile(f"file-sim{next(self._ids):020d}", filename, purpose, data, created_at)
        self._files[stored.id] = stored
        return stored

    # -- items ---------------------------------------------------------------------

    def _make_items(self, api: ApiName, entries: list[tuple[str, dict[str, Any]]], now: float) -> list[BatchItem]:
        """Parse each body as the online endpoint does and decide each item's fate."""
        wire = self._wires[api]
        config = self._config
        delay = config.batch_delay_seconds
        ends = now + delay
        error_rate = config.batch_item_error_rate
        expire_rate = error_rate + config.batch_item_expire_rate
        count = len(entries)
        items: list[BatchItem] = []
        for index, (custom_id, body) in enumerate(entries):
            draw = self._rng.random()  # one per item, used or not, so draws stay aligned
            due = min(ends, now + delay * (index + 1) / count)
            try:
                parsed = wire.parse(body)
                if parsed.stream:
                    raise RequestError(400, STREAM_UNSUPPORTED, param="stream")
            except RequestError as exc:
                model = body.get("model")
                name = model if isinstance(model, str) and model else "unknown"
                items.append(
                    BatchItem(custom_id, name, None, "error", due, 0, exc.status, exc.message, exc.param)
                )
                continue
            item = BatchItem(
                custom_id, parsed.model, parsed, "answer", due, parsed.input_tokens + parsed.max_tokens
            )
            directive = find_batch_directive(parsed.user_text)
            if directive is not None:
                if directive.expire:
                    item.fate = "expire"
                else:
                    item.fate, item.status = "error", directive.status
                    item.message = f"Simulated HTTP {directive.status} (#sim:batch-error directive)."
            elif draw < error_rate:
                item.fate, item.status, item.message = "error", 500, _INJECTED_ITEM_ERROR
            elif draw < expire_rate:
                item.fate = "expire"
            if item.fate == "expire":
                item.due = ends
            items.append(item)
        return items

    def _settle(self, batch: Batch) -> None:
        """Answer every item done by the batch's end (or its cancellation), once."""
        api = batch.api
        wire = self._wires[api]
        stats = self._host.counters
        end = batch.ended_at
        results: list[ItemResult] = []
        for item in batch.items:
            serial = self._host.next_serial()
            if item.due > end:
                result = ItemResult(item.custom_id, "canceled", serial)
            elif item.fate == "expire":
                result = ItemResult(item.custom_id, "expired", serial)
            elif item.fate == "error":
                body = wire.error_body(item.status, item.message, f"req_sim{serial:020d}", param=item.param)
                result = ItemResult(item.custom_id, "errored", serial, item.status, body)
            else:
                assert item.parsed is not None
                answer = self._host.answer_for(item.parsed)
                body = wire.response(item.parsed, answer, serial)
                result = ItemResult(item.custom_id, "succeeded", serial, 200, body)
                batch.input_tokens += item.parsed.input_tokens
                batch.output_tokens += answer.output_tokens
            results.append(result)
            batch.outcomes[result.outcome] += 1
            stats.batch_items[(api, result.outcome)] += 1
        batch.results = results
        stats.batch_input_tokens[api] += batch.input_tokens
        stats.batch_output_tokens[api] += batch.output_tokens
        stats.batches_ended[api] += 1
        del self._open[batch.id]
        if api == "openai":
            self._write_openai_files(batch)

    def _write_openai_files(self, batch: Batch) -> None:
        assert batch.results is not None
        output: list[bytes] = []
        errors: list[bytes] = []
        for result in batch.results:
            line: dict[str, Any] = {
                "id": f"batch_req_sim{result.serial:020d}",
                "custom_id": result.custom_id,
                "response": None,
                "error": None,
            }
            if result.body is not None:
                line["response"] = {
                    "status_code": result.status,
                    "request_id": f"req_sim{result.serial:020d}",
                    "body": result.body,
                }
            elif result.outcome == "expired":
                line["error"] = {"code": "batch_expired", "message": _EXPIRED_MESSAGE}
            else:
                line["error"] = {"code": "batch_cancelled", "message": _CANCELLED_MESSAGE}
            (output if result.outcome == "succeeded" else errors).append(orjson.dumps(line))
        created = int(batch.wall(batch.ended_at))
        if output:
            data = b"\n".join(output) + b"\n"
            batch.output_file_id = self._store_file(f"{batch.id}_output.jsonl", "batch_output", data, created).id
        if errors:
            data = b"\n".join(errors) + b"\n"
            batch.error_file_id = self._store_file(f"{batch.id}_error.jsonl", "batch_output", data, created).id

    def _token_limit_problem(
        self, api: ApiName, charges: dict[str, int], now: float
    ) -> tuple[str, int, int, int] | None:
        """``(model, limit, enqueued, requested)`` of the first model over the limit."""
        limit = self._config.batch_max_enqueued_tokens
        if limit is None:
            return None
        enqueued = self.enqueued_tokens(now)
        for model, tokens in sorted(charges.items()):
            used = enqueued.get((api, model), 0)
            if used + tokens > limit:
                return model, limit, used, tokens
        return None

    def _tokens_free_in(self, api: ApiName, model: str, needed: int, limit: int, now: float) -> float:
        """Seconds until ``needed`` more enqueued tokens of ``model`` fit."""
        used = sum(b.charges.get(model, 0) for b in self._open.values() if b.api == api)
        for batch in sorted(self._open.values(), key=lambda b: b.ends):
            if batch.api == api and model in batch.charges:
                used -= batch.charges[model]
                if used + needed <= limit:
                    return max(0.0, batch.ends - now)
        return max(0.0, self._config.batch_delay_seconds)

    # -- OpenAI files --------------------------------------------------------------

    async def _file_create(self, request: web.Request, _request_id: str) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            raise RequestError(400, "Invalid Content-Type header: expected multipart/form-data.")
        try:
            form = await request.post()
        except web.HTTPRequestEntityTooLarge:
            raise RequestError(413, "File exceeds the maximum allowed size.") from None
        upload = form.get("file")
        purpose = form.get("purpose")
        for name, value in (("file", upload), ("purpose", purpose)):
            if value is None:
                message = f"Missing required parameter: '{name}'."
                raise RequestError(400, message, param=name, code="missing_required_parameter")
        if purpose not in _FILE_PURPOSES:
            raise RequestError(400, f"Invalid value for 'purpose': {purpose!r}.", param="purpose")
        if isinstance(upload, web.FileField):
            data, filename = upload.file.read(), upload.filename or "upload"
        else:
            data, filename = str(upload).encode(), "upload"
        stored = self._store_file(filename, str(purpose), data, int(time.time()))
        return json_response(stored.to_json())

    def _file(self, request: web.Request) -> StoredFile:
        file_id = request.match_info["file_id"]
        stored = self._files.get(file_id)
        if stored is None:
            raise RequestError(404, f"No such File object: {file_id}", param="id")
        return stored

    async def _file_list(self, request: web.Request, _request_id: str) -> web.Response:
        limit = _int_query(request, "limit", 10_000, 1, 10_000)
        purpose = request.query.get("purpose")
        order = request.query.get("order", "desc")
        files = [f for f in self._files.values() if purpose is None or f.purpose == purpose]
        ids = [f.id for f in (reversed(files) if order == "desc" else files)]
        page, more = _page(ids, limit, request.query.get("after"), None)
        data = [self._files[file_id].to_json() for file_id in page]
        return json_response(
            {
                "object": "list",
                "data": data,
                "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None,
                "has_more": more,
            }
        )

    async def _file_retrieve(self, request: web.Request, _request_id: str) -> web.Response:
        return json_response(self._file(request).to_json())

    async def _file_delete(self, request: web.Request, _request_id: str) -> web.Response:
        stored = self._file(request)
        del self._files[stored.id]
        return json_response({"id": stored.id, "object": "file", "deleted": True})

    async def _file_content(self, request: web.Request, _request_id: str) -> web.Response:
        return web.Response(body=self._file(request).data, content_type="application/octet-stream")

    # -- OpenAI batches ------------------------------------------------------------

    async def _openai_create(self, request: web.Request, _request_id: str) -> web.Response:
        stats = self._host.counters
        try:
            body = await read_json_object(request)
            input_file_id = _required_str(body, "input_file_id")
            endpoint = _required_str(body, "endpoint")
            window = _required_str(body, "completion_window")
            if endpoint != CHAT_COMPLETIONS:
                message = f"Invalid value for 'endpoint': provider-sim batches serve only {CHAT_COMPLETIONS}."
                raise RequestError(400, message, param="endpoint")
            if window != "24h":
                message = "Invalid value for 'completion_window': only '24h' is supported."
                raise RequestError(400, message, param="completion_window")
            metadata = _metadata(body.get("metadata"))
            stored = self._files.get(input_file_id)
            if stored is None:
                raise RequestError(404, f"No such File object: {input_file_id}", param="input_file_id")
            if stored.purpose != "batch":
                message = (
                    f"Invalid 'input_file_id': file {input_file_id} has purpose "
                    f"'{stored.purpose}', a batch needs purpose 'batch'."
                )
                raise RequestError(400, message, param="input_file_id")
        except RequestError:
            stats.batches_rejected["openai"] += 1
            raise
        now = time.monotonic()
        batch = Batch(
            id=f"batch_sim{next(self._ids):020d}",
            api="openai",
            created_wall=time.time(),
            created=now,
            ends=now + self._config.batch_delay_seconds,
            input_file_id=input_file_id,
            endpoint=endpoint,
            completion_window=window,
            metadata=metadata,
        )
        entries, errors, batch.model = self._read_openai_file(stored.data, endpoint)
        if not errors:
            items = self._make_items("openai", entries, now)
            charges: Counter[str] = Counter()
            for item in items:
                charges[item.model] += item.charge
            problem = self._token_limit_problem("openai", charges, now)
            if problem is None:
                batch.items, batch.charges = items, dict(charges)
            else:
                model, limit, _used, _requested = problem
                message = (
                    f"Enqueued token limit reached for {model} in organization {ORGANIZATION}. "
                    f"Limit: {limit:,} enqueued tokens. Please try submitting fewer tasks or "
                    "waiting for existing batches to complete."
                )
                errors = [_batch_error("token_limit_exceeded", message, None)]
        batch.errors = errors
        if errors:
            stats.batches_failed["openai"] += 1
        self._register(batch)
        return json_response(self._openai_json(batch, now, phase="validating"))

    def _read_openai_file(
        self, data: bytes, endpoint: str
    ) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, Any]], str | None]:
        """The (custom_id, body) of each line, the validation errors, and the batch's model."""
        lines = [(number, raw) for number, raw in enumerate(data.split(b"\n"), 1) if raw.strip()]
        if not lines:
            return [], [_batch_error("empty_file", "The batch input file is empty.", None)], None
        limit = self._config.batch_limit("openai")
        if len(lines) > limit:
            message = f"The batch input file has {len(lines):,} requests; the limit is {limit:,} per batch."
            return [], [_batch_error("too_many_tasks", message, None)], None
        entries: list[tuple[str, dict[str, Any]]] = []
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        model: str | None = None
        for number, raw in lines:
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                line = None
            if not isinstance(line, dict):
                errors.append(_batch_error("invalid_json_line", "This line is not parseable as valid JSON.", number))
                continue
            problem = _openai_line_problem(line, endpoint)
            if problem is not None:
                code, message, param = problem
                errors.append(_batch_error(code, message, number, param))
                continue
            custom_id, body = line["custom_id"], line["body"]
            if custom_id in seen:
                message = (
                    "The custom_id for this request is a duplicate of another request. The "
                    "custom_id parameter must be unique for each request in a batch."
                )
                errors.append(_batch_error("duplicate_custom_id", message, number, "custom_id"))
                continue
            seen.add(custom_id)
            line_model = body.get("model")
            if isinstance(line_model, str) and line_model:
                if model is None:
                    model = line_model
                elif line_model != model:
                    message = (
                        f"The model '{line_model}' does not match the model '{model}' of the "
                        "other requests: a batch holds requests to one model."
                    )
                    errors.append(_batch_error("model_mismatch", message, number, "body.model"))
                    continue
            entries.append((custom_id, body))
        return entries, errors, model

    def _openai_json(
        self, batch: Batch, now: float, phase: Literal["validating", "cancelling"] | None = None
    ) -> dict[str, Any]:
        created = int(batch.created_wall)
        counts = {"total": 0, "completed": 0, "failed": 0}
        out: dict[str, Any] = {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "model": batch.model,
            "errors": None,
            "input_file_id": batch.input_file_id,
            "completion_window": batch.completion_window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": created,
            "in_progress_at": None,
            "expires_at": created + BATCH_WINDOW_SECONDS,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": counts,
            "metadata": batch.metadata,
            "usage": None,
        }
        if phase == "validating":
            return out
        if batch.errors:
            out.update(status="failed", failed_at=created, errors={"object": "list", "data": batch.errors})
            return out
        counts["total"] = len(batch.items)
        out["in_progress_at"] = created
        if batch.cancelled is not None:
            out["cancelling_at"] = int(batch.wall(batch.cancelled))
        if batch.results is None:  # in progress: counts grow as items are answered
            for item in batch.items:
                if item.due <= now and item.fate != "expire":
                    counts["completed" if item.fate == "answer" else "failed"] += 1
            out["status"] = "in_progress"
            return out
        counts["completed"] = batch.outcomes["succeeded"]
        counts["failed"] = batch.outcomes["errored"]
        if phase == "cancelling":
            out["status"] = "cancelling"
            return out
        end = int(batch.wall(batch.ended_at))
        out.update(
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
            usage={
                "input_tokens": batch.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": batch.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": batch.input_tokens + batch.output_tokens,
            },
        )
        if batch.cancelled is not None:
            out.update(status="cancelled", cancelled_at=end)
        elif batch.outcomes["expired"]:
            out.update(status="expired", finalizing_at=end, expired_at=end)
        else:
            out.update(status="completed", finalizing_at=end, completed_at=end)
        return out

    async def _openai_retrieve(self, request: web.Request, _request_id: str) -> web.Response:
        batch = self._get("openai", request.match_info["batch_id"])
        return json_response(self._openai_json(batch, time.monotonic()))

    async def _openai_list(self, request: web.Request, _request_id: str) -> web.Response:
        limit = _int_query(request, "limit", 20, 1, 100)
        now = time.monotonic()
        self._advance_all(now)
        ids = self._order["openai"][::-1]
        page, more = _page(ids, limit, request.query.get("after"), None)
        return json_response(
            {
                "object": "list",
                "data": [self._openai_json(self._batches[batch_id], now) for batch_id in page],
                "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None,
                "has_more": more,
            }
        )

    async def _openai_cancel(self, request: web.Request, _request_id: str) -> web.Response:
        batch = self._get("openai", request.match_info["batch_id"])
        now = time.monotonic()
        if batch.id not in self._open:
            status = self._openai_json(batch, now)["status"]
            raise RequestError(409, f"Cannot cancel a batch with status '{status}'.")
        batch.cancelled = now
        self._host.counters.batches_cancel_requests["openai"] += 1
        self._settle(batch)
        return json_response(self._openai_json(batch, now, phase="cancelling"))

    # -- Anthropic message batches ---------------------------------------------------

    def _read_anthropic_requests(self, requests: Any) -> list[tuple[str, dict[str, Any]]]:
        if requests is None:
            raise RequestError(400, "requests: Field required")
        if not isinstance(requests, list):
            raise RequestError(400, "requests: Input should be a valid list")
        if not requests:
            raise RequestError(400, "requests: List should have at least 1 item after validation, not 0")
        limit = self._config.batch_limit("anthropic")
        if len(requests) > limit:
            message = f"requests: List should have at most {limit} items after validation, not {len(requests)}"
            raise RequestError(400, message)
        entries: list[tuple[str, dict[str, Any]]] = []
        seen: set[str] = set()
        for index, entry in enumerate(requests):
            where = f"requests.{index}"
            if not isinstance(entry, dict):
                raise RequestError(400, f"{where}: Input should be a valid dictionary")
            custom_id = entry.get("custom_id")
            if custom_id is None:
                raise RequestError(400, f"{where}.custom_id: Field required")
            if not isinstance(custom_id, str) or _CUSTOM_ID_RE.fullmatch(custom_id) is None:
                message = f"{where}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
                raise RequestError(400, message)
            params = entry.get("params")
            if params is None:
                raise RequestError(400, f"{where}.params: Field required")
            if not isinstance(params, dict):
                raise RequestError(400, f"{where}.params: Input should be a valid dictionary")
            if custom_id in seen:
                message = (
                    f"{where}.custom_id: duplicate custom_id '{custom_id}'; "
                    "custom_id must be unique within a Message Batch"
                )
                raise RequestError(400, message)
            seen.add(custom_id)
            entries.append((custom_id, params))
        return entries

    async def _anthropic_create(self, request: web.Request, _request_id: str) -> web.Response:
        stats = self._host.counters
        now = time.monotonic()
        try:
            body = await read_json_object(request)
            entries = self._read_anthropic_requests(body.get("requests"))
            items = self._make_items("anthropic", entries, now)
            charges: Counter[str] = Counter()
            for item in items:
                charges[item.model] += item.charge
            problem = self._token_limit_problem("anthropic", charges, now)
            if problem is not None:
                raise self._anthropic_queue_full(problem, now)
        except RequestError:
            stats.batches_rejected["anthropic"] += 1
            raise
        batch = Batch(
            id=f"msgbatch_sim{next(self._ids):020d}",
            api="anthropic",
            created_wall=time.time(),
            created=now,
            ends=now + self._config.batch_delay_seconds,
            items=items,
            charges=dict(charges),
        )
        self._register(batch)
        return json_response(self._anthropic_json(batch, request))

    def _anthropic_queue_full(self, problem: tuple[str, int, int, int], now: float) -> RequestError:
        model, limit, used, requested = problem
        never = requested > limit
        headers = {"x-should-retry": "false"} if never else {}
        wait = self._tokens_free_in("anthropic", model, requested, limit, now)
        headers["retry-after"], headers["retry-after-ms"] = retry_after_header(wait)
        message = (
            f"This batch ({requested} tokens of {model}) would exceed your organization's "
            f"({ORGANIZATION}) limit of {limit} enqueued batch tokens for {model} "
            f"({used} in unfinished batches)."
        )
        return RequestError(429, message, error_type="rate_limit_error", headers=headers)

    def _anthropic_json(
        self, batch: Batch, request: web.Request, phase: Literal["canceling"] | None = None
    ) -> dict[str, Any]:
        ended = batch.results is not None and phase is None
        counts = {"processing": len(batch.items), "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if ended:
            counts["processing"] = 0
            for outcome in ("succeeded", "errored", "canceled", "expired"):
                counts[outcome] = batch.outcomes[outcome]
            status = "ended"
        else:
            status = "in_progress" if batch.cancelled is None else "canceling"
        created = batch.created_wall
        origin = str(request.url.origin())
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "ended_at": rfc3339(batch.wall(batch.ended_at)) if ended else None,
            "created_at": rfc3339(created),
            "expires_at": rfc3339(created + BATCH_WINDOW_SECONDS),
            "archived_at": None,
            "cancel_initiated_at": None if batch.cancelled is None else rfc3339(batch.wall(batch.cancelled)),
            "results_url": f"{origin}/v1/messages/batches/{batch.id}/results" if ended else None,
        }

    async def _anthropic_retrieve(self, request: web.Request, _request_id: str) -> web.Response:
        batch = self._get("anthropic", request.match_info["batch_id"])
        return json_response(self._anthropic_json(batch, request))

    async def _anthropic_list(self, request: web.Request, _request_id: str) -> web.Response:
        limit = _int_query(request, "limit", 20, 1, 1000)
        self._advance_all(time.monotonic())
        ids = self._order["anthropic"][::-1]
        page, more = _page(ids, limit, request.query.get("after_id"), request.query.get("before_id"))
        return json_response(
            {
                "data": [self._anthropic_json(self._batches[batch_id], request) for batch_id in page],
                "has_more": more,
                "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None,
            }
        )

    async def _anthropic_cancel(self, request: web.Request, _request_id: str) -> web.Response:
        batch = self._get("anthropic", request.match_info["batch_id"])
        if batch.id not in self._open:
            raise RequestError(400, f"Message Batch {batch.id} has already ended and cannot be canceled.")
        batch.cancelled = time.monotonic()
        self._host.counters.batches_cancel_requests["anthropic"] += 1
        self._settle(batch)
        return json_response(self._anthropic_json(batch, request, phase="canceling"))

    async def _anthropic_delete(self, request: web.Request, _request_id: str) -> web.Response:
        batch = self._get("anthropic", request.match_info["batch_id"])
        if batch.id in self._open:
            message = f"Message Batch {batch.id} is still processing: cancel it and let it end before deleting it."
            raise RequestError(400, message)
        del self._batches[batch.id]
        self._order["anthropic"].remove(batch.id)
        return json_response({"id": batch.id, "type": "message_batch_deleted"})

    async def _anthropic_results(self, request: web.Request, _request_id: str) -> web.Response:
        batch = self._get("anthropic", request.match_info["batch_id"])
        if batch.results is None:
            raise RequestError(400, f"Message Batch {batch.id} has not ended yet: no results to stream.")
        lines: list[bytes] = []
        for result in batch.results:
            if result.outcome == "succeeded":
                entry: dict[str, Any] = {"type": "succeeded", "message": result.body}
            elif result.outcome == "errored":
                entry = {"type": "errored", "error": result.body}
            else:
                entry = {"type": result.outcome}
            lines.append(orjson.dumps({"custom_id": result.custom_id, "result": entry}))
        body = b"\n".join(lines) + b"\n" if lines else b""
        return web.Response(body=body, content_type="application/x-jsonl")
