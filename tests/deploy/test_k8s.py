"""k8s/ without a cluster: every manifest against the Kubernetes schemas (kubernetes-validate, strict), every
kustomization lists every manifest of its folder, the restricted Pod Security profile holds for every pod, and
the wiring between objects (selectors, ports, probes, volumes, GPU placement, grace periods) is consistent."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy import files

K8S_VERSION = "1.30"  # the oldest release these manifests promise to work on
DOCS = files.k8s_documents()
CRD_KINDS = {"ScaledObject", "TriggerAuthentication"}  # KEDA's, not in the Kubernetes schemas: see below
NAMESPACE = "ddpm"


def _ids(docs: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    return [f"{p.relative_to(files.K8S)}:{d['kind']}/{d['metadata']['name']}" for p, d in docs]


@pytest.mark.parametrize(("path", "doc"), DOCS, ids=_ids(DOCS))
def test_manifests_follow_the_kubernetes_schemas(path: Path, doc: dict[str, Any]) -> None:
    if doc["kind"] in CRD_KINDS:
        pytest.skip(f"{doc['kind']} is a CRD: see test_the_keda_scaled_object_has_the_right_shape")
    for version in (K8S_VERSION, kubernetes_validate.latest_version()):
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_a_misspelt_field() -> None:
    doc = yaml.safe_load((files.K8S / "pdb.yaml").read_text().split("---")[0])
    doc["spec"]["minAvailabel"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# ---- kustomize ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kustomization", files.kustomizations(), ids=lambda p: str(p.relative_to(files.ROOT)))
def test_each_kustomization_lists_every_manifest_of_its_folder(kustomization: Path) -> None:
    doc = yaml.safe_load(kustomization.read_text())
    listed = set(doc.get("resources", []))
    present = {p.name for p in kustomization.parent.glob("*.yaml")
               if p.name != "kustomization.yaml" and p not in files.kustomize_configurations()}
    assert listed == present, f"listed but missing: {listed - present}; present but not listed: {present - listed}"
    assert doc["apiVersion"].startswith("kustomize.config.k8s.io/")
    if doc["kind"] == "Kustomization":
        assert doc["namespace"] == NAMESPACE


def test_the_base_is_the_service_and_the_optional_parts_are_separate() -> None:
    base = yaml.safe_load((files.K8S / "kustomization.yaml").read_text())
    for component in ("keda", "checkpoints", "checkpoints-rwo"):
        assert yaml.safe_load((files.K8S / component / "kustomization.yaml").read_text())["kind"] == "Component"
    assert "keda" not in str(base) and "train" not in str(base["resources"]) and "checkpoints" not in str(base)
    assert {image["name"] for image in base["images"]} == set(files.DDPM_IMAGES)
    train = yaml.safe_load((files.K8S / "train" / "kustomization.yaml").read_text())
    cuda = [i for i in base["images"] if i["name"] == "ddpm-service-cuda"]
    assert train["images"] == cuda, "training must run the image the workers serve with"


def test_objects_carry_no_namespace_of_their_own_or_the_services() -> None:
    for path, doc in DOCS:
        assert doc["metadata"].get("namespace", NAMESPACE) == NAMESPACE, path
    assert files.k8s_named("Namespace", NAMESPACE)


# ---- security --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("where", "spec"), files.pod_templates(), ids=[w for w, _ in files.pod_templates()])
def test_every_pod_meets_the_restricted_profile(where: str, spec: dict[str, Any]) -> None:
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False, "service-link variables would collide with DDPM_ settings"
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    assert all("hostPath" not in v for v in volumes.values())
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{where}/{c['name']}: a read-only root needs a writable /tmp"
        assert "emptyDir" in volumes[mounts["/tmp"]]
        assert c["image"] in files.DDPM_IMAGES or c["image"].partition(":")[2] not in ("", "latest")
        assert "memory" in c["resources"]["limits"] and c["resources"]["requests"], f"{where}: resources"


def test_the_namespace_enforces_the_restricted_profile() -> None:
    labels = files.k8s_named("Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_api_key_secret_is_generated_and_only_the_api_reads_it() -> None:
    assert files.generated_secrets() == {"ddpm-api-keys": [files.API_KEYS_FILE]}
    assert not files.k8s_kind("Secret"), "no Secret with a key in it is committed"
    api = _container("Deployment", "ddpm-api")
    assert {"secretRef": {"name": "ddpm-api-keys"}} in api["envFrom"]
    assert not any("secretRef" in s for s in _container("Deployment", "ddpm-worker")["envFrom"])
    assert "openssl rand" in (files.K8S / "secrets" / "README.md").read_text()


# ---- wiring -------------------------------------------------------------------------------------------------------
def _container(kind: str, name: str) -> dict[str, Any]:
    return files.k8s_named(kind, name)["spec"]["template"]["spec"]["containers"][0]


def _probe(container: dict[str, Any], kind: str) -> tuple[str, str]:
    get = container[kind]["httpGet"]
    return get["path"], get["port"]


def test_api_probes_liveness_on_healthz_and_readiness_on_readyz() -> None:
    api = _container("Deployment", "ddpm-api")
    assert _probe(api, "livenessProbe") == ("/healthz", "http")
    assert _probe(api, "startupProbe") == ("/healthz", "http")
    assert _probe(api, "readinessProbe") == ("/readyz", "http")
    assert {p["name"]: p["containerPort"] for p in api["ports"]} == {"http": 8000}
    annotations = files.k8s_named("Deployment", "ddpm-api")["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == ("8000", "/metrics")


def test_the_worker_runs_on_a_gpu_node_with_a_startup_probe_covering_model_loading() -> None:
    deployment = files.k8s_named("Deployment", "ddpm-worker")
    spec = deployment["spec"]["template"]["spec"]
    worker = spec["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nodeSelector" not in spec, "the nvidia.com/gpu limit places it; node labels differ per cluster"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert _probe(worker, "startupProbe") == ("/healthz", "metrics")
    assert _probe(worker, "livenessProbe") == ("/healthz", "metrics")
    startup = worker["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model loading may take minutes"
    assert {p["name"]: p["containerPort"] for p in worker["ports"]} == {"metrics": 9100}
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "a rollout needs no spare GPU"


def test_services_select_pods_and_name_ports_that_exist() -> None:
    pods = {f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"] for d in
            files.k8s_kind("Deployment") + files.k8s_kind("StatefulSet")}
    for service in files.k8s_kind("Service"):
        selector = service["spec"]["selector"]
        matched = [t for t in pods.values() if selector.items() <= t["metadata"]["labels"].items()]
        assert matched, f"Service {service['metadata']['name']} selects no pod"
        ports = {p["name"] for t in matched for c in t["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {service['metadata']['name']}: no port {port['targetPort']}"
    assert files.k8s_named("StatefulSet", "redis")["spec"]["serviceName"] == "redis"


def test_pod_disruption_budgets_cover_the_api_and_the_workers() -> None:
    deployments = {d["metadata"]["name"]: d for d in files.k8s_kind("Deployment")}
    covered = set()
    for pdb in files.k8s_kind("PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        for name, d in deployments.items():
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items():
                covered.add(name)
                if "minAvailable" in pdb["spec"]:
                    assert pdb["spec"]["minAvailable"] < d["spec"]["replicas"], f"{name}: a drain could never evict"
    assert covered == {"ddpm-api", "ddpm-worker"}


def test_every_referenced_config_secret_and_claim_exists() -> None:
    claims = {c["metadata"]["name"] for c in files.k8s_kind("PersistentVolumeClaim")}  # incl. components
    for where, spec in files.pod_templates():
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, where
        for c in spec["containers"]:
            for source in c.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef")
                if "secretRef" in source:
                    assert ref["name"] in files.generated_secrets()
                else:
                    assert files.k8s_named("ConfigMap", ref["name"])


def test_the_checkpoint_volume_is_writable_for_training() -> None:
    job = _container("Job", "ddpm-train")
    mounts = {m["mountPath"]: m for m in job["volumeMounts"]}
    assert not mounts["/checkpoints"].get("readOnly") and "/dev/shm" in mounts
    run_dir = next(e["value"] for e in job["env"] if e["name"] == "RUN_DIR")
    assert run_dir.startswith("/checkpoints/")
    assert "ReadWriteMany" in files.k8s_named("PersistentVolumeClaim", "ddpm-checkpoints")["spec"]["accessModes"]


def test_the_training_job_resumes_on_retry_and_fails_fast_on_bad_input() -> None:
    job = files.k8s_named("Job", "ddpm-train")
    calls = [c.argv for c in files.k8s_containers() if c.where == "k8s:Job/ddpm-train"]
    assert [("--resume" in argv) for argv in calls] == [True, False]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [2]
    spec = job["spec"]["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    worker = files.k8s_named("Deployment", "ddpm-worker")["spec"]["template"]["spec"]
    assert spec["tolerations"] == worker["tolerations"] and "nodeSelector" not in spec


def test_the_keda_scaled_object_has_the_right_shape() -> None:
    scaled = files.k8s_named("ScaledObject", "ddpm-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "ddpm-worker")
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] and spec["pollingInterval"] >= 5
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "metrics-api"
    assert set(trigger["metadata"]) <= {"url", "format", "valueLocation", "targetValue", "activationTargetValue",
                                        "authMode", "method", "keyParamName", "unsafeSsl"}
    assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA metadata values are strings"
    auth = files.k8s_named("TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    assert [(r["parameter"], r["key"]) for r in auth["spec"]["secretTargetRef"]] == [("apiKey", "DDPM_API_KEYS")]


def _json_patch(doc: Any, operations: list[dict[str, Any]]) -> Any:
    """RFC 6902 add/remove/replace on plain data: what kustomize does with the components' patches."""
    doc = copy.deepcopy(doc)
    for op in operations:
        *parents, last = op["path"].lstrip("/").split("/")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if op["op"] == "remove":
            del node[int(last) if isinstance(node, list) else last]
        elif isinstance(node, list) and last == "-":
            node.append(op["value"])
        else:
            node[int(last) if isinstance(node, list) else last] = op["value"]
    return doc


