"""The roles, one module each: what each consumes, produces and needs (a
:class:`streams.runtime.types.RoleSpec`), built from the worker that runs it. Roles see
the runtime's interfaces only, never Faust, and no role imports another."""

from __future__ import annotations

from functools import partial

from schemas.models import Tier
from streams.roles import classifier, cost, tier
from streams.runtime.types import RoleSpec, Worker
from topologies.topics import CLASSIFIER_ROLE, COST_ROLE, Role, tier_role

BUILDERS = {
    CLASSIFIER_ROLE: classifier.build,
    COST_ROLE: cost.build,
    **{tier_role(t): partial(tier.build, tier=t) for t in Tier},
}


def build_role(worker: Worker) -> RoleSpec:
    """The spec of ``worker.role``."""
    try:
        build = BUILDERS[worker.role]
    except KeyError:
        raise ValueError(f"unknown role {worker.role!r}; roles: {', '.join(BUILDERS)}") from None
    return build(worker)


__all__ = ["BUILDERS", "Role", "build_role"]
