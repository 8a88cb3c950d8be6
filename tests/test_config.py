"""Unit tests for the configuration (topologies/config.py, default.yaml) and the topology
(topologies/topics.py). No broker needed; the environment is always passed explicitly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas.models import (
    AgentRequest,
    BatchJob,
    CostEvent,
    DeadLetter,
    GuardrailEvent,
    SpendSnapshot,
    ThrottleEvent,
    Tier,
    TieredRequest,
)
from topologies.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    Settings,
    env_overrides,
    load_settings,
)
from topologies.topics import ALL_ROLES, Topology, parse_roles, tier_role

# --------------------------------------------------------------------------- helpers


def default_tree() -> dict[str, Any]:
    """default.yaml as a plain dict, to derive (possibly broken) config files from."""
    tree = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    assert isinstance(tree, dict)
    return tree


def write_config(tmp_path: Path, tree: Any, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def config_error(**kwargs: Any) -> str:
    """The message of the ConfigError that load_settings must raise."""
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- defaults


def test_packaged_default_loads_with_documented_values() -> None:
    settings = load_settings(environ={})

    assert isinstance(settings, Settings)
    assert settings.app_id == "tierstream"
    assert {t: (m.provider, m.model) for t, m in settings.tiers.items()} == {
        Tier.NANO: ("openai", "gpt-4o-mini"),
        Tier.STANDARD: ("anthropic", "claude-sonnet-4-6"),
        Tier.PREMIUM: ("openai", "o3"),
    }
    guard = settings.cost_guardrails
    assert (
        guard.max_cost_per_workflow_usd,
        guard.max_cost_per_hour_usd,
        guard.alert_threshold_usd,
        guard.workflow_idle_expiry_seconds,
    ) == (1.0, 50.0, 40.0, 86_400)
    assert {
        name: (r.requests_per_minute, r.tokens_per_minute, r.burst)
        for name, r in settings.rate_limits.items()
    } == {
        "researcher": (600, 1_000_000, 50),
        "analyst": (300, 2_000_000, 20),
        "writer": (300, 1_500_000, 20),
    }
    assert set(settings.providers) == {"openai", "anthropic"}
    assert settings.providers["openai"].api_key_env == "OPENAI_API_KEY"
    assert settings.providers["anthropic"].api_key_env == "ANTHROPIC_API_KEY"
    assert {k: v.min_tier for k, v in settings.agent_types.items()} == {
        "router": Tier.NANO,
        "researcher": Tier.STANDARD,
        "analyst": Tier.STANDARD,
        "writer": Tier.NANO,
        "planner": Tier.STANDARD,
    }
    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert settings.kafka.topic_prefix == "agent"
    assert settings.kafka.max_message_bytes == 1_048_576
    assert settings.worker.max_concurrent_tasks == 64
    assert settings.worker.max_request_bytes == 262_144
    assert settings.prices == {}


def test_explicit_path_to_the_default_equals_the_implicit_default() -> None:
    assert load_settings(DEFAULT_CONFIG_PATH, environ={}) == load_settings(environ={})


def test_broker_url_is_in_faust_form() -> None:
    settings = load_settings(environ={"KAFKA_BOOTSTRAP_SERVERS": "a:9092, b:9093,"})
    assert settings.kafka.broker_url == "kafka://a:9092;kafka://b:9093"


# --------------------------------------------------------------------------- invalid values


@pytest.mark.parametrize(
    ("overrides", "path", "detail"),
    [
        ({"tiers": {"nano": {"provider": "azure"}}}, "tiers.nano.provider", "'openai' or 'anthropic'"),
        ({"tiers": {"premium": {"model": ""}}}, "tiers.premium.model", "at least 1 character"),
        (
            {"cost_guardrails": {"max_cost_per_hour_usd": -1}},
            "cost_guardrails.max_cost_per_hour_usd",
            "greater than or equal to 0",
        ),
        (
            {"rate_limits": {"writer": {"requests_per_minute": 0}}},
            "rate_limits.writer.requests_per_minute",
            "greater than 0",
        ),
        (
            {"kafka": {"partitions": {"requests": 0}}},
            "kafka.partitions.requests",
            "greater than 0",
        ),
        ({"worker": {"log_level": "loud"}}, "worker.log_level", "'debug'"),
        ({"worker": {"gc_thresholds": [700, 0, 10]}}, "worker.gc_thresholds.1", "greater than 0"),
        ({"kafka": {"topic_prefix": "has space"}}, "kafka.topic_prefix", "pattern"),
    ],
)
def test_invalid_value_names_the_field_path(
    overrides: dict[str, Any], path: str, detail: str
) -> None:
    message = config_error(overrides=overrides)
    assert f"  {path}: " in message
    assert detail in message
    assert str(DEFAULT_CONFIG_PATH) in message


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"kafka": {"bogus_setting": 1}}, "kafka.bogus_setting"),
        ({"not_a_section": {}}, "not_a_section"),
        ({"cost_guardrails": {"max_cost_per_day_usd": 5}}, "cost_guardrails.max_cost_per_day_usd"),
    ],
)
def test_unknown_key_is_rejected_by_name(overrides: dict[str, Any], path: str) -> None:
    message = config_error(overrides=overrides)
    assert f"  {path}: Extra inputs are not permitted" in message


def test_alert_threshold_above_hourly_limit_is_rejected() -> None:
    message = config_error(
        overrides={"cost_guardrails": {"max_cost_per_hour_usd": 10, "alert_threshold_usd": 11}}
    )
    assert "cost_guardrails" in message
    assert "alert_threshold_usd must not exceed max_cost_per_hour_usd" in message


def test_alert_threshold_equal_to_hourly_limit_is_allowed() -> None:
    settings = load_settings(
        environ={},
        overrides={"cost_guardrails": {"max_cost_per_hour_usd": 10, "alert_threshold_usd": 10}},
    )
    assert settings.cost_guardrails.alert_threshold_usd == 10.0


def test_tier_whose_provider_has_no_providers_entry(tmp_path: Path) -> None:
    tree = default_tree()
    del tree["providers"]["anthropic"]  # the standard tier uses anthropic
    message = config_error(path=write_config(tmp_path, tree))
    assert "tiers.standard.provider" in message
    assert "'anthropic' has no entry in providers" in message


def test_rate_limits_naming_an_unknown_agent_type() -> None:
    message = config_error(
        overrides={"rate_limits": {"ghost": {"requests_per_minute": 10, "tokens_per_minute": 10}}}
    )
    assert "rate_limits: unknown agent types ['ghost']" in message


def test_missing_tier(tmp_path: Path) -> None:
    tree = default_tree()
    del tree["tiers"]["premium"]
    message = config_error(path=write_config(tmp_path, tree))
    assert "tiers: no model configured for premium" in message
    assert str(tmp_path / "config.yaml") in message


def test_unknown_tier_name_is_rejected() -> None:
    message = config_error(overrides={"tiers": {"ultra": {"provider": "openai", "model": "x"}}})
    assert "tiers.ultra" in message


def test_every_error_is_listed(tmp_path: Path) -> None:
    tree = default_tree()
    tree["tiers"]["nano"]["provider"] = "azure"
    tree["worker"]["max_concurrent_tasks"] = 0
    message = config_error(path=write_config(tmp_path, tree))
    assert "  tiers.nano.provider: " in message
    assert "  worker.max_concurrent_tasks: " in message


# --------------------------------------------------------------------------- the file itself


def test_file_that_is_not_valid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("kafka: [unclosed\n  tiers: {\n")
    message = config_error(path=path)
    assert f"configuration file {path} is not valid YAML" in message


@pytest.mark.parametrize("body", ["- a\n- b\n", "just a string\n", "42\n"])
def test_file_that_is_not_a_mapping(tmp_path: Path, body: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(body)
    message = config_error(path=path)
    assert message == f"configuration file {path} must hold a mapping at the top level"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    message = config_error(path=path)
    assert message.startswith(f"cannot read configuration file {path}")
    assert "No such file or directory" in message


def test_empty_file_reports_the_required_sections(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    message = config_error(path=path)
    assert str(path) in message
    for field in ("tiers", "providers", "agent_types"):
        assert f"  {field}: Field required" in message


def test_file_values_replace_the_defaults(tmp_path: Path) -> None:
    tree = default_tree()
    tree["tiers"]["nano"]["model"] = "gpt-4.1-nano"
    tree["kafka"]["topic_prefix"] = "team-a"
    settings = load_settings(write_config(tmp_path, tree), environ={})
    assert settings.tiers[Tier.NANO].model == "gpt-4.1-nano"
    assert settings.kafka.topic_prefix == "team-a"


# --------------------------------------------------------------------------- environment


def test_env_overrides_builds_a_nested_tree_with_yaml_scalars() -> None:
    environ = {
        "TIERSTREAM__KAFKA__BOOTSTRAP_SERVERS": "broker:9092",
        "TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_HOUR_USD": "20",
        "TIERSTREAM__CLASSIFIER__RULES__NANO_KEYWORDS": "[a, b]",
        "TIERSTREAM__WORKER__LOG_PROMPTS": "true",
        "TIERSTREAM_CONFIG": "/not/an/override.yaml",
        "PATH": "/usr/bin",
    }
    assert env_overrides(environ) == {
        "kafka": {"bootstrap_servers": "broker:9092"},
        "cost_guardrails": {"max_cost_per_hour_usd": 20},
        "classifier": {"rules": {"nano_keywords": ["a", "b"]}},
        "worker": {"log_prompts": True},
    }


def test_env_overrides_of_an_empty_environment_is_empty() -> None:
    assert env_overrides({}) == {}
    assert env_overrides({"TIERSTREAM__": "x", "HOME": "/root"}) == {}


def test_env_aliases() -> None:
    assert env_overrides({"KAFKA_BOOTSTRAP_SERVERS": "k1:9092,k2:9092", "MAX_CONCURRENT_TASKS": "8"}) == {
        "kafka": {"bootstrap_servers": "k1:9092,k2:9092"},
        "worker": {"max_concurrent_tasks": 8},
    }
    settings = load_settings(
        environ={"KAFKA_BOOTSTRAP_SERVERS": "k1:9092,k2:9092", "MAX_CONCURRENT_TASKS": "8"}
    )
    assert settings.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert settings.worker.max_concurrent_tasks == 8


def test_empty_alias_is_ignored() -> None:
    settings = load_settings(environ={"KAFKA_BOOTSTRAP_SERVERS": ""})
    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092"


def test_prefixed_variable_wins_over_alias() -> None:
    environ = {
        "KAFKA_BOOTSTRAP_SERVERS": "alias:9092",
        "TIERSTREAM__KAFKA__BOOTSTRAP_SERVERS": "prefixed:9092",
    }
    assert load_settings(environ=environ).kafka.bootstrap_servers == "prefixed:9092"


def test_env_bootstrap_servers_override() -> None:
    settings = load_settings(environ={"TIERSTREAM__KAFKA__BOOTSTRAP_SERVERS": "broker:9092"})
    assert settings.kafka.bootstrap_servers == "broker:9092"
    # the rest of the kafka section still comes from the file (deep merge)
    assert settings.kafka.topic_prefix == "agent"
    assert settings.kafka.partitions.requests == 6


def test_nested_env_override_is_parsed_as_a_number() -> None:
    environ = {
        "TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_HOUR_USD": "20",
        "TIERSTREAM__COST_GUARDRAILS__ALERT_THRESHOLD_USD": "15.5",
    }
    guard = load_settings(environ=environ).cost_guardrails
    assert guard.max_cost_per_hour_usd == 20.0
    assert guard.alert_threshold_usd == 15.5
    assert guard.max_cost_per_workflow_usd == 1.0


def test_documented_example_override_loads_on_its_own() -> None:
    settings = load_settings(environ={"TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_WORKFLOW_USD": "2.5"})
    assert settings.cost_guardrails.max_cost_per_workflow_usd == 2.5


def test_invalid_env_value_names_the_field() -> None:
    message = config_error(environ={"TIERSTREAM__WORKER__MAX_CONCURRENT_TASKS": "many"})
    assert "  worker.max_concurrent_tasks: " in message


def test_env_wins_over_the_file(tmp_path: Path) -> None:
    tree = default_tree()
    tree["kafka"]["bootstrap_servers"] = "from-file:9092"
    tree["worker"]["max_concurrent_tasks"] = 16
    path = write_config(tmp_path, tree)

    assert load_settings(path, environ={}).kafka.bootstrap_servers == "from-file:9092"
    settings = load_settings(
        path,
        environ={
            "TIERSTREAM__KAFKA__BOOTSTRAP_SERVERS": "from-env:9092",
            "TIERSTREAM__WORKER__MAX_CONCURRENT_TASKS": "4",
        },
    )
    assert settings.kafka.bootstrap_servers == "from-env:9092"
    assert settings.worker.max_concurrent_tasks == 4


def test_tierstream_config_selects_the_file(tmp_path: Path) -> None:
    tree = default_tree()
    tree["app_id"] = "selected-by-env"
    path = write_config(tmp_path, tree)
    settings = load_settings(environ={"TIERSTREAM_CONFIG": str(path)})
    assert settings.app_id == "selected-by-env"


def test_explicit_path_wins_over_tierstream_config(tmp_path: Path) -> None:
    tree = default_tree()
    tree["app_id"] = "explicit"
    explicit = write_config(tmp_path, tree, "explicit.yaml")
    settings = load_settings(explicit, environ={"TIERSTREAM_CONFIG": str(tmp_path / "missing.yaml")})
    assert settings.app_id == "explicit"


def test_tierstream_config_pointing_nowhere_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    message = config_error(environ={"TIERSTREAM_CONFIG": str(missing)})
    assert message.startswith(f"cannot read configuration file {missing}")


def test_overrides_argument_wins_over_env() -> None:
    settings = load_settings(
        environ={"TIERSTREAM__APP_ID": "from-env"}, overrides={"app_id": "from-overrides"}
    )
    assert settings.app_id == "from-overrides"


# --------------------------------------------------------------------------- topology


def topology(**kafka: Any) -> Topology:
    return Topology(load_settings(environ={}, overrides={"kafka": kafka} if kafka else None))


def test_topic_names_follow_the_prefix() -> None:
    topo = topology(topic_prefix="team-a")
    assert [spec.name for spec in topo.all()] == [
        "team-a.requests",
        "team-a.requests.nano",
        "team-a.requests.standard",
        "team-a.requests.premium",
        "team-a.requests.batch",
        "team-a.batch-jobs",
        "team-a.results",
        "team-a.costs",
        "team-a.guardrails",
        "team-a.spend",
        "team-a.throttles",
        "team-a.dlq",
    ]
    default = topology()
    assert default.requests.name == "agent.requests"
    assert default.tiers[Tier.PREMIUM].name == "agent.requests.premium"


def test_partitions_and_replication_come_from_config() -> None:
    kafka = {
        "partitions": {
            "requests": 3, "tiers": 4, "batch": 8, "results": 5, "costs": 7, "guardrails": 2, "dead_letters": 9
        },
        "replication_factor": 3,
        "max_message_bytes": 2048,
    }
    # A batch's record carries its requests: batch.max_bytes must fit under max_message_bytes.
    topo = Topology(load_settings(environ={}, overrides={"kafka": kafka, "batch": {"max_bytes": 1024}}))
    assert topo.requests.partitions == 3
    assert [topo.tiers[t].partitions for t in Tier] == [4, 4, 4]
    assert topo.batch.partitions == 8
    assert topo.batch_jobs.partitions == 1  # the cluster's open batches, read whole by every batch role
    assert topo.results.partitions == 5
    assert topo.costs.partitions == 7
    assert topo.guardrails.partitions == 2
    assert topo.spend.partitions == 1  # always one: readers rely on its total order
    assert topo.throttles.partitions == 1  # a key per provider model, read whole by every worker
    assert topo.dead_letters.partitions == 9
    assert {spec.replication_factor for spec in topo.all()} == {3}
    assert {spec.config["max.message.bytes"] for spec in topo.all()} == {"2048"}


def test_only_the_state_topics_are_compacted() -> None:
    topo = topology()
    for spec in (topo.batch_jobs, topo.guardrails, topo.spend, topo.throttles):
        assert spec.compacted is True, spec.name
        assert spec.config["cleanup.policy"] == "compact", spec.name
        assert "retention.ms" not in spec.config, spec.name
    assert [s.name for s in topo.all() if s.compacted] == [
        "agent.batch-jobs", "agent.guardrails", "agent.spend", "agent.throttles"
    ]
    assert topo.throttles.config["segment.ms"] == "3600000"  # compaction can act within the hour


def test_topic_keys_and_value_models() -> None:
    topo = topology()
    assert (topo.requests.key, topo.requests.value) == ("workflow_id", AgentRequest)
    assert {(topo.tiers[t].key, topo.tiers[t].value) for t in Tier} == {("workflow_id", TieredRequest)}
    assert (topo.batch.key, topo.batch.value) == ("workflow_id", TieredRequest)
    assert (topo.batch_jobs.key, topo.batch_jobs.value) == ("job_key", BatchJob)
    assert (topo.costs.key, topo.costs.value) == ("workflow_id", CostEvent)
    assert (topo.guardrails.key, topo.guardrails.value) == ("scope", GuardrailEvent)
    assert (topo.spend.key, topo.spend.value) == ("scope", SpendSnapshot)
    assert (topo.throttles.key, topo.throttles.value) == ("scope", ThrottleEvent)
    assert (topo.dead_letters.key, topo.dead_letters.value) == ("source_key", DeadLetter)


def test_every_flow_topic_exists() -> None:
    topo = topology()
    names = {spec.name for spec in topo.all()}
    assert len(names) == len(topo.all())  # no duplicate topic names
    flows = topo.flows()
    assert [f.role for f in flows] == list(ALL_ROLES)
    for flow in flows:
        assert flow.reads, flow.role
        assert set(flow.reads) <= names, flow
        assert set(flow.writes) <= names, flow
    classifier = flows[0]
    assert classifier.reads == ("agent.requests",)
    assert classifier.writes == (
        "agent.requests.nano", "agent.requests.standard", "agent.requests.premium", "agent.requests.batch",
        "agent.dlq",
    )
    premium = next(f for f in flows if f.role == "tier-premium")
    assert premium.reads == (
        "agent.requests.premium", "agent.results", "agent.spend", "agent.guardrails", "agent.throttles"
    )
    assert premium.writes == ("agent.results", "agent.costs", "agent.throttles", "agent.dlq")
    cost = next(f for f in flows if f.role == "cost")
    assert cost.reads == ("agent.costs", "agent.spend", "agent.guardrails")
    assert cost.writes == ("agent.spend", "agent.guardrails", "agent.dlq")
    llm = Topology(load_settings(environ={"TIERSTREAM__CLASSIFIER__STRATEGY": "llm"})).flows()[0]
    assert llm.reads == ("agent.requests", "agent.throttles")  # its routing calls back off with the tiers
    assert llm.writes == (
        "agent.requests.nano", "agent.requests.standard", "agent.requests.premium", "agent.requests.batch",
        "agent.costs",
        "agent.throttles", "agent.dlq",
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", ["classifier", "tier-nano", "tier-standard", "tier-premium", "cost", "batch"]),
        ("classifier,tier:premium", ["classifier", "tier-premium"]),
        ("tiers", ["tier-nano", "tier-standard", "tier-premium"]),
        ("tier:standard,tiers", ["tier-standard", "tier-nano", "tier-premium"]),
        ("classifier,classifier, tier:nano ,tier-nano", ["classifier", "tier-nano"]),
        ("all,classifier,tiers", ["classifier", "tier-nano", "tier-standard", "tier-premium", "cost", "batch"]),
        ("cost", ["cost"]),
        ("batch,cost", ["batch", "cost"]),
        ("cost,tiers", ["cost", "tier-nano", "tier-standard", "tier-premium"]),
        ("CLASSIFIER,Tier:Premium", ["classifier", "tier-premium"]),
        ("tier:nano,,", ["tier-nano"]),
    ],
)
def test_parse_roles(spec: str, expected: list[str]) -> None:
    assert parse_roles(spec) == expected


@pytest.mark.parametrize("spec", ["bogus", "classifier,tier:ultra", "tier"])
def test_parse_roles_rejects_unknown_roles(spec: str) -> None:
    bad = spec.split(",")[-1]
    with pytest.raises(ValueError) as info:
        parse_roles(spec)
    message = str(info.value)
    assert message.startswith(f"unknown role {bad!r}")
    assert "tier:premium" in message  # it lists the valid choices
    assert "cost" in message


@pytest.mark.parametrize("spec", ["", " , ,"])
def test_parse_roles_rejects_no_role(spec: str) -> None:
    with pytest.raises(ValueError, match="^no role given$"):
        parse_roles(spec)


def test_consumer_group_differs_per_role() -> None:
    topo = topology()
    groups = [topo.consumer_group("tierstream", role) for role in ALL_ROLES]
    assert groups == [
        "tierstream-classifier",
        "tierstream-tier-nano",
        "tierstream-tier-standard",
        "tierstream-tier-premium",
        "tierstream-cost",
        "tierstream-batch",
    ]
    assert len(set(groups)) == len(ALL_ROLES)
    assert topo.consumer_group("other", tier_role(Tier.NANO)) == "other-tier-nano"


def test_a_worker_sets_the_collectors_thresholds_from_its_settings() -> None:
    import gc

    from streams.runtime.worker import tune_the_collector

    before = gc.get_threshold()
    try:
        tune_the_collector(load_settings(environ={"TIERSTREAM__WORKER__GC_THRESHOLDS": "[5000, 7, 9]"}))
        assert gc.get_threshold() == (5000, 7, 9)
        tune_the_collector(load_settings(environ={}))
        assert gc.get_threshold() == (20_000, 20, 10)
    finally:
        gc.set_threshold(*before)
