"""Each role declares what it consumes and produces, consistent with the topology's flows;
no role imports another, and only streams/runtime/ knows Faust."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from streams.roles import MODULES, build_role
from streams.runtime.worker import FaustWorker
from topologies.config import load_settings
from topologies.topics import ALL_ROLES, topology_of

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("strategy", ["learned", "llm"])
def test_every_role_consumes_and_produces_what_its_flow_says(strategy: str) -> None:
    settings = load_settings(environ={}, overrides={"classifier": {"strategy": strategy}})
    flows = {flow.role: flow for flow in topology_of(settings).flows()}
    assert set(MODULES) == set(ALL_ROLES)
    for role in ALL_ROLES:
        spec = build_role(FaustWorker(settings, role))
        flow = flows[role]
        assert spec.consumes.name in flow.reads, role
        assert {topic.name for topic in spec.produces} <= set(flow.writes), role
        if spec.providers is not None:  # 429 back-off is published and followed
            assert topology_of(settings).throttles.name in flow.writes, role


def test_no_role_imports_another() -> None:
    roles = sorted((ROOT / "streams" / "roles").glob("*.py"))
    names = {f"streams.roles.{p.stem}" for p in roles if p.stem != "__init__"}
    for path in roles:
        if path.stem == "__init__":
            continue  # the registry
        others = (_imports(path) & names) - {f"streams.roles.{path.stem}"}
        assert not others, f"{path.name} imports {others}"


def test_only_the_runtime_imports_faust() -> None:
    outside = []
    for path in sorted((ROOT / "streams").rglob("*.py")):
        if "runtime" in path.relative_to(ROOT / "streams").parts:
            continue
        if any(name == "faust" or name.startswith("faust.") for name in _imports(path)):
            outside.append(str(path.relative_to(ROOT)))
    assert outside == []
