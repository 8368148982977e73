"""deploy/: every overlay renders with `kubectl kustomize`, validates offline against the
Kubernetes 1.32 API schemas (kubernetes-validate, strict), and keeps the settings that
deploy/README.md promises (security, probes, graceful termination, NetworkPolicy, HPA metric
chain, no literal admin key).

Custom resources (PrometheusRule, ServiceMonitor, InferenceService, ServingRuntime) have no
schema in kubernetes-validate: they get a small structural check of apiVersion, kind and the
fields their controllers require, and the core objects embedded in them (containers, volumes,
pod security context) are validated against the Pod schema.

Needs `kubectl` (1.32, with Kustomize v5) on PATH; no cluster, no network.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
OVERLAYS = ("cpu", "gpu", "kserve")
K8S_VERSION = "1.32"
NAMESPACE = "cxrlt"

TRITON_LABELS = {"app.kubernetes.io/name": "cxrlt-triton", "app.kubernetes.io/component": "inference-server"}
PACS_NODE_LABEL = {"app.kubernetes.io/name": "cxrlt-dicom-node"}
RESTRICTED = {"model-repository", "shared-memory", "statistics", "trace", "logging"}
HEALTH_PREFIX = ["cxrlt", "health", "--url", "127.0.0.1:8001", "--timeout-s"]
STARTUP_BUDGET_S = 600

Obj = dict[str, Any]


# --------------------------------------------------------------------------- rendering


def kustomize(directory: Path) -> list[Obj]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (1.32, with Kustomize v5) must be on PATH to render deploy/")
    proc = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed (exit {proc.returncode}):\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {name: kustomize(DEPLOY / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def rendered_s3(tmp_path_factory) -> list[Obj]:
    """The cpu overlay with the s3-repository component, as a user's overlay would combine them."""
    root = tmp_path_factory.mktemp("s3-overlay")
    deploy = Path(os.path.relpath(DEPLOY, root))  # kustomize refuses absolute paths to other roots
    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [str(deploy / "overlays" / "cpu")],
        "components": [str(deploy / "components" / "s3-repository")],
        "configMapGenerator": [{
            "name": "cxrlt-triton-repository", "behavior": "merge",
            "literals": ["MODEL_REPOSITORY=s3://bucket/cxrlt/paper-ngc/release-1"],
        }],
    }))
    return kustomize(root)


def all_rendered(rendered: dict[str, list[Obj]]) -> Iterator[tuple[str, Obj]]:
    for overlay, objects in rendered.items():
        for obj in objects:
            yield overlay, obj


