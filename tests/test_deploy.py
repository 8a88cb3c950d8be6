"""Offline checks of the Kubernetes manifests under deploy/k8s against the code they run.

No cluster is needed. Overlays are built with ``kustomize`` or ``kubectl kustomize`` when
one is installed (only those checks are skipped otherwise); everything else reads the
YAML files directly. Kubernetes resources are validated with kubernetes-validate, KEDA
ScaledObjects against KEDA's CRD schema (the pydantic models of cloudcoil.models.keda).
The Dockerfile and the compose file cannot be run here (no Docker engine): their
structure is checked against the code and the manifests.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import faust
import pytest
import yaml

from streams.observability import HealthServer
from topologies.config import DEFAULT_CONFIG_PATH, WorkerSettings, load_settings
from topologies.topics import ALL_ROLES, COST_ROLE, Topology, parse_roles

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUBERNETES_VERSION = "1.29.0"  # the oldest version the manifests promise to work on
Doc = dict[str, Any]


def _docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kustomize_cmd() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@cache
def _build(directory: Path) -> tuple[Doc, ...]:
    cmd = _kustomize_cmd()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl is installed: overlays not built")
    out = subprocess.run([*cmd, str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d is not None)


def _base_resources() -> list[Doc]:
    kustomization = _docs(BASE / "kustomization.yaml")[0]
    return [doc for name in kustomization["resources"] for doc in _docs(BASE / name)]


def _of_kind(docs: list[Doc] | tuple[Doc, ...], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _worker_container(deployment: Doc) -> Doc:
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "worker"]
    return container


SETTINGS = load_settings(DEFAULT_CONFIG_PATH, environ={})
TOPOLOGY = Topology(SETTINGS)
ALL_BUILDS = [BASE, *OVERLAYS]


def _health_routes() -> set[str]:
    """The paths the worker's health server answers."""
    return {r.resource.canonical for r in HealthServer(consumer=None).web_app().router.routes()}  # type: ignore[arg-type]


def test_every_manifest_parses() -> None:
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) > 10
    for path in files:
        for doc in _docs(path):
            assert isinstance(doc, dict), path


def test_overlays_exist() -> None:
    assert {p.name for p in OVERLAYS} >= {"dev", "prod", "prod-hpa"}


