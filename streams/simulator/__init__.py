"""``tierstream provider-sim``: a local OpenAI + Anthropic API look-alike.

The official async SDKs work against it unmodified::

    async with ProviderSimulator(SimulatorConfig(port=0, latency_ms_median=0)) as sim:
        client = openai.AsyncOpenAI(base_url=sim.openai_base_url, api_key="sk-sim")
        claude = anthropic.AsyncAnthropic(base_url=sim.anthropic_base_url, api_key="sk-sim")

Test directives in the last user message: ``#sim:reply=<text>`` (exact answer, to end
of line) and ``#sim:status=<code>`` (answer that HTTP status with the provider's error
body). A system prompt containing :data:`META_ROUTER_MARKER` gets a one-word tier.

Both providers' batch APIs are served too (OpenAI files + batches, Anthropic message
batches; see :mod:`streams.simulator.batches`), with the batch directives
``#sim:batch-error[=<code>]`` and ``#sim:batch-expire``.
"""

from .config import RATE_WINDOW_SECONDS, ModelRateLimit, SimulatorConfig
from .content import META_ROUTER_MARKER, route_tier
from .server import ProviderSimulator, run, serve_until_signalled

__all__ = [
    "META_ROUTER_MARKER",
    "RATE_WINDOW_SECONDS",
    "ModelRateLimit",
    "ProviderSimulator",
    "SimulatorConfig",
    "route_tier",
    "run",
    "serve_until_signalled",
]
