"""The Kubernetes manifests under deploy/k8s: schema-valid, and right about the facts that matter.

Every manifest (the base, the production overlay rendered onto it, the examples) is validated
offline with kubernetes-validate's strict schemas (unknown fields rejected) for the oldest and
the newest Kubernetes version we claim. Two kinds have no schema there and are checked by
structure instead: `Kustomization` (the overlay machinery) and `ServiceMonitor` (a Prometheus
Operator CRD). The overlay is rendered by a small strategic-merge renderer here (kubectl is not a
test dependency); where `kubectl kustomize` exists, a test pins that it renders the same objects.

The facts: native gRPC probes on 50051 with the gateway's own health service names, a numeric
non-root UID equal to the image's, a read-only root filesystem with a writable /tmp, resources,
terminationGracePeriodSeconds covering the drain as the gateway's own settings loader reads it
from the manifests, Services (ClusterIP and headless) selecting the pods with named ports, the
HPA (CPU + in-flight calls, slow scale-down), PDB, NetworkPolicy, the ConfigMap loading with
`load_settings`, the overlay's patches naming objects of the base, and the round_robin service
config of the README working from a Python client over `dns:///`.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_gateway_server.config import load_settings
from llm_gateway_server.transport.server import SERVICE_NAME

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
PRODUCTION = K8S / "overlays" / "production"
EXAMPLES = K8S / "examples"
SECRET_EXAMPLE = BASE / "secret.example.yaml"
ADAPTER_EXAMPLE = EXAMPLES / "prometheus-adapter-rules.yaml"

# The oldest Kubernetes the manifests claim (native gRPC probes GA in 1.27, PDB
# unhealthyPodEvictionPolicy on by default since 1.27) and the newest schema shipped.
K8S_VERSIONS = ("1.30.0", "1.37.0")
NO_SCHEMA = {
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
GRPC_PORT = 50051
METRICS_PORT = 9464
IN_FLIGHT_METRIC = "llm_gateway_in_flight_calls"
DRAIN_MARGIN_S = 5  # terminationGracePeriodSeconds must exceed the drain by at least this much
SERVICE_CONFIG = '{"loadBalancingConfig": [{"round_robin": {}}]}'  # as in README "Kubernetes"

# Strategic-merge keys of the lists the overlay may patch (Kubernetes' patchMergeKey); any other
# list is replaced, as a strategic merge patch does for lists without a merge key.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def kustomization(directory: Path) -> dict[str, Any]:
    (doc,) = load_yaml(directory / "kustomization.yaml")
    return doc


def merge(base: Any, patch: Any, field: str = "") -> Any:
    """A strategic merge patch, for the subset the overlay uses (no `$patch` directives)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            assert not key.startswith("$"), f"unsupported patch directive {key}"
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = merge(merged[key], value, key) if key in merged else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        merged_list = list(base)
        for item in patch:
            index = next((i for i, old in enumerate(merged_list) if old.get(key) == item[key]), None)
            if index is None:
                merged_list.append(copy.deepcopy(item))
            else:
                merged_list[index] = merge(merged_list[index], item)
        return merged_list
    return copy.deepcopy(patch)


