"""deploy/: every overlay renders with `kubectl kustomize`, validates offline against the
Kubernetes 1.32 API schemas (kubernetes-validate, strict), and keeps the settings that
deploy/README.md promises (security, probes, graceful termination, NetworkPolicy, HPA metric
chain, no literal admin key, the pinned release and explicit model control, the KServe canary).

Custom resources (PrometheusRule, ServiceMonitor, InferenceService, ServingRuntime) have no
schema in kubernetes-validate: they get a small structural check of apiVersion, kind and the
fields their controllers require, and the core objects embedded in them (containers, volumes,
pod security context) are validated against the Pod schema. The Serverless (Knative) overlays'
predictor and runtime are also held to the rules Knative Serving's webhook applies to a
revision's pod (its field masks and port rules), so a field Knative refuses fails here.

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

from cxrlt.contract.releases import RELEASE_ENV  # the variable the pipeline models read

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
OVERLAYS = ("cpu", "gpu", "kserve", "kserve-serverless", "kserve-canary")
KSERVE = ("kserve", "kserve-serverless", "kserve-canary")
KNATIVE = ("kserve-serverless", "kserve-canary")  # KServe in Serverless mode: Knative revisions
K8S_VERSION = "1.32"
NAMESPACE = "cxrlt"

TRITON_LABELS = {"app.kubernetes.io/name": "cxrlt-triton", "app.kubernetes.io/component": "inference-server"}
PACS_NODE_LABEL = {"app.kubernetes.io/name": "cxrlt-dicom-node"}
RESTRICTED = {"model-repository", "shared-memory", "statistics", "trace", "logging"}
HEALTH_PREFIX = ["cxrlt", "health", "--url", "127.0.0.1:8001", "--timeout-s"]
KNATIVE_ROUTE = "cxrlt-predictor.cxrlt.svc.cluster.local:80"
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
    if overlay in KNATIVE:
        # Knative rewrites an HTTP liveness probe's port to the serving port (gRPC here); it leaves
        # a gRPC probe alone, and Triton answers grpc.health.v1 on its gRPC port.
        assert liveness.get("grpc") == {"port": 8001} and "httpGet" not in liveness, f"{overlay}: liveness {liveness}"
    else:
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
    if overlay in KNATIVE:
        # Knative refuses both and provides them: its own preStop drains the queue-proxy first, and
        # the grace period is the revision's timeout (300 s unless the predictor sets `timeout`).
        assert "lifecycle" not in container and "terminationGracePeriodSeconds" not in pod, overlay
        assert pod.get("timeout", 300) >= exit_timeout + 15, f"{overlay}: revision timeout below Triton's exit timeout"
        return
    pre_stop = container["lifecycle"]["preStop"]
    sleep = pre_stop["sleep"]["seconds"] if "sleep" in pre_stop else 0
    assert sleep > 0, f"{overlay}: no preStop sleep"
    assert pod["terminationGracePeriodSeconds"] >= sleep + exit_timeout, f"{overlay}: grace period too short"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_runs_in_explicit_model_control_with_every_model_loaded(rendered, overlay):
    """`cxrlt release --url` reloads the pipeline models through the model-repository API, which
    only explicit mode offers; `--load-model=*` keeps loading everything at start (without it a pod
    would load nothing and never become ready), and Triton refuses it beside another --load-model."""
    _, container, _ = triton(rendered[overlay])
    args = container["args"]
    assert _flag(args, "--model-control-mode") == "explicit", f"{overlay}: {_flag(args, '--model-control-mode')}"
    loads = [a for a in args if a.startswith("--load-model")]
    assert loads == ["--load-model=*"], f"{overlay}: {loads}"
    assert not [a for a in args if a.startswith("--repository-poll-secs")], f"{overlay}: repository polling"
    assert _flag(args, "--exit-on-error") == "true", f"{overlay}: a model that fails to load at start must stop the pod"
    # The reload API stays behind the admin key (checked for every restricted protocol above).
    assert "model-repository" in _flag(args, "--grpc-restricted-protocol").partition(":")[0].split(",")


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
    for overlay in KSERVE:
        isvc = only(rendered[overlay], "InferenceService")
        assert isvc["spec"]["predictor"]["model"]["modelFormat"]["name"] == "triton"
        assert not [d for d in kinds(rendered[overlay], "Deployment")], f"{overlay} overlay still renders a Deployment"

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

    # Nothing else is open; in Serverless mode only Knative's data plane reaches its queue-proxy.
    triton_ports, knative_ports = {8000, 8001, 8002}, {8012, 8013, 9090}
    for rule in rules:
        ports = _ports(rule)
        assert ports, f"{overlay}: a rule admits every port: {rule}"
        if ports <= triton_ports:
            continue
        assert overlay in KNATIVE and ports <= knative_ports, f"{overlay}: opens {ports - triton_ports}"
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector"}, f"{overlay}: queue-proxy ports admit {peer}"
            namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            assert namespace in ("knative-serving", "istio-system"), f"{overlay}: queue-proxy ports admit {namespace}"
    if overlay in KNATIVE:
        assert any(8013 in _ports(r) for r in rules), f"{overlay}: Knative cannot reach the pods' h2c queue-proxy port"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_disruption_budget(rendered, overlay):
    objects = rendered[overlay]
    labels = triton_pod_labels(objects)
    service = only(objects, "Service", "cxrlt-triton")
    assert selects(service["spec"]["selector"], labels)
    if overlay in KNATIVE:
        # Only metrics: gRPC or HTTP through this Service would reach every revision's pods around
        # the traffic split; by port number, as the Knative pod declares its serving port only.
        assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [("metrics", 8002, 8002)]
        assert not [s for s in kinds(objects, "Service") if s["metadata"]["name"] == "cxrlt-triton-headless"]
    else:
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


@pytest.mark.parametrize("overlay", KNATIVE)
def test_knative_scales_the_revisions_without_the_hpa(rendered, overlay):
    objects = rendered[overlay]
    assert not kinds(objects, "HorizontalPodAutoscaler"), f"{overlay}: an HPA would target a Deployment Knative never creates"
    isvc = only(objects, "InferenceService")
    predictor = isvc["spec"]["predictor"]
    assert "serving.kserve.io/autoscalerClass" not in isvc["metadata"]["annotations"], "Knative's own autoscaler scales"
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] >= 1
    assert 2 <= predictor["minReplicas"] <= predictor["maxReplicas"], "one replica leaves nothing serving during a drain"


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o not in KNATIVE])
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


def test_scaling_metric_rises_under_load_and_falls_to_zero_a_minute_after_it(tmp_path):
    """The recording rule's behaviour over time, by `promtool test rules` on synthetic counters: 3 requests
    and 6 ms of queueing per 15 s for 2 minutes (2,000 us per request), then none. The replicas e2e test
    (tests/test_cluster.py) shows the rise on a real Prometheus; the fall needs its [1m] window to empty."""
    rules = DEPLOY / "prometheus" / "recording_rules.yml"
    labels = 'namespace="cxrlt", pod="cxrlt-triton-0", model="cxr_findings"'
    recorded = 'cxrlt_queue_time_per_request_us{namespace="cxrlt", pod="cxrlt-triton-0"}'
    unit = {"rule_files": [str(rules.resolve())], "evaluation_interval": "15s", "tests": [{
        "interval": "15s",
        "input_series": [{"series": f"nv_inference_queue_duration_us{{{labels}}}", "values": "0+6000x8 48000x8"},
                         {"series": f"nv_inference_request_success{{{labels}}}", "values": "0+3x8 24x8"}],
        "promql_expr_test": [
            {"expr": "cxrlt_queue_time_per_request_us", "eval_time": "1m30s", "exp_samples": [{"labels": recorded, "value": 2000}]},
            {"expr": "cxrlt_queue_time_per_request_us", "eval_time": "4m", "exp_samples": [{"labels": recorded, "value": 0}]},
        ]}]}
    (tmp_path / "scaling_test.yml").write_text(yaml.safe_dump(unit))
    tested = subprocess.run([_promtool(), "test", "rules", str(tmp_path / "scaling_test.yml")], capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr


# --------------------------------------------------------------------------- releases


def render_overlay(root: Path, resources: list[Path], **fields: Any) -> list[Obj]:
    """Render a user's overlay in `root` over `resources` (kustomize refuses absolute paths to other roots)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(r, root) for r in resources], **fields,
    }))
    return kustomize(root)