@pytest.mark.parametrize("directory", ALL_BUILDS, ids=lambda p: p.name)
def test_built_resources_validate_against_the_kubernetes_schema(directory: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = _build(directory)
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked against KEDA's schema below
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_raw_base_resources_validate_without_kustomize() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in _base_resources():
        if not doc["apiVersion"].startswith("keda.sh/"):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_one_deployment_and_pdb_per_role() -> None:
    docs = _base_resources()
    deployments = _of_kind(docs, "Deployment")
    assert set(deployments) == {f"tierstream-{r}" for r in ALL_ROLES}
    pdbs = _of_kind(docs, "PodDisruptionBudget")
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = pdbs[name]["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), name


def test_each_deployment_lists_the_topics_of_its_role() -> None:
    """The topic list in each Deployment's header comment is the role's flow."""
    for flow in TOPOLOGY.flows():
        text = (BASE / f"deployment-{flow.role}.yaml").read_text()
        assert f"#   consumes {flow.reads[0]} in its consumer group\n" in text, flow.role
        assert f"#   writes   {', '.join(flow.writes)}\n" in text, flow.role
        follows = f"#   follows  {', '.join(flow.reads[1:])} without a group\n"
        assert (follows in text) == bool(flow.reads[1:]) and text.count("#   follows") <= 1, flow.role


def test_deployments_run_one_accepted_role_with_probes_on_the_health_server() -> None:
    routes = _health_routes()
    default_port = WorkerSettings().health_port
    assert default_port == SETTINGS.worker.health_port == 8080
    for name, deployment in _of_kind(_base_resources(), "Deployment").items():
        spec = deployment["spec"]["template"]["spec"]
        # SIGTERM: Faust stops the agents, flushes the producer and commits, waiting up to
        # its services' shutdown_timeout; the pod must not be killed before that.
        assert spec["terminationGracePeriodSeconds"] == faust.Worker.shutdown_timeout
        container = _worker_container(deployment)
        args = container["args"]
        assert args[0] == "worker" and args[1] == "--roles"
        assert parse_roles(args[2]) == [name.removeprefix("tierstream-")]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
            get = container[probe]["httpGet"]
            assert get["path"] == path and path in routes, (name, probe)
            assert ports.get(get["port"], get["port"]) == default_port, (name, probe)
        assert container["resources"]["requests"] and container["resources"]["limits"]
        env = {e["name"]: e for e in container["env"]}
        assert int(env["MAX_CONCURRENT_TASKS"]["value"]) > 0
        provider_keys = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")
        if name == f"tierstream-{COST_ROLE}":
            # The cost role never calls a provider: it gets no provider keys at all.
            assert not set(provider_keys) & set(env), name
        else:
            for key in provider_keys:
                assert env[key]["valueFrom"]["secretKeyRef"]["key"] == key
        # The config file the ConfigMap is mounted as is the one the worker reads.
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert env["TIERSTREAM_CONFIG"]["value"] == f"{mounts['config']}/config.yaml"


def test_configmap_config_is_the_default_config() -> None:
    copy = BASE / "config.yaml"
    assert copy.read_text() == DEFAULT_CONFIG_PATH.read_text(), "cp topologies/default.yaml deploy/k8s/base/config.yaml"
    assert load_settings(copy, environ={}) == SETTINGS
    generators = _docs(BASE / "kustomization.yaml")[0]["configMapGenerator"]
    assert {"name": "tierstream-config", "files": ["config.yaml"]} in generators


@pytest.mark.parametrize("directory", ALL_BUILDS, ids=lambda p: p.name)
def test_built_configmap_loads_with_the_overlay_environment(directory: Path, tmp_path: Path) -> None:
    """Each pod's configuration, as the worker validates it at start: the ConfigMap's
    YAML with the ConfigMap's environment and the container's own (Secrets as stand-ins)."""
    docs = _build(directory)
    maps = {name.rsplit("-", 1)[0]: d for name, d in _of_kind(docs, "ConfigMap").items()}
    config = tmp_path / "config.yaml"
    config.write_text(maps["tierstream-config"]["data"]["config.yaml"])
    for name, deployment in _of_kind(docs, "Deployment").items():
        if not name.startswith("tierstream-"):
            continue  # the dev overlay's simulator
        env = dict(maps["tierstream-env"]["data"])
        secrets = set()
        for var in _worker_container(deployment)["env"]:
            if "valueFrom" in var:
                secrets.add(var["name"])
                env[var["name"]] = f"<{var['valueFrom']['secretKeyRef']['key']}>"
            else:
                env[var["name"]] = var["value"]
        settings = load_settings(config, environ=env)
        assert settings.kafka.topic_prefix == SETTINGS.kafka.topic_prefix
        assert settings.worker.max_concurrent_tasks == int(env["MAX_CONCURRENT_TASKS"]), name
        # The worker's own grace for calls in flight (worker.shutdown_grace_seconds, from the
        # graceful-shutdown work) must end with time left to commit and leave the group
        # (10 s, as the supervisor allows) before Kubernetes kills the pod.
        in_flight_grace = getattr(settings.worker, "shutdown_grace_seconds", None)
        if in_flight_grace is not None:
            pod_grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            assert in_flight_grace + 10 <= pod_grace, name
        if settings.kafka.uses_sasl:  # the password comes from a Secret, never the ConfigMap
            assert settings.kafka.sasl_password_env in secrets, name


def _check_scaled_objects(docs: list[Doc] | tuple[Doc, ...]) -> None:
    deployments = _of_kind(docs, "Deployment")
    scaled = _of_kind(docs, "ScaledObject")
    sources = {flow.role: flow.reads[0] for flow in TOPOLOGY.flows()}
    partitions = {spec.name: spec.partitions for spec in TOPOLOGY.all()}
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled.values()} == {
        f"tierstream-{r}" for r in ALL_ROLES
    }
    for name, obj in scaled.items():
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        spec = obj["spec"]
        target = spec["scaleTargetRef"]["name"]
        assert target in deployments, name
        role = target.removeprefix("tierstream-")
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert meta["topic"] == sources[role]
        assert meta["consumerGroup"] == TOPOLOGY.consumer_group(SETTINGS.app_id, role)
        assert meta["bootstrapServers"]
        assert int(meta["lagThreshold"]) > 0
        assert 1 <= spec.get("minReplicaCount", 0) <= spec["maxReplicaCount"] <= partitions[meta["topic"]]


def _validate_keda(docs: list[Doc] | tuple[Doc, ...]) -> int:
    """Validate every ScaledObject against KEDA's CRD schema; unknown fields fail too."""
    keda = pytest.importorskip("cloudcoil.models.keda.v1alpha1")
    kinds = {"ScaledObject": keda.ScaledObject, "TriggerAuthentication": keda.TriggerAuthentication}
    count = 0
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            parsed = kinds[doc["kind"]].model_validate(doc)
            # The models ignore unknown fields: a field KEDA does not know (a typo) is
            # caught by the round trip dropping it.
            assert parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc
            count += doc["kind"] == "ScaledObject"
            if "authenticationRef" in doc.get("spec", {}).get("triggers", [{}])[0]:
                ref = doc["spec"]["triggers"][0]["authenticationRef"]["name"]
                assert ref in _of_kind(docs, "TriggerAuthentication"), ref
    return count


def test_base_scaled_objects_validate_against_the_keda_crd_schema() -> None:
    assert _validate_keda(_base_resources()) == len(ALL_ROLES)


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlay_scaled_objects_validate_against_the_keda_crd_schema(overlay: str) -> None:
    assert _validate_keda(_build(K8S / "overlays" / overlay)) == len(ALL_ROLES)


def test_prod_keda_logs_in_to_kafka_with_the_workers_secret() -> None:
    docs = _build(K8S / "overlays" / "prod")
    (auth,) = _of_kind(docs, "TriggerAuthentication").values()
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    env = {
        v["name"]: (v["valueFrom"]["secretKeyRef"]["name"], v["valueFrom"]["secretKeyRef"]["key"])
        for d in _of_kind(docs, "Deployment").values() for v in _worker_container(d)["env"] if "valueFrom" in v
    }
    assert refs["username"] == env["TIERSTREAM__KAFKA__SASL_USERNAME"]
    assert refs["password"] == env[SETTINGS.kafka.sasl_password_env]
    (env_map,) = [d for n, d in _of_kind(docs, "ConfigMap").items() if n.startswith("tierstream-env")]
    mechanism = env_map["data"]["TIERSTREAM__KAFKA__SASL_MECHANISM"]  # e.g. SCRAM-SHA-512
    assert env_map["data"]["TIERSTREAM__KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL"
    for obj in _of_kind(docs, "ScaledObject").values():
        meta = obj["spec"]["triggers"][0]["metadata"]
        assert meta["sasl"] == mechanism.lower().replace("-sha-", "_sha") and meta["tls"] == "enable"


def test_keda_schema_check_rejects_a_wrong_manifest() -> None:
    keda = pytest.importorskip("cloudcoil.models.keda.v1alpha1")
    (doc,) = _docs(BASE / "scaledobject-tier-nano.yaml")
    typo = {**doc, "spec": {**doc["spec"], "maxReplicas": 3}}
    with pytest.raises(AssertionError):
        _validate_keda([typo])
    with pytest.raises(ValueError):
        keda.ScaledObject.model_validate({**doc, "spec": {**doc["spec"], "maxReplicaCount": "six"}})


def test_base_scaled_objects_match_the_topology() -> None:
    _check_scaled_objects(_base_resources())


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlay_scaled_objects_match_the_topology(overlay: str) -> None:
    _check_scaled_objects(_build(K8S / "overlays" / overlay))


def test_hpa_overlay_replaces_scaled_objects_with_lag_hpas() -> None:
    docs = _build(K8S / "overlays" / "prod-hpa")
    assert not [d["kind"] for d in docs if d["apiVersion"].startswith("keda.sh/")]
    deployments = _of_kind(docs, "Deployment")
    hpas = _of_kind(docs, "HorizontalPodAutoscaler")
    sources = {flow.role: flow.reads[0] for flow in TOPOLOGY.flows()}
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()} == set(deployments)
    for hpa in hpas.values():
        role = hpa["spec"]["scaleTargetRef"]["name"].removeprefix("tierstream-")
        (metric,) = hpa["spec"]["metrics"]
        labels = metric["external"]["metric"]["selector"]["matchLabels"]
        assert labels == {"consumergroup": f"{SETTINGS.app_id}-{role}", "topic": sources[role]}
        partitions = {spec.name: spec.partitions for spec in TOPOLOGY.all()}
        assert hpa["spec"]["maxReplicas"] <= partitions[sources[role]]


ROOT = K8S.parents[1]
COMPOSE = ROOT / "deploy" / "docker" / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


def _pyproject() -> dict[str, Any]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dockerfile(instruction: str) -> list[str]:
    """The arguments of every ``instruction`` line of the final stage."""
    final = DOCKERFILE.read_text().rsplit("\nFROM ", 1)[1]
    return [
        line.split(None, 1)[1] for line in final.splitlines() if line.split(None, 1)[:1] == [instruction]
    ]


def test_dockerfile_agrees_with_the_code_and_the_manifests() -> None:
    import json

    project = _pyproject()["project"]
    assert json.loads(_dockerfile("ENTRYPOINT")[0]) == ["tierstream"]
    assert "tierstream" in project["scripts"]  # the console script the ENTRYPOINT runs
    assert _dockerfile("EXPOSE") == [str(WorkerSettings().health_port)]
    assert _dockerfile("USER") == ["10001:10001"]
    for name, deployment in _of_kind(_base_resources(), "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 10001, name
        assert _worker_container(deployment)["image"] == f"tierstream:{project['version']}", name
        # Prometheus finds /metrics through the pod annotations.
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        routes = _health_routes()
        assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in routes
        assert annotations["prometheus.io/port"] == str(WorkerSettings().health_port)


def test_compose_runs_every_role_with_the_kubernetes_contract() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    workers = {name: s for name, s in services.items() if s.get("command", [""])[0] == "worker"}
    assert set(workers) == set(ALL_ROLES)
    version = _pyproject()["project"]["version"]
    for name, service in workers.items():
        command = service["command"]
        assert command[1] == "--roles" and parse_roles(command[2]) == [name], name
        assert service["image"] == f"tierstream:{version}"
        assert service["build"]["dockerfile"] == "deploy/docker/Dockerfile"
        assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert service["stop_grace_period"] == f"{int(faust.Worker.shutdown_timeout)}s", name
        env = service["environment"]
        settings = load_settings(DEFAULT_CONFIG_PATH, environ={k: str(v) for k, v in env.items()})
        assert settings.kafka.bootstrap_servers == "kafka:9092" and settings.simulator.host == "provider-sim"
    assert {"kafka", "provider-sim", "prometheus", "grafana"} <= set(services)
    sim = services["provider-sim"]["command"]
    assert sim[0] == "provider-sim" and sim[sim.index("--port") + 1] == str(SETTINGS.simulator.port)


def test_compose_prometheus_scrapes_every_worker_and_grafana_is_provisioned() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    mounts = {}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source, target, mode = volume.split(":")
            assert mode == "ro" and (COMPOSE.parent / source).exists(), volume
            mounts[target] = (COMPOSE.parent / source).resolve()
    config_path = mounts["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(config_path.read_text())
    # Rule files are relative to the config, and mounted beside it.
    for rule_file in config["rule_files"]:
        assert mounts[f"/etc/prometheus/{rule_file}"] == config_path.parent / rule_file
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (targets,) = [c["targets"] for c in job["static_configs"]]
    port = WorkerSettings().health_port
    assert sorted(targets) == sorted(f"{role}:{port}" for role in ALL_ROLES)
    assert (mounts["/var/lib/grafana/dashboards"] / "tierstream.json").is_file()
    assert (mounts["/etc/grafana/provisioning"] / "dashboards" / "tierstream.yml").is_file()


def test_hpa_lag_targets_equal_the_keda_lag_thresholds() -> None:
    """Both autoscalers aim at the same lag per replica for a role."""
    keda = {
        s["spec"]["scaleTargetRef"]["name"]: s["spec"]["triggers"][0]["metadata"]["lagThreshold"]
        for s in _of_kind(_base_resources(), "ScaledObject").values()
    }
    hpas = _docs(K8S / "overlays" / "prod-hpa" / "hpa.yaml")
    targets = {
        h["spec"]["scaleTargetRef"]["name"]: h["spec"]["metrics"][0]["external"]["target"]["averageValue"] for h in hpas
    }
    assert targets == keda