def identity(obj: dict[str, Any]) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def pod_containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def set_image(image: str, rule: dict[str, str]) -> str:
    name, tag = image, ""
    if re.search(r":[^/]+$", image):
        name, tag = image.rsplit(":", 1)
    if name != rule["name"]:
        return image
    new_tag = rule.get("newTag", tag)
    return rule.get("newName", name) + (f":{new_tag}" if new_tag else "")


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize directory` builds, for the fields our kustomizations use."""
    spec = kustomization(directory)
    unsupported = set(spec) - {"apiVersion", "kind", "resources", "images", "patches"}
    assert not unsupported, f"{directory}: the test's renderer does not know {sorted(unsupported)}"
    objects: list[dict[str, Any]] = []
    for resource in spec.get("resources", []):
        path = directory / resource
        objects.extend(render(path) if path.is_dir() else load_yaml(path))
    by_id = {identity(obj): i for i, obj in enumerate(objects)}
    for entry in spec.get("patches", []):
        assert set(entry) == {"path"}, f"{directory}: only `patches: - path: FILE` is supported"
        (patch,) = load_yaml(directory / entry["path"])
        target = identity(patch)
        assert target in by_id, f"{entry['path']} patches {target}, which the base does not have"
        index = by_id[target]
        assert objects[index]["apiVersion"] == patch["apiVersion"], f"{entry['path']}: apiVersion differs from the base"
        objects[index] = merge(objects[index], patch)
    for rule in spec.get("images", []):
        for obj in objects:
            for container in pod_containers(obj):
                container["image"] = set_image(container["image"], rule)
    return objects


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def validate(obj: dict[str, Any], where: str) -> None:
    """Strict schema validation for every version; kinds without a schema must be NO_SCHEMA ones."""
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert (obj["apiVersion"], obj["kind"]) in NO_SCHEMA, (
                f"{where}: no schema for {obj['apiVersion']} {obj['kind']}"
            )
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            name = f"{obj['kind']}/{obj['metadata']['name']}"
            pytest.fail(f"{where}: {name} invalid for Kubernetes {version}: {path}: {error.message}")


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


RENDER_DIRS = {"base": BASE, "production": PRODUCTION}


@functools.cache
def _rendered(name: str) -> list[dict[str, Any]]:
    return render(RENDER_DIRS[name])


def rendered(name: str) -> list[dict[str, Any]]:
    """The objects of `base` or `production`, rendered once per run (a fresh copy each call)."""
    return copy.deepcopy(_rendered(name))


OVERLAY_PATCHES = [PRODUCTION / entry["path"] for entry in kustomization(PRODUCTION)["patches"]]


def deployment_parts(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    deployment = one(objects, "Deployment", "llm-gateway")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    return deployment, pod, container


def container_env(container: dict[str, Any]) -> dict[str, str]:
    env = {}
    for item in container["env"]:
        assert "value" in item, f"env {item['name']}: the test reads literal values only"
        env[item["name"]] = item["value"]
    return env


def gateway_settings(objects: list[dict[str, Any]], tmp_path: Path) -> Any:
    """The settings the gateway would run with: the ConfigMap's file at the `--config` path, the
    container's env and the Secret example's keys, read by the gateway's own loader."""
    _, pod, container = deployment_parts(objects)
    config_path = Path(container["args"][container["args"].index("--config") + 1])
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent)
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    item = next(i for i in volume["configMap"]["items"] if i["path"] == config_path.name)
    config_map = one(objects, "ConfigMap", volume["configMap"]["name"])
    file = tmp_path / "gateway.yaml"
    file.write_text(config_map["data"][item["key"]], encoding="utf-8")
    (secret,) = load_yaml(SECRET_EXAMPLE)
    return load_settings(file, environ={**secret["stringData"], **container_env(container)})


# -- schemas -----------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_is_valid(path: Path) -> None:
    """Each file is valid as it stands, except the overlay's patches, which are fragments: those
    are validated once applied (next test)."""
    docs = load_yaml(path)
    assert docs, f"{path}: empty"
    if path in OVERLAY_PATCHES:
        return
    for doc in docs:
        validate(doc, str(path.relative_to(K8S)))


@pytest.mark.parametrize("name", RENDER_DIRS)
def test_rendered_objects_are_valid(name: str) -> None:
    for obj in rendered(name):
        validate(obj, f"{name} (rendered)")


def test_every_file_is_used() -> None:
    """The base lists every file of its directory (so it is complete alone), bar the Secret
    example, which is not applied on purpose; the overlay uses each of its files."""
    base_files = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml", SECRET_EXAMPLE.name}
    assert set(kustomization(BASE)["resources"]) == base_files
    production = kustomization(PRODUCTION)
    assert production["resources"] == ["../../base"]
    assert {p.name for p in PRODUCTION.glob("*.yaml")} - {"kustomization.yaml"} == {p.name for p in OVERLAY_PATCHES}


def test_kustomizations_and_patch_targets() -> None:
    """Structure of the files without a schema; every patch names an object of the base."""
    for directory in (BASE, PRODUCTION):
        spec = kustomization(directory)
        assert (spec["apiVersion"], spec["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    base_ids = {identity(o): o["apiVersion"] for o in rendered("base")}
    for patch_file in OVERLAY_PATCHES:
        (patch,) = load_yaml(patch_file)
        assert base_ids.get(identity(patch)) == patch["apiVersion"], f"{patch_file.name}: no such object in the base"
    image_names = {c["image"].rsplit(":", 1)[0] for o in rendered("base") for c in pod_containers(o)}
    for rule in kustomization(PRODUCTION)["images"]:
        assert rule["name"] in image_names
    assert {identity(o) for o in rendered("production")} == set(base_ids)


def normalized(value: Any) -> Any:
    """Lists of named items as mappings (kustomize reorders patched env entries)."""
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items()}
    if isinstance(value, list):
        if value and all(isinstance(v, dict) and "name" in v for v in value):
            return {v["name"]: normalized(v) for v in value}
        return [normalized(v) for v in value]
    return value


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize built in) is not installed")
@pytest.mark.parametrize("name", RENDER_DIRS)
def test_renderer_agrees_with_kustomize(name: str) -> None:
    directory = RENDER_DIRS[name]
    built = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    theirs = {identity(o): normalized(o) for o in yaml.safe_load_all(built) if o}
    ours = {identity(o): normalized(o) for o in rendered(name)}
    assert ours == theirs


# -- the facts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RENDER_DIRS)
def test_probes_are_native_grpc_health_checks(name: str) -> None:
    _, _, container = deployment_parts(rendered(name))
    expected = {"startupProbe": SERVICE_NAME, "readinessProbe": SERVICE_NAME, "livenessProbe": ""}
    assert SERVICE_NAME == "llm_gateway.v1.LLMGatewayService"
    for probe_name, service in expected.items():
        probe = container[probe_name]
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe_name
        assert probe["grpc"] == {"port": GRPC_PORT, "service": service}, probe_name
        assert isinstance(probe["grpc"]["port"], int)  # a gRPC probe's port cannot be a name


@pytest.mark.parametrize("name", RENDER_DIRS)
def test_runs_as_the_images_numeric_non_root_user(name: str) -> None:
    uid = int(re.search(r"useradd [^\n]*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))
    _, pod, container = deployment_parts(rendered(name))
    for context in (pod["spec"]["securityContext"], container["securityContext"]):
        assert context["runAsNonRoot"] is True
        assert type(context["runAsUser"]) is int and context["runAsUser"] == uid != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["spec"]["volumes"] if v["name"] == tmp["name"])


@pytest.mark.parametrize("name", RENDER_DIRS)
def test_resources_are_set(name: str) -> None:
    _, _, container = deployment_parts(rendered(name))
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) >= {"cpu", "memory"}, kind


def prestop_sleep_s(container: dict[str, Any]) -> float:
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep") and len(command) == 2, f"unknown preStop hook {command}"
    return float(command[1])


@pytest.mark.parametrize("name", RENDER_DIRS)
def test_termination_grace_covers_the_drain(name: str, tmp_path: Path) -> None:
    """preStop sleep (if any) + the gateway's pre-stop delay + its drain grace + a margin, with
    the delay and grace as the gateway reads them from the manifests' config and env."""
    _, pod, container = deployment_parts(rendered(name))
    settings = gateway_settings(rendered(name), tmp_path)
    assert settings.prestop_delay_s > 0, "no pre-stop delay: calls would be refused while endpoints update"
    drain = prestop_sleep_s(container) + settings.prestop_delay_s + settings.grace_period_s
    assert pod["spec"]["terminationGracePeriodSeconds"] >= drain + DRAIN_MARGIN_S


@pytest.mark.parametrize("name", RENDER_DIRS)
def test_config_map_loads_with_the_gateways_settings(name: str, tmp_path: Path) -> None:
    settings = gateway_settings(rendered(name), tmp_path)
    _, _, container = deployment_parts(rendered(name))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    assert (settings.host, settings.port) == ("0.0.0.0", GRPC_PORT)
    assert (settings.metrics_host, settings.metrics_port) == ("0.0.0.0", METRICS_PORT)
    # A non-loopback bind needs keys (or auth.disabled) and TLS (or allow_plaintext).
    assert settings.auth.keys and not settings.auth.disabled
    assert settings.tls.allow_plaintext or settings.tls.cert_file
    assert settings.redis_url
    assert settings.max_connection_age_s <= 600  # connections rebalance


@pytest.mark.parametrize("name", RENDER_DIRS)
def test_references_resolve(name: str) -> None:
    objects = rendered(name)
    _, pod, container = deployment_parts(objects)
    one(objects, "ServiceAccount", pod["spec"]["serviceAccountName"])
    (secret,) = load_yaml(SECRET_EXAMPLE)
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == [secret["metadata"]["name"]]
    namespace = one(objects, "Namespace")["metadata"]["name"]
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, identity(obj)
    assert secret["metadata"]["namespace"] == namespace


@pytest.mark.parametrize("name", RENDER_DIRS)
def test_services_select_the_pods_and_name_the_ports(name: str) -> None:
    objects = rendered(name)
    _, pod, container = deployment_parts(objects)
    labels = pod["metadata"]["labels"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service = one(objects, "Service", "llm-gateway")
    headless = one(objects, "Service", "llm-gateway-headless")
    assert service["spec"]["type"] == "ClusterIP" and "clusterIP" not in service["spec"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"].get("publishNotReadyAddresses", False) is False
    for svc, wanted in ((service, {"grpc": GRPC_PORT, "metrics": METRICS_PORT}), (headless, {"grpc": GRPC_PORT})):
        assert selects(svc["spec"]["selector"], labels)
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        assert {n: p["port"] for n, p in ports.items()} == wanted
        for port_name, port in ports.items():
            assert container_ports[port["targetPort"]] == wanted[port_name]
        assert ports["grpc"]["appProtocol"] == "grpc"


@pytest.mark.parametrize("name", RENDER_DIRS)
def test_service_monitor_scrapes_the_metrics_port_once(name: str) -> None:
    objects = rendered(name)
    monitor = one(objects, "ServiceMonitor", "llm-gateway")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    service = one(objects, "Service", "llm-gateway")
    headless = one(objects, "Service", "llm-gateway-headless")
    assert selects(selector, service["metadata"]["labels"])
    assert not selects(selector, headless["metadata"]["labels"])  # each pod scraped once
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}[endpoint["port"]] == METRICS_PORT


@pytest.mark.parametrize("name", RENDER_DIRS)
def test_hpa_scales_on_cpu_and_in_flight_calls_and_scales_down_slowly(name: str) -> None:
    objects = rendered(name)
    deployment = one(objects, "Deployment", "llm-gateway")
    hpa = one(objects, "HorizontalPodAutoscaler", "llm-gateway")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm-gateway"}
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    metrics = {m["type"]: m for m in hpa["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Resource"]["resource"]["target"]["type"] == "Utilization"
    pods = metrics["Pods"]["pods"]
    assert pods["metric"]["name"] == IN_FLIGHT_METRIC
    assert pods["target"]["type"] == "AverageValue" and float(pods["target"]["averageValue"]) > 0
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


@pytest.mark.parametrize("name", RENDER_DIRS)
def test_pdb_allows_one_disruption_at_min_replicas(name: str) -> None:
    objects = rendered(name)
    _, pod, _ = deployment_parts(objects)
    pdb = one(objects, "PodDisruptionBudget", "llm-gateway")["spec"]
    min_replicas = one(objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"]
    assert selects(pdb["selector"]["matchLabels"], pod["metadata"]["labels"])
    if "maxUnavailable" in pdb:
        assert pdb["maxUnavailable"] == 1
    else:
        assert pdb["minAvailable"] < min_replicas


@pytest.mark.parametrize("name", RENDER_DIRS)
def test_network_policy_admits_grpc_and_metrics(name: str) -> None:
    objects = rendered(name)
    _, pod, _ = deployment_parts(objects)
    policy = one(objects, "NetworkPolicy", "llm-gateway")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], pod["metadata"]["labels"])
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    ingress = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert ingress == {GRPC_PORT, METRICS_PORT}
    egress = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert egress >= {53, 6379, 5432, 443}  # DNS, Redis, PostgreSQL, the providers


def test_hpa_metric_is_a_gauge_of_the_gateway() -> None:
    from llm_gateway_server.telemetry.metrics import Metrics

    families = {family.name: family for family in Metrics().registry.collect()}
    assert families[IN_FLIGHT_METRIC].type == "gauge"


def test_prometheus_adapter_rule_serves_the_hpa_metric() -> None:
    (config_map,) = load_yaml(ADAPTER_EXAMPLE)
    (rule,) = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == IN_FLIGHT_METRIC
    assert rule["seriesQuery"].startswith(IN_FLIGHT_METRIC + "{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "sum(" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


# -- client-side round robin over the headless Service ----------------------------------------------


def test_readme_documents_the_headless_target() -> None:
    headless = one(rendered("base"), "Service", "llm-gateway-headless")["metadata"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"dns:///{headless['name']}.{headless['namespace']}.svc.cluster.local:{GRPC_PORT}" in readme
    assert SERVICE_CONFIG in readme


async def test_round_robin_service_config_over_dns(make_gateway: Any) -> None:
    """The README's service config, as a Python client sets it, against a real gateway through
    the dns resolver (`localhost` resolves to ::1 and 127.0.0.1; round_robin uses the one that
    answers)."""
    assert json.loads(SERVICE_CONFIG) == {"loadBalancingConfig": [{"round_robin": {}}]}
    gateway = await make_gateway({})
    options = [("grpc.service_config", SERVICE_CONFIG)]
    async with grpc.aio.insecure_channel(f"dns:///localhost:{gateway.running.port}", options=options) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5, wait_for_ready=True)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
