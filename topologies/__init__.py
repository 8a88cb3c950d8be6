"""Topics, keys, partitions and configuration: the single source of truth."""

from topologies.config import ConfigError, Settings, load_settings
from topologies.topics import ALL_ROLES, Flow, TopicSpec, Topology, parse_roles, tier_role

__all__ = [
    "ALL_ROLES",
    "ConfigError",
    "Flow",
    "Settings",
    "TopicSpec",
    "Topology",
    "load_settings",
    "parse_roles",
    "tier_role",
]
