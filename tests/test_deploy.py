"""Offline checks of the Kubernetes manifests under deploy/k8s against the code they run.

No cluster is needed. Overlays are built with ``kustomize`` or ``kubectl kustomize`` when
one is installed (only those checks are skipped otherwise); everything else reads the
YAML files directly.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

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
            continue  # a CRD: no bundled schema, checked structurally below
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


def test_deployments_run_one_accepted_role_with_probes_on_the_health_server() -> None:
    routes = {r.resource.canonical for r in HealthServer(app=None).web_app().router.routes()}  # type: ignore[arg-type]
    default_port = WorkerSettings().health_port
    assert default_port == SETTINGS.worker.health_port == 8080
    for name, deployment in _of_kind(_base_resources(), "Deployment").items():
        spec = deployment["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] == 60
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
    docs = _build(directory)
    maps = {name.rsplit("-", 1)[0]: d for name, d in _of_kind(docs, "ConfigMap").items()}
    config = tmp_path / "config.yaml"
    config.write_text(maps["tierstream-config"]["data"]["config.yaml"])
    settings = load_settings(config, environ=maps["tierstream-env"]["data"])
    assert settings.kafka.topic_prefix == SETTINGS.kafka.topic_prefix


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


def test_base_scaled_objects_match_the_topology() -> None:
    _check_scaled_objects(_base_resources())


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlay_scaled_objects_match_the_topology(overlay: str) -> None:
    _check_scaled_objects(_build(K8S / "overlays" / overlay))


def test_hpa_overlay_replaces_scaled_objects_with_lag_hpas() -> None:
    docs = _build(K8S / "overlays" / "prod-hpa")
    assert not _of_kind(docs, "ScaledObject")
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