def _release_of(value: str, where: str) -> int:
    assert re.fullmatch(r"[1-9][0-9]*", value or ""), f"{where}: {RELEASE_ENV}={value!r} is not a release number"
    return int(value)


def _isvc_release(isvc: Obj) -> int:
    env = {e["name"]: e for e in isvc["spec"]["predictor"]["model"].get("env", [])}
    assert RELEASE_ENV in env, f"InferenceService {isvc['metadata']['name']} pins no release"
    assert "valueFrom" not in env[RELEASE_ENV], "a literal: kustomize does not rewrite generated names inside a custom resource"
    return _release_of(env[RELEASE_ENV]["value"], "InferenceService")


def _deployment_release(objects: list[Obj]) -> tuple[str, int]:
    """(the ConfigMap the Triton container's CXRLT_RELEASE comes from, its value)."""
    _, container, _ = triton(objects)
    env = {e["name"]: e for e in container["env"]}
    ref = env[RELEASE_ENV]["valueFrom"]["configMapKeyRef"]
    assert ref["key"] == RELEASE_ENV and not ref.get("optional"), f"{RELEASE_ENV} must come from the ConfigMap: {ref}"
    config = only(objects, "ConfigMap", ref["name"])
    assert config["metadata"]["name"].startswith("cxrlt-triton-repository-"), "not the generated (hash-named) ConfigMap"
    return ref["name"], _release_of(config["data"][RELEASE_ENV], ref["name"])


