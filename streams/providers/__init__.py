"""Model providers behind one interface: the official OpenAI and Anthropic async SDKs."""

from streams.providers.base import Completion, ModelClient, ProviderError
from streams.providers.pool import ClientPool, PoolStats
from streams.providers.registry import Attempted, Endpoint, ProviderRegistry, resolve_endpoint

__all__ = [
    "Attempted",
    "ClientPool",
    "Completion",
    "Endpoint",
    "ModelClient",
    "PoolStats",
    "ProviderError",
    "ProviderRegistry",
    "resolve_endpoint",
]