def only(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kinds(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------- validation


def _require(obj: Obj, dotted: str) -> Any:
    value: Any = obj
    for key in dotted.split("."):
        assert isinstance(value, dict) and key in value, f"{obj['kind']} {obj['metadata'].get('name')}: missing {dotted}"
        value = value[key]
    return value


def _validate_as_pod(spec: Obj, what: str) -> None:
    """Validate core objects embedded in a custom resource against the Pod schema."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "embedded"}, "spec": spec}
    try:
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"{what}: {exc}") from exc


def check_prometheus_rule(obj: Obj) -> None:
    groups = _require(obj, "spec.groups")
    assert groups, "PrometheusRule without groups"
    for group in groups:
        assert group.get("name") and group.get("rules"), f"rule group needs name and rules: {group}"
        for rule in group["rules"]:
            assert ("record" in rule) != ("alert" in rule), f"a rule is either record or alert: {rule}"
            assert isinstance(rule.get("expr"), str) and rule["expr"].strip(), f"rule without expr: {rule}"
            assert set(rule) <= {"record", "alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule


def check_service_monitor(obj: Obj) -> None:
    _require(obj, "spec.selector.matchLabels")
    endpoints = _require(obj, "spec.endpoints")
    assert endpoints and all("port" in e or "targetPort" in e for e in endpoints), endpoints


def check_serving_runtime(obj: Obj) -> None:
    formats = _require(obj, "spec.supportedModelFormats")
    assert all(f.get("name") for f in formats), formats
    containers = _require(obj, "spec.containers")
    assert containers and all(c.get("name") and c.get("image") for c in containers), containers
    _validate_as_pod({"containers": containers, "volumes": obj["spec"].get("volumes", [])}, "ServingRuntime pod parts")


ISVC_COMPONENT_FIELDS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency", "timeout",
                         "canaryTrafficPercent", "logger", "batcher", "labels", "annotations", "deploymentStrategy"}


def check_inference_service(obj: Obj) -> None:
    predictor = _require(obj, "spec.predictor")
    model = _require(obj, "spec.predictor.model")
    assert _require(obj, "spec.predictor.model.modelFormat.name")
    assert re.match(r"^(pvc|s3|gs|https?)://", model.get("storageUri", "")), f"storageUri: {model.get('storageUri')}"
    pod_fields = {k: v for k, v in predictor.items() if k not in ISVC_COMPONENT_FIELDS | {"model"}}
    _validate_as_pod({**pod_fields, "containers": [{"name": "kserve-container", "image": "x"}]}, "InferenceService predictor")
    if "deploymentStrategy" in predictor:
        deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
                      "spec": {"selector": {"matchLabels": {"a": "b"}}, "strategy": predictor["deploymentStrategy"],
                               "template": {"metadata": {"labels": {"a": "b"}},
                                            "spec": {"containers": [{"name": "c", "image": "x"}]}}}}
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


CRD_CHECKS = {
    ("monitoring.coreos.com/v1", "PrometheusRule"): check_prometheus_rule,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): check_service_monitor,
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): check_serving_runtime,
    ("serving.kserve.io/v1beta1", "InferenceService"): check_inference_service,
}


def validate(obj: Obj) -> None:
    """Kubernetes 1.32 schema (strict: unknown fields fail) or, for a known CRD, the structural check."""
    assert obj.get("metadata", {}).get("name"), f"object without metadata.name: {obj}"
    check = CRD_CHECKS.get((obj.get("apiVersion"), obj.get("kind")))
    if check is not None:
        check(obj)
        return
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_kubernetes_1_32(rendered, overlay):
    objects = rendered[overlay]
    assert objects, f"{overlay} rendered nothing"
    for obj in objects:
        try:
            validate(obj)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{overlay}: no schema and no structural check for {obj['apiVersion']} {obj['kind']}")
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {obj['kind']} {obj['metadata']['name']} is invalid: {exc}")
        assert "$patch" not in yaml.safe_dump(obj), f"{overlay}: a patch directive leaked into {obj['kind']}"


def test_s3_component_and_loader_pod_validate(rendered_s3):
    for obj in rendered_s3 + [load_yaml(DEPLOY / "tools" / "repository-loader.yaml")]:
        validate(obj)


def test_validator_rejects_broken_manifests(rendered):
    deployment = only(rendered["cpu"], "Deployment", "cxrlt-triton")
    validate(deployment)  # the original passes ...

    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(wrong_type)

    unknown_field = copy.deepcopy(deployment)
    unknown_field["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFS"] = True  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(unknown_field)
    kubernetes_validate.validate(unknown_field, K8S_VERSION, strict=False)  # ... which only strict mode catches

    broken_crd = copy.deepcopy(only(rendered["cpu"], "PrometheusRule", "cxrlt-triton"))
    del broken_crd["spec"]["groups"][0]["rules"][0]["expr"]
    with pytest.raises(AssertionError):
        validate(broken_crd)

    broken_runtime = copy.deepcopy(only(rendered["kserve"], "ServingRuntime"))
    broken_runtime["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(AssertionError):
        validate(broken_runtime)


# --------------------------------------------------------------------------- pods and containers


def pod_specs(objects: list[Obj]) -> Iterator[tuple[str, Obj, list[Obj]]]:
    """(what, pod-level spec, containers) for every workload, the KServe ones included."""
    for obj in objects:
        what = f"{obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            spec = obj["spec"]["template"]["spec"]
            yield what, spec, spec["containers"] + spec.get("initContainers", [])
        elif obj["kind"] == "Pod":
            yield what, obj["spec"], obj["spec"]["containers"] + obj["spec"].get("initContainers", [])
        elif obj["kind"] == "CronJob":
            spec = obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            yield what, spec, spec["containers"]
    runtimes = kinds(objects, "ServingRuntime")
    for isvc in kinds(objects, "InferenceService"):
        runtime = only(runtimes, "ServingRuntime", isvc["spec"]["predictor"]["model"]["runtime"])
        yield f"InferenceService {isvc['metadata']['name']}", isvc["spec"]["predictor"], runtime["spec"]["containers"]


def triton(objects: list[Obj]) -> tuple[Obj, Obj, list[Obj]]:
    """(pod spec, Triton container, pod volumes) whether a Deployment or KServe runs it."""
    deployments = [d for d in kinds(objects, "Deployment") if d["metadata"]["name"] == "cxrlt-triton"]
    if deployments:
        spec = deployments[0]["spec"]["template"]["spec"]
        return spec, _named(spec["containers"], "tritonserver"), spec["volumes"]
    isvc = only(objects, "InferenceService")
    runtime = only(objects, "ServingRuntime", isvc["spec"]["predictor"]["model"]["runtime"])
    volumes = runtime["spec"].get("volumes", []) + isvc["spec"]["predictor"].get("volumes", [])
    return isvc["spec"]["predictor"], _named(runtime["spec"]["containers"], "kserve-container"), volumes


def _named(items: list[Obj], name: str) -> Obj:
    found = [i for i in items if i.get("name") == name]
    assert len(found) == 1, f"expected one {name!r} in {[i.get('name') for i in items]}"
    return found[0]


def triton_pod_labels(objects: list[Obj]) -> dict[str, str]:
    deployments = [d for d in kinds(objects, "Deployment") if d["metadata"]["name"] == "cxrlt-triton"]
    if deployments:
        return deployments[0]["spec"]["template"]["metadata"]["labels"]
    return only(objects, "InferenceService")["spec"]["predictor"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_hardened(rendered, overlay):
    workloads = list(pod_specs(rendered[overlay]))
    assert len(workloads) >= 2, f"{overlay}: expected Triton and the DICOM node"
    for what, pod, containers in workloads:
        pod_ctx = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, f"{what}: service account token mounted"
        for c in containers:
            ctx = c.get("securityContext", {})
            where = f"{overlay}: {what} container {c['name']}"
            assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, f"{where}: not runAsNonRoot"
            assert ctx.get("runAsUser", pod_ctx.get("runAsUser", 0)) > 0, f"{where}: runAsUser missing or root"
            assert ctx.get("runAsGroup", pod_ctx.get("runAsGroup", 0)) > 0, f"{where}: runAsGroup missing or root"
            assert ctx.get("readOnlyRootFilesystem") is True, f"{where}: root filesystem writable"
            assert ctx.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation allowed"
            assert ctx.get("privileged", False) is False, f"{where}: privileged"
            assert "ALL" in ctx.get("capabilities", {}).get("drop", []), f"{where}: capabilities not dropped"
            assert not ctx.get("capabilities", {}).get("add"), f"{where}: adds capabilities"
            seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", f"{where}: seccomp {seccomp}"
            resources = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{where}: {kind} needs cpu and memory"


def test_loader_pod_is_hardened():
    loader = load_yaml(DEPLOY / "tools" / "repository-loader.yaml")
    for _, pod, containers in pod_specs([loader]):
        for c in containers:
            ctx = c["securityContext"]
            assert ctx["runAsNonRoot"] and ctx["readOnlyRootFilesystem"] and not ctx["allowPrivilegeEscalation"]
            assert ctx["capabilities"]["drop"] == ["ALL"]


def _volume_for(container: Obj, volumes: list[Obj], mount_path: str) -> Obj:
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == mount_path]
    assert len(mounts) == 1, f"{container['name']}: no single mount at {mount_path}"
    return _named(volumes, mounts[0]["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_shared_memory_and_tmp_are_emptydirs(rendered, overlay):
    _, container, volumes = triton(rendered[overlay])
    shm = _volume_for(container, volumes, "/dev/shm")
    assert shm.get("emptyDir", {}).get("medium") == "Memory", f"{overlay}: /dev/shm is {shm}"
    assert shm["emptyDir"].get("sizeLimit"), f"{overlay}: /dev/shm without sizeLimit"
    tmp = _volume_for(container, volumes, "/tmp")
    assert "emptyDir" in tmp and tmp["emptyDir"].get("sizeLimit"), f"{overlay}: /tmp is {tmp}"


def _probe_budget(probe: Obj) -> int:
    return probe.get("failureThreshold", 3) * probe.get("periodSeconds", 10)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_probes(rendered, overlay):
    _, container, _ = triton(rendered[overlay])

    readiness = container["readinessProbe"]
    assert set(readiness) - {"exec"} <= {"periodSeconds", "timeoutSeconds", "failureThreshold", "successThreshold",
                                         "initialDelaySeconds"}, f"{overlay}: readiness is not the exec probe"
    command = readiness["exec"]["command"]
    assert command[:5] == HEALTH_PREFIX and len(command) == 6, f"{overlay}: readiness runs {command}"
    assert readiness["timeoutSeconds"] > float(command[5]), f"{overlay}: probe times out before `cxrlt health` does"

    liveness = container["livenessProbe"]
    assert liveness["httpGet"]["path"] == "/v2/health/live", f"{overlay}: liveness {liveness}"
    assert liveness["httpGet"]["port"] in (8000, "http")

    startup = container["startupProbe"]
    assert "httpGet" in startup and startup["httpGet"]["path"].startswith("/v2/health/")
    assert _probe_budget(startup) >= STARTUP_BUDGET_S, f"{overlay}: startup budget {_probe_budget(startup)} s"


def _flag(args: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    assert len(values) <= 1, f"{name} given twice"
    return values[0] if values else None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_arguments_and_admin_key(rendered, overlay):
    pod, container, _ = triton(rendered[overlay])
    args = container["args"]
    assert "command" not in container and args[0] == "tritonserver", f"{overlay}: does not run tritonserver: {args[:1]}"
    assert _flag(args, "--model-repository") in ("$(MODEL_REPOSITORY)", "/mnt/models")
    assert _flag(args, "--strict-readiness") == "true"
    assert _flag(args, "--exit-on-error") in ("true", "false")
    assert _flag(args, "--metrics-port") == "8002" and _flag(args, "--grpc-port") == "8001"
    assert _flag(args, "--http-port") == "8000"
    for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):
        value = _flag(args, flag)
        assert value is not None, f"{overlay}: {flag} missing"
        protocols, _, header = value.partition(":")
        assert set(protocols.split(",")) == RESTRICTED, f"{overlay}: {flag} restricts {protocols}"
        assert header == "admin-key=$(ADMIN_KEY)", f"{overlay}: {flag} key is {header!r}"
    env = {e["name"]: e for e in container["env"]}
    secret = env["ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] and secret["key"] and "value" not in env["ADMIN_KEY"]

    exit_timeout = int(_flag(args, "--exit-timeout-secs") or 30)
    pre_stop = container["lifecycle"]["preStop"]
    sleep = pre_stop["sleep"]["seconds"] if "sleep" in pre_stop else 0
    assert sleep > 0, f"{overlay}: no preStop sleep"
    assert pod["terminationGracePeriodSeconds"] >= sleep + exit_timeout, f"{overlay}: grace period too short"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_literal_admin_key_in_any_manifest(rendered, overlay):
    assert not kinds(rendered[overlay], "Secret"), f"{overlay}: renders a Secret (the admin key is created out of band)"
    text = yaml.safe_dump_all(rendered[overlay])
    for source in [text] + [p.read_text() for p in DEPLOY.rglob("*.yaml")] + [p.read_text() for p in DEPLOY.rglob("*.yml")]:
        for match in re.finditer(r"admin-key=(\S*)", source):
            assert match.group(1).startswith("$(ADMIN_KEY)"), f"literal admin key: {match.group(0)}"


def test_gpu_overlay_requests_a_gpu_and_the_others_do_not(rendered):
    for overlay in OVERLAYS:
        pod, container, _ = triton(rendered[overlay])
        resources = container["resources"]
        gpus = {kind: resources.get(kind, {}).get("nvidia.com/gpu") for kind in ("requests", "limits")}
        if overlay == "gpu":
            assert gpus == {"requests": 1, "limits": 1}, f"gpu overlay: {gpus}"
            assert pod.get("nodeSelector") and pod.get("tolerations"), "gpu overlay: no GPU node selector/toleration"
        else:
            assert gpus == {"requests": None, "limits": None}, f"{overlay}: asks for GPUs {gpus}"


def test_each_overlay_serves_its_repository(rendered, rendered_s3):
    def repository(objects: list[Obj]) -> str:
        config = [c for c in kinds(objects, "ConfigMap") if c["metadata"]["name"].startswith("cxrlt-triton-repository")]
        return only(config, "ConfigMap")["data"]["MODEL_REPOSITORY"]

    assert repository(rendered["cpu"]).startswith("/models/")
    assert "tensorrt" in repository(rendered["gpu"])
    isvc = only(rendered["kserve"], "InferenceService")
    assert isvc["spec"]["predictor"]["model"]["modelFormat"]["name"] == "triton"
    assert not [d for d in kinds(rendered["kserve"], "Deployment")], "kserve overlay still renders a Deployment"

    assert repository(rendered_s3).startswith("s3://")
    _, container, volumes = triton(rendered_s3)
    assert not [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
    assert not kinds(rendered_s3, "PersistentVolumeClaim")
    assert {"secretRef": {"name": "cxrlt-s3-credentials", "optional": True}} in container["envFrom"]


# --------------------------------------------------------------------------- network, services, disruption


def _ports(rule: Obj) -> set[int]:
    return {p["port"] for p in rule.get("ports", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_inference_only_from_the_pacs_node(rendered, overlay):
    objects = rendered[overlay]
    labels = triton_pod_labels(objects)
    assert selects(TRITON_LABELS, labels), f"{overlay}: Triton pods labelled {labels}"
    policies = [p for p in kinds(objects, "NetworkPolicy") if selects(p["spec"]["podSelector"].get("matchLabels", {}), labels)]
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"] and not p["spec"].get("ingress")
               for p in policies), f"{overlay}: no default-deny ingress policy"
    rules = [r for p in policies if "Ingress" in p["spec"]["policyTypes"] for r in p["spec"].get("ingress", [])]
    for port in (8000, 8001):
        admitting = [r for r in rules if port in _ports(r) or not r.get("ports")]
        assert admitting, f"{overlay}: nothing admits {port}"
        for rule in admitting:
            assert rule.get("from"), f"{overlay}: port {port} open to everyone"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"{overlay}: port {port} admits {peer}"
                assert peer["podSelector"] == {"matchLabels": PACS_NODE_LABEL}, f"{overlay}: port {port} admits {peer}"
    for rule in [r for r in rules if 8002 in _ports(r) or not r.get("ports")]:
        for peer in rule["from"]:
            assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "prometheus", peer
            assert "namespaceSelector" in peer, f"{overlay}: metrics admitted from {peer}"

    dicom = only(objects, "StatefulSet", "cxrlt-dicom-node")
    assert selects(PACS_NODE_LABEL, dicom["spec"]["template"]["metadata"]["labels"]), "DICOM node lacks the PACS label"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_disruption_budget(rendered, overlay):
    objects = rendered[overlay]
    labels = triton_pod_labels(objects)
    service = only(objects, "Service", "cxrlt-triton")
    assert selects(service["spec"]["selector"], labels)
    assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} == {("grpc", 8001), ("http", 8000), ("metrics", 8002)}
    dicom = only(objects, "Service", "cxrlt-dicom-node")
    assert ("dicom", 11112) in {(p["name"], p["port"]) for p in dicom["spec"]["ports"]}

    pdb = only(objects, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1

    monitors = [m for m in kinds(objects, "ServiceMonitor") if selects(m["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])]
    assert len(monitors) == 1 and monitors[0]["spec"]["endpoints"][0]["port"] == "metrics"
    scraped_services = [s for s in kinds(objects, "Service")
                        if selects(monitors[0]["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in scraped_services] == ["cxrlt-triton"], "a Triton pod would be scraped twice"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespace_and_common_labels(rendered, overlay):
    for obj in rendered[overlay]:
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == NAMESPACE
            continue
        assert obj["metadata"].get("namespace") == NAMESPACE, f"{overlay}: {obj['kind']} {obj['metadata']['name']}"
        assert obj["metadata"]["labels"].get("app.kubernetes.io/part-of") == "cxrlt", f"{overlay}: {obj['kind']}"


# --------------------------------------------------------------------------- autoscaling metric chain


def _recording_rules(groups: list[Obj]) -> dict[str, str]:
    return {r["record"]: r["expr"] for g in groups for r in g["rules"] if "record" in r}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_metric_is_the_recorded_and_adapted_series(rendered, overlay):
    objects = rendered[overlay]
    hpa = only(objects, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    name = metric["pods"]["metric"]["name"]
    assert name == "cxrlt_queue_time_per_request_us"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0
    assert hpa["spec"]["minReplicas"] >= 2, "one replica leaves nothing serving during a drain or a dead stub"

    target = hpa["spec"]["scaleTargetRef"]
    deployments = [d["metadata"]["name"] for d in kinds(objects, "Deployment")]
    if overlay == "kserve":
        isvc = only(objects, "InferenceService")
        assert target["name"] == f"{isvc['metadata']['name']}-predictor"
        assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "external"
    else:
        assert target["name"] in deployments

    recorded = _recording_rules(only(objects, "PrometheusRule", "cxrlt-triton")["spec"]["groups"])
    plain = _recording_rules(load_yaml(DEPLOY / "prometheus" / "recording_rules.yml")["groups"])
    assert name in recorded and name in plain
    assert recorded[name] == plain[name], "the PrometheusRule and recording_rules.yml disagree"
    assert "nv_inference_queue_duration_us" in recorded[name] and "nv_inference_request_success" in recorded[name]

    adapter = yaml.safe_load(only(objects, "ConfigMap", "cxrlt-prometheus-adapter-rules")["data"]["config.yaml"])
    exposing = [r for r in adapter["rules"] if r["name"]["as"] == name]
    assert len(exposing) == 1, f"the adapter exposes no {name}"
    rule = exposing[0]
    assert rule["seriesQuery"].startswith(name + "{") or rule["seriesQuery"] == name
    assert re.fullmatch(rule["name"]["matches"], name)
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


# ------------------------------------------------------------------------------ drift rules


def _promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.skip("promtool is not installed (Debian's prometheus package; .ci/run installs it)")
    return found


def test_shipped_drift_rules_pass_promtool_and_match_the_prometheus_rule():
    rules = DEPLOY / "prometheus" / "drift_rules.yml"
    checked = subprocess.run([_promtool(), "check", "rules", str(rules)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    resource = load_yaml(DEPLOY / "base" / "prometheusrule-cxrlt-drift.yaml")
    assert resource["kind"] == "PrometheusRule" and resource["spec"]["groups"] == load_yaml(rules)["groups"]
    alerts = {r["alert"] for g in resource["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert {"CxrltFindingRateDrift", "CxrltProjectionMixDrift"} <= alerts


def test_every_grafana_query_names_a_shipped_recording_rule_or_alert():
    import json

    groups = load_yaml(DEPLOY / "prometheus" / "drift_rules.yml")["groups"]
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    alerts = {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
    dashboard = json.loads((DEPLOY / "grafana" / "cxrlt-drift-dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert queries
    for query in queries:
        names = set(re.findall(r"cxrlt:[a-z_:]+", query))
        assert names or "ALERTS" in query, query
        assert names <= recorded, f"{query}: {names - recorded} is no shipped recording rule"
        for alert in re.findall(r"Cxrlt[A-Za-z]+", query):
            assert alert in alerts, f"{query}: no alert {alert}"
