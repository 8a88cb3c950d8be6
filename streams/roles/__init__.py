"""The roles, one module each: what each consumes, produces and needs (a
:class:`streams.runtime.types.RoleSpec`), built from the worker that runs it. Roles see
the runtime's interfaces only, never Faust, and no role imports another.

A process imports only the module of the role it runs: the classifier's learned router
brings scikit-learn and SciPy, which the other roles have no use for.
"""

from __future__ import annotations

import importlib
from functools import partial

from schemas.models import Tier
from streams.runtime.types import RoleSpec, Worker
from topologies.topics import BATCH_ROLE, CLASSIFIER_ROLE, COST_ROLE, Role, tier_role

MODULES: dict[Role, str] = {
    CLASSIFIER_ROLE: "streams.roles.classifier",
    COST_ROLE: "streams.roles.cost",
    BATCH_ROLE: "streams.roles.batch",
    **{tier_role(t): "streams.roles.tier" for t in Tier},
}


def build_role(worker: Worker) -> RoleSpec:
    """The spec of ``worker.role``."""
    try:
        module = importlib.import_module(MODULES[worker.role])
    except KeyError:
        raise ValueError(f"unknown role {worker.role!r}; roles: {', '.join(MODULES)}") from None
    tiers = {tier_role(t): t for t in Tier}
    build = partial(module.build, tier=tiers[worker.role]) if worker.role in tiers else module.build
    return build(worker)


__all__ = ["MODULES", "Role", "build_role"]