@pytest.mark.parametrize("overlay", ("cpu", "gpu"))
def test_the_configmap_pins_the_release_of_every_pod(rendered, overlay):
    _deployment_release(rendered[overlay])


def test_changing_the_pinned_release_rolls_the_deployment_out(rendered, rendered_s3, tmp_path):
    """A user's overlay that sets CXRLT_RELEASE=2: the env var then names another generated
    ConfigMap, so the pod template changes (a rolling update) and nothing else in it does."""
    before = only(rendered["cpu"], "Deployment", "cxrlt-triton")
    name_before, release_before = _deployment_release(rendered["cpu"])
    objects = render_overlay(tmp_path / "release-2", [DEPLOY / "overlays" / "cpu"], configMapGenerator=[{
        "name": "cxrlt-triton-repository", "behavior": "merge", "literals": [f"{RELEASE_ENV}=2"]}])
    name_after, release_after = _deployment_release(objects)
    assert (release_before, release_after) == (1, 2)
    assert name_after != name_before, "the pod template would not change: no rollout"
    after = only(objects, "Deployment", "cxrlt-triton")
    assert yaml.safe_dump(after).replace(name_after, name_before) == yaml.safe_dump(before)
    _deployment_release(rendered_s3)  # the s3 component keeps the pin


@pytest.mark.parametrize("overlay", KSERVE)
def test_each_inference_service_pins_a_release(rendered, overlay):
    _isvc_release(only(rendered[overlay], "InferenceService"))


def test_raw_deployment_kserve_has_no_canary(rendered):
    """KServe ignores canaryTrafficPercent in RawDeployment mode without an error (kserve#5335):
    the candidate would silently take all the traffic."""
    isvc = only(rendered["kserve"], "InferenceService")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]


def test_kserve_canary_is_the_stable_state_with_the_candidate_release_and_a_traffic_share(rendered):
    stable, canary = rendered["kserve-serverless"], rendered["kserve-canary"]
    stable_isvc, canary_isvc = only(stable, "InferenceService"), only(canary, "InferenceService")
    assert canary_isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] in ("Serverless", "Knative"), \
        "canaryTrafficPercent splits traffic only between Knative revisions"
    percent = canary_isvc["spec"]["predictor"]["canaryTrafficPercent"]
    assert isinstance(percent, int) and 0 < percent < 100, f"canaryTrafficPercent {percent}"
    assert "canaryTrafficPercent" not in stable_isvc["spec"]["predictor"], "the stable state must send 100 % to one revision"
    live, candidate = _isvc_release(stable_isvc), _isvc_release(canary_isvc)
    assert candidate != live, f"the canary serves the live release {live}"

    # The candidate revision is the stable one with another release: same storageUri, image and
    # settings. So promoting (the stable overlay with the candidate's release) changes no pod
    # template: Knative keeps the canary's revision and its pods, now at 100 %.
    def without_canary(isvc: Obj, release: int) -> Obj:
        isvc = copy.deepcopy(isvc)
        isvc["spec"]["predictor"].pop("canaryTrafficPercent", None)
        for env in isvc["spec"]["predictor"]["model"]["env"]:
            if env["name"] == RELEASE_ENV:
                env["value"] = str(release)
        return isvc

    assert without_canary(canary_isvc, 0) == without_canary(stable_isvc, 0)
    others = lambda objects: sorted(yaml.safe_dump(o) for o in objects if o["kind"] != "InferenceService")  # noqa: E731
    assert others(canary) == others(stable), "the canary overlay changes more than the InferenceService"


