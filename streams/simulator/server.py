"""The aiohttp application behind ``tierstream provider-sim``.

Routes: ``POST /v1/chat/completions`` (OpenAI), ``POST /v1/messages`` (Anthropic),
``GET /stats``, ``POST /stats/reset``, ``GET /health``, and both providers' batch APIs
(OpenAI files and batches, Anthropic message batches: see :mod:`.batches`).

Order of checks for an API call: API key (401) -> JSON body and required fields
(400) -> ``stream`` (400, unsupported) -> ``#sim:status`` directive -> random error
injection (``error_rate``) -> 429 bursts (``burst_429_*``) -> rate limits (429) -> admission -> random hang
(``timeout_rate``) or sampled latency -> 200. Rejected and failed calls do not consume
rate-limit quota, so "admitted" in the window counters means "answered 200" (unless the
client hung up while waiting).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import signal
import time
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web

from .batches import BatchQueue
from .config import SimulatorConfig
from .content import Answer, AnswerMaker, find_retry_after_directive, find_status_directive
from .limiter import ModelWindow, Quota, Rejection, retry_after_header
from .responses import JSON, error_response, json_response, read_json_object, request_error_response
from .stats import SimulatorStats
from .wire import (
    ORGANIZATION,
    STREAM_UNSUPPORTED,
    AnthropicWire,
    OpenAIWire,
    ParsedRequest,
    RequestError,
    Wire,
    format_duration,
)

log = logging.getLogger(__name__)

_MAX_BODY_BYTES = 32 * 1024 * 1024
_INJECTED_STATUSES = {"openai": (500, 503), "anthropic": (500, 529)}
_INJECTED_MESSAGES = {
    500: "The server had an error while processing your request (injected by provider-sim).",
    503: "The engine is currently overloaded, please try again later (injected by provider-sim).",
    529: "Overloaded (injected by provider-sim).",
}


class ProviderSimulator:
    """An in-process OpenAI + Anthropic look-alike; ``async with`` starts and stops it."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config if config is not None else SimulatorConfig()
        self._rng = random.Random(self.config.seed)
        self._latency = self.config.lognormal_params()
        self._answers = AnswerMaker(self.config.output_tokens_min, self.config.output_tokens_max)
        self._openai = OpenAIWire(self.config.default_max_tokens)
        self._anthropic = AnthropicWire()
        self._serial = itertools.count(1)
        self._stats = SimulatorStats()
        self._windows: dict[tuple[str, str], ModelWindow] = {}
        self._batches = BatchQueue(self, self._openai, self._anthropic)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._started = time.monotonic()  # 429 bursts are timed from here

    # -- lifecycle ---------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY_BYTES)
        app.router.add_post("/v1/chat/completions", self._openai_handler)
        app.router.add_post("/v1/messages", self._anthropic_handler)
        app.router.add_get("/stats", self._stats_handler)
        app.router.add_post("/stats/reset", self._reset_handler)
        app.router.add_get("/health", self._health_handler)
        self._batches.add_routes(app.router)
        return app

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("provider simulator already started")
        runner = web.AppRunner(
            self.make_app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=0.5,
            handler_cancellation=True,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port, backlog=2048)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        log.info("provider-sim listening on %s", self.base_url)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> ProviderSimulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The bound port (the configured one until ``start()``)."""
        return self._port if self._port is not None else self.config.port

    @property
    def base_url(self) -> str:
        host = self.config.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.base_url

    # -- stats -------------------------------------------------------------------

    @property
    def counters(self) -> SimulatorStats:
        """The live counters (replaced by :meth:`reset_stats`)."""
        return self._stats

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        enqueued = self._batches.enqueued_tokens(now)  # settles the batches that ended
        snapshot = self._stats.snapshot(self._windows, now)
        snapshot["batches"] = self._stats.batch_snapshot(enqueued)
        return snapshot

    def reset_stats(self) -> None:
        """Zero every counter and forget the rate-limit windows (and their peaks); batches,
        files and their enqueued tokens are state, not counters, and stay."""
        in_flight = self._stats.in_flight
        self._stats = SimulatorStats()
        self._stats.in_flight = self._stats.peak_in_flight = in_flight
        self._windows = {}

    async def _stats_handler(self, _request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats()), content_type=JSON)

    async def _reset_handler(self, _request: web.Request) -> web.Response:
        self.reset_stats()
        return web.Response(body=b'{"reset":true}', content_type=JSON)

    async def _health_handler(self, _request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type=JSON)

    # -- API calls ---------------------------------------------------------------

    async def _openai_handler(self, request: web.Request) -> web.Response:
        return await self._handle(request, self._openai)

    async def _anthropic_handler(self, request: web.Request) -> web.Response:
        return await self._handle(request, self._anthropic)

    async def _handle(self, request: web.Request, wire: Wire) -> web.Response:
        self._stats.enter(wire.name)
        status = 500
        try:
            response = await self._serve(request, wire)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499  # the client went away (e.g. timed out during a hang)
            raise
        finally:
            self._stats.leave(status)

    def _window(self, api: str, model: str) -> ModelWindow:
        key = (api, model)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = ModelWindow(self.config.limits_for(model))
        return window

    def _latency_s(self, output_tokens: int) -> float:
        if self._latency is None:
            return 0.0
        mu, sigma = self._latency
        if sigma > 0:
            base_ms = self._rng.lognormvariate(mu, sigma)
        else:
            base_ms = self.config.latency_ms_median
        return (base_ms + self.config.latency_ms_per_output_token * output_tokens) / 1000.0

    async def _serve(self, request: web.Request, wire: Wire) -> web.Response:
        serial = next(self._serial)
        request_id = f"req_sim{serial:020d}"
        if not wire.authenticated(request.headers):
            return error_response(wire, request_id, 401, wire.missing_key_message)
        try:
            parsed = wire.parse(await read_json_object(request))
        except RequestError as exc:
            return request_error_response(wire, request_id, exc)
        self._stats.by_model[parsed.model] += 1
        if parsed.stream:
            return error_response(wire, request_id, 400, STREAM_UNSUPPORTED, param="stream")
        directive = find_status_directive(parsed.user_text)
        if directive is not None:
            self._stats.status_directives += 1
            retry_after = find_retry_after_directive(parsed.user_text)
            return self._directive_error(wire, request_id, directive, 1.0 if retry_after is None else retry_after)
        config = self.config
        if config.error_rate and self._rng.random() < config.error_rate:
            self._stats.errors_injected += 1
            code = self._rng.choice(_INJECTED_STATUSES[wire.name])
            return error_response(wire, request_id, code, _INJECTED_MESSAGES[code])
        if self._in_429_burst():
            self._stats.bursts_429 += 1
            return self._burst_429(wire, request_id)
        window = self._window(wire.name, parsed.model)
        verdict = window.try_admit(time.monotonic(), parsed.input_tokens + parsed.max_tokens)
        if isinstance(verdict, Rejection):
            self._stats.rate_limited += 1
            return self._rate_limited(wire, request_id, parsed, verdict)
        return await self._answer(wire, request_id, serial, parsed, verdict)

    async def _answer(
        self, wire: Wire, request_id: str, serial: int, parsed: ParsedRequest, quota: Quota
    ) -> web.Response:
        config = self.config
        answer = self.answer_for(parsed)
        if config.timeout_rate and self._rng.random() < config.timeout_rate:
            self._stats.timeouts_injected += 1
            await asyncio.sleep(config.hang_seconds)
        else:
            delay = self._latency_s(answer.output_tokens)
            if delay > 0:
                await asyncio.sleep(delay)
        self._stats.input_tokens += parsed.input_tokens
        self._stats.output_tokens += answer.output_tokens
        headers = wire.quota_headers(quota)
        headers[wire.request_id_header] = request_id
        return json_response(wire.response(parsed, answer, serial), headers=headers)

    def answer_for(self, parsed: ParsedRequest) -> Answer:
        """The deterministic answer to a request: the online routes and the batches use it."""
        return self._answers.answer(
            model=parsed.model,
            texts=parsed.texts,
            user_text=parsed.user_text,
            system_text=parsed.system_text,
            max_tokens=parsed.max_tokens,
        )

    def next_serial(self) -> int:
        """A fresh serial for a response id and its request id (``req_sim<serial>``)."""
        return next(self._serial)


    def _in_429_burst(self) -> bool:
        every = self.config.burst_429_every_seconds
        if every is None:
            return False
        return (time.monotonic() - self._started) % every < self.config.burst_429_seconds

    def _burst_429(self, wire: Wire, request_id: str) -> web.Response:
        return self._too_many(
            wire, request_id, "Simulated 429 burst (provider-sim fault injection).",
            self.config.burst_429_retry_after_seconds,
        )

    def _directive_error(self, wire: Wire, request_id: str, status: int, retry_after: float) -> web.Response:
        message = f"Simulated HTTP {status} (#sim:status directive)."
        if status != 429:
            return error_response(wire, request_id, status, message)
        return self._too_many(wire, request_id, message, retry_after)

    def _too_many(self, wire: Wire, request_id: str, message: str, retry_after: float) -> web.Response:
        seconds, millis = retry_after_header(retry_after)
        return error_response(
            wire,
            request_id,
            429,
            message,
            error_type=wire.rate_limit_type("requests"),
            code="rate_limit_exceeded",
            headers={"retry-after": seconds, "retry-after-ms": millis},
        )

    def _rate_limited(
        self, wire: Wire, request_id: str, parsed: ParsedRequest, rejection: Rejection
    ) -> web.Response:
        seconds, millis = retry_after_header(rejection.retry_after_s)
        headers = wire.quota_headers(rejection.quota)
        headers["retry-after"] = seconds
        headers["retry-after-ms"] = millis
        if rejection.never_fits:
            headers["x-should-retry"] = "false"
        return error_response(
            wire,
            request_id,
            429,
            _rate_limit_message(wire, parsed.model, rejection),
            error_type=wire.rate_limit_type(rejection.kind),
            code="rate_limit_exceeded",
            headers=headers,
        )


def _rate_limit_message(wire: Wire, model: str, rejection: Rejection) -> str:
    unit = "requests" if rejection.kind == "requests" else "tokens"
    if wire.name == "openai":
        label = "requests per min (RPM)" if unit == "requests" else "tokens per min (TPM)"
        where = f"{model} in organization {ORGANIZATION} on {label}"
        if rejection.never_fits:
            return (
                f"Request too large for {where}: Limit {rejection.limit}, Requested "
                f"{rejection.requested}. The input or output tokens must be reduced in order "
                "to run successfully."
            )
        return (
            f"Rate limit reached for {where}: Limit {rejection.limit}, Used {rejection.used}, "
            f"Requested {rejection.requested}. Please try again in "
            f"{format_duration(rejection.retry_after_s)}."
        )
    if rejection.never_fits:
        return (
            f"This request ({rejection.requested} tokens) exceeds the rate limit of "
            f"{rejection.limit} {unit} per minute for {model}; it can never be admitted."
        )
    return (
        f"This request would exceed the rate limit for your organization "
        f"({ORGANIZATION}) of {rejection.limit} {unit} per minute for {model}. "
        "For details, refer to: https://docs.claude.com/en/api/rate-limits."
    )


async def serve_until_signalled(config: SimulatorConfig) -> None:
    """Serve until SIGINT or SIGTERM, then shut down cleanly."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    simulator = ProviderSimulator(config)
    try:
        await simulator.start()
        print(
            f"provider-sim listening on {simulator.base_url} "
            f"(openai base_url {simulator.openai_base_url}, "
            f"anthropic base_url {simulator.anthropic_base_url})",
            flush=True,
        )
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await simulator.stop()


def run(config: SimulatorConfig) -> None:
    """Blocking entry point for ``tierstream provider-sim``."""
    asyncio.run(serve_until_signalled(config))
