"""Whether a worker's model providers answer, for ``/ready``.

A readiness probe comes every few seconds, so it must not make a model call (that costs
money and rate-limit budget) nor wait on the network. :class:`ProviderProbe` asks each
provider's API for its model list (``GET <base>/models``, free on both real APIs) in the
background and ``/ready`` reads the last answer.

"Answers" means: an HTTP response below 500 other than 401/403. The simulator has no
model list and answers 404, which counts: the server is there. A rejected key (401/403),
a 5xx, a timeout or a refused connection does not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import mode

from streams.providers.registry import Endpoint

log = logging.getLogger(__name__)

DEFAULT_BASE_URLS = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}


def models_url(endpoint: Endpoint) -> str:
    base = (endpoint.base_url or DEFAULT_BASE_URLS[endpoint.provider]).rstrip("/")
    # OpenAI's base URL includes /v1 (as the SDK takes it); Anthropic's does not.
    return f"{base}/models" if endpoint.provider == "openai" else f"{base}/v1/models"


def auth_headers(endpoint: Endpoint) -> dict[str, str]:
    if endpoint.provider == "openai":
        return {"Authorization": f"Bearer {endpoint.api_key}"}
    return {"x-api-key": endpoint.api_key, "anthropic-version": "2023-06-01"}


class ProviderProbe(mode.Service):
    """Checks every provider at start, then every ``interval`` seconds (``retry`` while
    one does not answer). :meth:`not_ready` is what ``/ready`` calls."""

    def __init__(
        self,
        endpoints: Mapping[str, Endpoint],
        interval: float = 30.0,
        retry: float = 1.0,
        timeout: float = 5.0,
        **kwargs: Any,
    ) -> None:
        self.endpoints = dict(endpoints)
        self.interval = interval
        self.retry = retry
        self.timeout = timeout
        # provider -> why it does not answer; every provider starts unchecked
        self.problems: dict[str, str] = dict.fromkeys(self.endpoints, "not checked yet")
        super().__init__(**kwargs)

    def not_ready(self) -> str | None:
        if not self.problems:
            return None
        return "providers not answering: " + "; ".join(
            f"{name}: {why}" for name, why in sorted(self.problems.items())
        )

    async def check_once(self, http: aiohttp.ClientSession) -> None:
        results = await asyncio.gather(*(self._check(http, e) for e in self.endpoints.values()))
        for name, problem in zip(self.endpoints, results, strict=True):
            if problem is None:
                if self.problems.pop(name, None) is not None:
                    log.info("provider %s answers", name)
            else:
                if self.problems.get(name) != problem:
                    log.warning("provider %s does not answer: %s", name, problem)
                self.problems[name] = problem

    async def _check(self, http: aiohttp.ClientSession, endpoint: Endpoint) -> str | None:
        try:
            async with http.get(models_url(endpoint), headers=auth_headers(endpoint)) as resp:
                if resp.status in (401, 403):
                    return f"HTTP {resp.status}: the API key was rejected"
                if resp.status >= 500:
                    return f"HTTP {resp.status}"
                return None
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    @mode.Service.task
    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while not self.should_stop:
                await self.check_once(http)
                await self.sleep(self.retry if self.problems else self.interval)