# What Knative Serving's webhook admits in a revision's pod with its default feature flags
# (knative/serving pkg/apis/serving/fieldmask.go and k8s_validation.go, August 2026). KServe copies
# the predictor's pod fields and the runtime's container into the Knative Service it creates.
KNATIVE_POD_FIELDS = {"serviceAccountName", "containers", "volumes", "imagePullSecrets", "enableServiceLinks",
                      "automountServiceAccountToken"}
KNATIVE_CONTAINER_FIELDS = {"name", "args", "command", "env", "workingDir", "envFrom", "image", "imagePullPolicy",
                            "livenessProbe", "readinessProbe", "startupProbe", "ports", "resources", "securityContext",
                            "terminationMessagePath", "terminationMessagePolicy", "volumeMounts"}
KNATIVE_SECURITY_CONTEXT = {"capabilities", "readOnlyRootFilesystem", "runAsUser", "runAsGroup", "runAsNonRoot",
                            "allowPrivilegeEscalation", "seccompProfile", "privileged"}
KNATIVE_VOLUME_SOURCES = {"secret", "configMap", "projected", "emptyDir"}  # KServe mounts a pvc:// repository itself
KNATIVE_PORT_NAMES = {"h2c", "http1", ""}
KNATIVE_RESERVED_PORTS = {8012, 8013, 8022, 9090, 9091, 8008}  # queue-proxy, autoscaler metrics, profiling
KNATIVE_RESERVED_ENV = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}
KSERVE_RAW_ONLY = {"deploymentStrategy"}  # KServe: "customizing deploymentStrategy is only supported for raw deployment mode"


def knative_refusals(runtime: Obj, predictor: Obj) -> list[str]:
    """What Knative (or KServe in Serverless mode) would refuse in this predictor and runtime."""
    problems = [f"pod field {f}" for f in sorted(set(predictor) - ISVC_COMPONENT_FIELDS - {"model"} - KNATIVE_POD_FIELDS)]
    problems += [f"{f} (raw deployment mode only)" for f in sorted(KSERVE_RAW_ONLY & set(predictor))]
    if predictor.get("automountServiceAccountToken") is True:
        problems.append("automountServiceAccountToken may only be false")
    containers = runtime["spec"]["containers"]
    ports = [p for c in containers for p in c.get("ports", [])]
    if len(ports) != 1:
        problems.append(f"{len(ports)} container ports: Knative serves exactly one")
    for port in ports:
        if port.get("name", "") not in KNATIVE_PORT_NAMES:
            problems.append(f"port name {port.get('name')!r} (h2c, http1 or none)")
        if port["containerPort"] in KNATIVE_RESERVED_PORTS:
            problems.append(f"port {port['containerPort']} is reserved by Knative")
    serving_port = ports[0]["containerPort"] if ports else 8080
    env = [e["name"] for c in containers for e in c.get("env", [])] + [e["name"] for e in predictor["model"].get("env", [])]
    problems += [f"reserved environment variable {name}" for name in env if name in KNATIVE_RESERVED_ENV]
    for c in containers:
        problems += [f"container field {f}" for f in sorted(set(c) - KNATIVE_CONTAINER_FIELDS)]
        context = c.get("securityContext", {})
        problems += [f"securityContext.{f}" for f in sorted(set(context) - KNATIVE_SECURITY_CONTEXT)]
        if context.get("privileged") is True:
            problems.append("privileged may only be false")
        if c["name"] == "queue-proxy":
            problems.append("the container name queue-proxy is Knative's")
        liveness = c.get("livenessProbe", {})
        for handler in ("httpGet", "tcpSocket"):
            if handler in liveness and liveness[handler].get("port") not in (None, 0, serving_port):
                problems.append(f"liveness {handler} on port {liveness[handler]['port']}: Knative moves it to {serving_port}")
    for volume in runtime["spec"].get("volumes", []) + predictor.get("volumes", []):
        problems += [f"volume {volume['name']}: {source}" for source in sorted(set(volume) - {"name"} - KNATIVE_VOLUME_SOURCES)]
    return problems


