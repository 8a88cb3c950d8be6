"""Where each provider is reached (real API or the simulator) and its pooled clients."""

from __future__ import annotations

import os
import platform
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import stamina

from schemas.models import ChatMessage
from streams.providers.anthropic_client import AnthropicClient
from streams.providers.base import Completion, ModelClient, ProviderError
from streams.providers.openai_client import OpenAIClient
from streams.providers.pool import ClientPool, PoolStats
from streams.ratelimit import Throttles
from topologies.config import ProviderName, ProviderSettings, Settings

# The simulator accepts any non-empty key; this one is obviously not a secret.
SIMULATOR_API_KEY = "tierstream-simulator"


@dataclass(frozen=True)
class Endpoint:
    provider: ProviderName
    base_url: str | None
    simulated: bool
    api_key: str = field(repr=False)


def read_api_key(settings: ProviderSettings, environ: Mapping[str, str]) -> str | None:
    """The key from its environment variable, else from its mounted file (Kubernetes Secret)."""
    key = environ.get(settings.api_key_env, "").strip()
    if key:
        return key
    if settings.api_key_file is not None and Path(settings.api_key_file).is_file():
        return Path(settings.api_key_file).read_text().strip() or None
    return None


def simulator_base_url(settings: Settings, provider: ProviderName) -> str:
    root = f"http://{settings.simulator.host}:{settings.simulator.port}"
    return f"{root}/v1" if provider == "openai" else root


def resolve_endpoint(
    settings: Settings, provider: ProviderName, environ: Mapping[str, str] | None = None
) -> Endpoint:
    environ = os.environ if environ is None else environ
    conf = settings.providers[provider]
    key = read_api_key(conf, environ)
    simulate = conf.use_simulator == "always" or (conf.use_simulator == "auto" and key is None)
    if simulate:
        return Endpoint(provider, simulator_base_url(settings, provider), True, SIMULATOR_API_KEY)
    if key is None:
        raise ValueError(
            f"providers.{provider}: no API key in ${conf.api_key_env}"
            + (f" or {conf.api_key_file}" if conf.api_key_file else "")
            + " and use_simulator is 'never'"
        )
    return Endpoint(provider, conf.base_url, False, key)


_CLIENTS = {"openai": OpenAIClient, "anthropic": AnthropicClient}


@dataclass(frozen=True, slots=True)
class Attempted:
    completion: Completion
    attempts: int


def _backoff_hook(exc: Exception) -> bool | float:
    """Retry transient provider errors; wait what the server asked for when it said."""
    if not isinstance(exc, ProviderError) or not exc.retryable:
        return False
    return exc.retry_after if exc.retry_after is not None else True


class ProviderRegistry:
    """One client pool per provider that the configured tiers use."""

    def __init__(self, settings: Settings, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.endpoints: dict[str, Endpoint] = {}
        self.pools: dict[str, ClientPool[ModelClient]] = {}
        # 429 back-off per provider model, shared by every call this process makes.
        self.throttles = Throttles(dict(settings.providers))
        max_in_flight = settings.worker.max_concurrent_tasks
        # The SDKs name the platform in a header, and Python learns the processor from a
        # `uname -p` child process: resolved (and cached by Python) here, at start, so that
        # no model call forks the worker.
        platform.platform()
        for provider in sorted({t.provider for t in settings.tiers.values()}):
            endpoint = resolve_endpoint(settings, provider, environ)
            conf = settings.providers[provider]
            self.endpoints[provider] = endpoint

            def factory(endpoint: Endpoint = endpoint, conf: ProviderSettings = conf) -> ModelClient:
                # SDK retries off: ours (below) count attempts and share one policy.
                return _CLIENTS[endpoint.provider](
                    endpoint.api_key, endpoint.base_url, conf.timeout_seconds, 0
                )

            pool = conf.pool
            self.pools[provider] = ClientPool(
                provider,
                factory,
                lambda client: client.close(),
                min_size=pool.min_size,
                max_size=pool.size_limit(max_in_flight),
                max_calls_per_client=pool.max_calls_per_client,
                recycle_after=pool.recycle_after_calls,
                idle_timeout=pool.idle_timeout_seconds,
            )

    @property
    def idle_check_seconds(self) -> float:
        """How often idle clients are looked for: a quarter of the shortest idle timeout,
        at most every minute."""
        timeouts = [pool.idle_timeout for pool in self.pools.values()]
        return min([60.0, *(max(0.5, t / 4) for t in timeouts)])

    async def start(self) -> None:
        for pool in self.pools.values():
            await pool.start()

    async def stop(self) -> None:
        await self.close()

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()

    async def complete(
        self,
        provider: str,
        model: str,
        messages: list[ChatMessage],
        max_output_tokens: int,
        before_attempt: Callable[[int], Awaitable[None]] | None = None,
    ) -> Attempted:
        """Call the model, retrying transient failures with exponential backoff and jitter.

        ``before_attempt(n)`` runs before attempt n (the rate limiter: every attempt
        counts against the provider's limit). Raises :class:`ProviderError` (with
        ``attempts`` set) when the call cannot succeed.
        """
        conf = self.settings.providers[provider]  # type: ignore[index]
        throttle = self.throttles.get(provider, model)
        attempts = 0

        async def attempt() -> Attempted:
            nonlocal attempts
            attempts += 1
            if before_attempt is not None:
                await before_attempt(attempts)
            else:
                await throttle.wait()
            try:
                async with self.pools[provider].acquire() as client:
                    completion = await client.complete(model, messages, max_output_tokens)
            except ProviderError as exc:
                if exc.status == 429:  # slow every call down, here and in every replica
                    self.throttles.on_rate_limited(provider, model, exc.retry_after)
                raise
            return Attempted(completion, attempts)

        try:
            # The first attempt runs outside stamina: setting up its retry context costs
            # about as much CPU as the rest of this method, and most calls succeed at once.
            try:
                return await attempt()
            except ProviderError as exc:
                if conf.max_retries == 0 or _backoff_hook(exc) is False:  # a wait of 0.0 still retries
                    raise
                first_failure: ProviderError | None = exc
            # Stamina sees that failure as its own first attempt, so the retries get its
            # backoff, the server's Retry-After and its retry hooks as any failure would.
            async for retrying in stamina.retry_context(
                on=_backoff_hook,
                attempts=conf.max_retries + 1,
                timeout=None,
                wait_initial=conf.retry_initial_seconds,
                wait_max=conf.retry_max_seconds,
            ):
                with retrying:
                    if first_failure is not None:
                        failure, first_failure = first_failure, None
                        raise failure
                    return await attempt()
        except ProviderError as exc:
            exc.attempts = attempts
            raise
        raise AssertionError("unreachable: stamina either returns or raises")

    def stats(self) -> list[PoolStats]:
        return [pool.stats() for pool in self.pools.values()]