@pytest.mark.parametrize("component", ["keda", "checkpoints", "checkpoints-rwo"])
def test_the_components_patches_leave_valid_objects(component: str) -> None:
    doc = yaml.safe_load((files.K8S / component / "kustomization.yaml").read_text())
    for patch in doc.get("patches", []):
        target = patch["target"]
        for obj in files.k8s_kind(target["kind"]):
            if re.fullmatch(target["name"], obj["metadata"]["name"]):
                group = f"{target['group']}/" if "group" in target else ""
                assert obj["apiVersion"] == f"{group}{target['version']}"
                patched = _json_patch(obj, yaml.safe_load(patch["patch"]))
                kubernetes_validate.validate(patched, K8S_VERSION, strict=True)


def test_only_the_pods_that_use_redis_may_reach_it() -> None:
    policy = files.k8s_named("NetworkPolicy", "redis")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "redis"}
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    (expression,) = rule["from"][0]["podSelector"]["matchExpressions"]
    allowed = set(expression["values"])
    workloads = {f"k8s:{d['kind']}/{d['metadata']['name']}": d for d in files.k8s_kind("Deployment")
                 + files.k8s_kind("Job")}
    users = {workloads[c.where]["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
             for c in files.k8s_containers() if "DDPM_REDIS_URL" in c.env}
    assert allowed == users == {"ddpm-api", "ddpm-worker"}