def _predictor_and_runtime(objects: list[Obj]) -> tuple[Obj, Obj]:
    isvc = only(objects, "InferenceService")
    return isvc["spec"]["predictor"], only(objects, "ServingRuntime", isvc["spec"]["predictor"]["model"]["runtime"])


@pytest.mark.parametrize("overlay", KNATIVE)
def test_knative_admits_the_serverless_predictor(rendered, overlay):
    predictor, runtime = _predictor_and_runtime(rendered[overlay])
    assert knative_refusals(runtime, predictor) == [], overlay
    (port,) = runtime["spec"]["containers"][0]["ports"]
    assert (port["name"], port["containerPort"]) == ("h2c", 8001), "requests arrive as gRPC (the DICOM node's protocol)"


def test_the_knative_check_refuses_the_raw_deployment_predictor(rendered):
    """The check has teeth: the RawDeployment overlay's pod uses what Knative refuses."""
    predictor, runtime = _predictor_and_runtime(rendered["kserve"])
    refused = " | ".join(knative_refusals(runtime, predictor))
    for expected in ("3 container ports", "port name 'grpc'", "container field lifecycle",
                     "pod field terminationGracePeriodSeconds", "pod field securityContext", "deploymentStrategy"):
        assert expected in refused, f"{expected!r} not in {refused}"
    predictor, runtime = _predictor_and_runtime(rendered["kserve-serverless"])
    runtime = copy.deepcopy(runtime)
    runtime["spec"]["containers"][0]["livenessProbe"] = {"httpGet": {"path": "/v2/health/live", "port": 8000}}
    assert knative_refusals(runtime, predictor) == ["liveness httpGet on port 8000: Knative moves it to 8001"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_dicom_node_calls_where_the_traffic_is_split(rendered, overlay):
    args = only(rendered[overlay], "StatefulSet", "cxrlt-dicom-node")["spec"]["template"]["spec"]["containers"][0]["args"]
    url = args[args.index("--url") + 1]
    assert url == (KNATIVE_ROUTE if overlay in KNATIVE else "cxrlt-triton:8001"), f"{overlay}: the node calls {url}"


def _documented_release_commands() -> list[str]:
    """Every `cxrlt release ...` command in deploy/README.md's code blocks (continuations joined,
    cut at the end of an `sh -c '...'` string or a shell operator)."""
    blocks, block, fence = [], [], None
    for line in (DEPLOY / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if fence is None:
                fence, block = line[3:].strip(), []
            else:
                if fence in ("bash", "sh", ""):
                    blocks.append("\n".join(block))
                fence = None
        elif fence is not None:
            block.append(line)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            start = line.find("cxrlt release ")
            if start >= 0:
                commands.append(re.split(r"'|\|\||&&|;|\s#", line[start:])[0].strip())
    return commands


SHELL_VARIABLES = {"$MODEL_REPOSITORY": "/models/paper-ngc", "$CXRLT_RELEASE": "2"}  # as the container has them


def test_documented_release_commands_parse_with_the_cli():
    import argparse
    import shlex

    from cxrlt.cli.commands import release

    parser = argparse.ArgumentParser(prog="cxrlt release", exit_on_error=False)
    release.add_arguments(parser)
    commands = _documented_release_commands()
    assert len(commands) >= 4, commands
    in_pod = set()
    for command in commands:
        try:
            words = [SHELL_VARIABLES.get(w, w) for w in shlex.split(command)[2:]]
            args = parser.parse_args(words)
        except (argparse.ArgumentError, SystemExit) as exc:
            raise AssertionError(f"deploy/README.md documents `{command}`, which cxrlt release refuses: {exc}") from None
        assert not args.save, f"`{command}`: the pods mount the repository read-only"
        if args.url and args.action in ("shadow", "canary", "promote", "rollback"):  # without --url: the build machine's copy
            assert args.url == "127.0.0.1:8001", f"`{command}`: run in the pod, against its own server"
            assert str(args.admin_key_file) == "/dev/stdin", f"`{command}`: the key comes from the container's environment"
            in_pod.add(args.action)
    assert {"promote", "rollback", "canary", "shadow"} <= in_pod, in_pod


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
