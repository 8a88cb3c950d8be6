"""The least-privilege ACL example is derived from the topology and stays current."""

from __future__ import annotations

from pathlib import Path

from topologies.acls import acls_script, role_acls
from topologies.config import load_settings
from topologies.topics import ALL_ROLES, Topology

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = load_settings(environ={})
TOPOLOGY = Topology(SETTINGS)


def grants(role: str) -> dict[str, set[str]]:
    principal = f"User:tierstream-{role}"
    return {
        acl.resource: set(acl.operations)
        for acl in role_acls(TOPOLOGY, "tierstream")
        if acl.principal == principal and acl.resource_type == "topic" and acl.pattern == "literal"
    }


def test_committed_example_matches_the_topology() -> None:
    committed = (ROOT / "deploy/kafka/acls.sh").read_text()
    assert committed == acls_script(TOPOLOGY, SETTINGS.app_id), "regenerate: tierstream acls > deploy/kafka/acls.sh"


def test_each_role_reads_and_writes_only_its_flow() -> None:
    for flow in TOPOLOGY.flows():
        topics = grants(flow.role)
        assert set(topics) == set(flow.reads) | set(flow.writes), flow.role
        assert {t for t, ops in topics.items() if "Write" in ops} == set(flow.writes), flow.role
        assert {t for t, ops in topics.items() if "Read" in ops} == set(flow.reads), flow.role
        assert not any("Create" in ops or "Delete" in ops or "Alter" in ops for ops in topics.values())


def test_examples_of_what_roles_may_not_do() -> None:
    requests, results = TOPOLOGY.requests.name, TOPOLOGY.results.name
    assert "Write" not in grants("classifier").get(requests, set()), "the classifier must not write its input"
    assert results not in grants("classifier")
    assert all(requests not in grants(role) for role in ALL_ROLES if role != "classifier")
    assert "Write" not in grants("tier-nano").get(TOPOLOGY.spend.name, set()), "only the cost role writes spend"


def test_the_roles_that_call_models_share_the_throttles_topic() -> None:
    throttles = TOPOLOGY.throttles.name
    for role in ("tier-nano", "tier-standard", "tier-premium"):
        assert grants(role)[throttles] == {"Describe", "Read", "Write"}, role
    assert throttles not in grants("cost") and throttles not in grants("classifier")  # no model calls
    llm = Topology(load_settings(environ={"TIERSTREAM__CLASSIFIER__STRATEGY": "llm"}))
    classifier = {a.resource: set(a.operations) for a in role_acls(llm, "tierstream") if a.principal == "User:tierstream-classifier"}
    assert classifier[throttles] == {"Describe", "Read", "Write"}  # its routing calls back off too


def test_each_role_has_its_own_group_and_faust_internal_topics() -> None:
    acls = role_acls(TOPOLOGY, "tierstream")
    for role in ALL_ROLES:
        group = TOPOLOGY.consumer_group("tierstream", role)
        mine = [a for a in acls if a.principal == f"User:tierstream-{role}"]
        assert [a.resource for a in mine if a.resource_type == "group"] == [group]
        assert [a.resource for a in mine if a.pattern == "prefixed"] == [f"{group}-"]
