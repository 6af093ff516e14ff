"""k8s/ as an operator deploys it: rendered by the real ``kubectl kustomize`` (the base, the guide's overlays with
the optional components), then held against what a stock managed GPU cluster (GKE, EKS, AKS, kubeadm with the
NVIDIA device plugin) and KEDA need: objects in the right namespace, no node label or storage class that only some
clusters have, an autoscaler that counts running jobs and never cuts one short, drains that are never blocked, a
generated API-key Secret, and images from a registry at immutable tags."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.queue import JobStore
from service.redis_server import RedisServer
from service.settings import Settings
from service.worker_session import WorkerSession
from tests.deploy import files

pytestmark = pytest.mark.skipif(files.kubectl() is None, reason="kubectl is not installed (it renders k8s/)")

NAMESPACE = "ddpm"
GUIDE = (files.ROOT / "docs" / "DEPLOYMENT.md").read_text()
VERSION = re.search(r'^version = "([^"]+)"', (files.ROOT / "pyproject.toml").read_text(), re.M).group(1)  # type: ignore[union-attr]


def readme_overlay(name: str) -> str:
    """The kustomization.yaml the guide (docs/DEPLOYMENT.md) gives: the yaml block after ``<!-- overlay: name -->``."""
    match = re.search(rf"<!-- overlay: {name} -->\s*```yaml\n(.*?)```", GUIDE, re.S)
    assert match, f"docs/DEPLOYMENT.md has no overlay {name!r} (a ```yaml block after <!-- overlay: {name} -->)"
    return match.group(1)


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return files.render()


@pytest.fixture(scope="module")
def keda() -> list[dict[str, Any]]:
    return files.render(readme_overlay("keda"))


def _container(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return files.named(objects, kind, name)["spec"]["template"]["spec"]["containers"][0]


def _flag(argv: list[str], flag: str) -> float:
    return float(argv[argv.index(flag) + 1])


# ---- 1. KEDA ------------------------------------------------------------------------------------------------------
def test_the_scaled_object_renders_next_to_the_deployment_it_scales(keda: list[dict[str, Any]]) -> None:
    scaled = files.named(keda, "ScaledObject", "ddpm-worker")
    target = files.named(keda, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    assert scaled["metadata"].get("namespace") == target["metadata"]["namespace"] == NAMESPACE
    assert scaled["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ddpm"
    assert "replicas" not in target["spec"], "the autoscaler owns the replica count"
    auth = files.named(keda, "TriggerAuthentication", scaled["spec"]["triggers"][0]["authenticationRef"]["name"])
    assert auth["metadata"]["namespace"] == NAMESPACE
    secret = next(o for o in keda if o["kind"] == "Secret")
    assert [r["name"] for r in auth["spec"]["secretTargetRef"]] == [secret["metadata"]["name"]], (
        "KEDA must read the generated Secret (its hashed name), the one the API reads")


def _scaler_url(objects: list[dict[str, Any]]) -> re.Match[str]:
    (trigger,) = files.named(objects, "ScaledObject", "ddpm-worker")["spec"]["triggers"]
    match = re.fullmatch(r"http://([\w-]+)\.([\w-]+)\.svc\.cluster\.local:(\d+)(/\S*)", trigger["metadata"]["url"])
    assert match, trigger["metadata"]["url"]
    return match


@pytest.mark.parametrize("overlay", ["keda", "keda-namespace"])
def test_the_scaler_reaches_the_api_service_in_its_own_namespace(overlay: str) -> None:
    objects = files.render(readme_overlay(overlay))
    url = _scaler_url(objects)
    service = files.named(objects, "Service", url.group(1))
    assert url.group(2) == service["metadata"]["namespace"]
    assert files.named(objects, "ScaledObject", "ddpm-worker")["metadata"]["namespace"] == url.group(2)
    assert int(url.group(3)) in {p["port"] for p in service["spec"]["ports"]}
    if overlay == "keda-namespace":
        assert url.group(2) != NAMESPACE, "the guide's example moves the service to another namespace"


def test_it_scales_on_waiting_plus_running_jobs_as_the_api_exports_them(keda: list[dict[str, Any]]) -> None:
    (trigger,) = files.named(keda, "ScaledObject", "ddpm-worker")["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "metrics-api" and meta["format"] == "prometheus"
    assert (meta["authMode"], meta["method"], meta["keyParamName"]) == ("apiKey", "header", "X-API-Key")
    assert int(meta["targetValue"]) >= 1 and all(isinstance(v, str) for v in meta.values())
    assert _scaler_url(keda).group(4) == "/metrics"
    from service.api import create_app

    with RedisServer() as server:
        store = JobStore(__import__("redis").Redis.from_url(server.url), queue_name="ddpm")
        for _ in range(3):
            store.submit({}, "digits", num_images=1, total_steps=10, seeds=[0], max_queue_length=100)
        session = WorkerSession(server.url, store, "scaler-test")
        session.register()
        assert session.claim(block_seconds=None) is not None  # one job running, two waiting
        settings = Settings(redis_url=server.url, api_keys=[files.SAMPLE_API_KEY])
        with TestClient(create_app(settings)) as client:
            response = client.get("/metrics", headers={meta["keyParamName"]: files.SAMPLE_API_KEY})
        session.unregister()
    assert response.status_code == 200
    samples = {s.name: s.value for f in text_string_to_metric_families(response.text) for s in f.samples}
    assert samples[meta["valueLocation"]] == 3, "the scaler's metric must count waiting and running jobs"


def test_scale_down_never_cuts_a_running_job_short(keda: list[dict[str, Any]]) -> None:
    spec = files.named(keda, "ScaledObject", "ddpm-worker")["spec"]
    job_timeout = int(files.named(keda, "ConfigMap", "ddpm-config")["data"]["DDPM_JOB_TIMEOUT_SECONDS"])
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert behavior["stabilizationWindowSeconds"] > job_timeout, "work must stay low for longer than a job runs"
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in behavior["policies"]), "one worker at a time"
    if spec["minReplicaCount"] >= 1:
        assert "cooldownPeriod" not in spec, "cooldownPeriod only acts when scaling to zero"
    pod = files.named(keda, "Deployment", "ddpm-worker")["spec"]["template"]["spec"]
    stop_grace = _flag(pod["containers"][0]["args"], "--stop-grace")
    assert stop_grace >= job_timeout, "a stopping worker keeps running its jobs for as long as a job may run"
    assert pod["terminationGracePeriodSeconds"] >= stop_grace + 30, "then has time to write them before SIGKILL"


# ---- 2. a stock managed GPU pool ------------------------------------------------------------------------------
def test_the_base_needs_no_gpu_feature_discovery_and_no_volume(base: list[dict[str, Any]]) -> None:
    pods = files.rendered_pods(base)
    for where, spec in pods.items():
        for label in spec.get("nodeSelector", {}):
            assert label.startswith("kubernetes.io/"), f"{where}: nodeSelector {label} is not on every node"
    assert not [o for o in base if o["kind"] == "PersistentVolumeClaim"], "the demo model needs no volume"
    for where in ("Deployment/ddpm-api", "Deployment/ddpm-worker"):
        assert not [v for v in pods[where].get("volumes", []) if "persistentVolumeClaim" in v], where
    worker = _container(base, "Deployment", "ddpm-worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1, "the GPU limit alone places the worker"
    api = _container(base, "Deployment", "ddpm-api")
    assert "nvidia.com/gpu" not in api["resources"].get("limits", {})
    assert api["image"].endswith("-cpu") and worker["image"].endswith("-cuda"), "the API runs the CPU image"


@pytest.mark.parametrize(("component", "mode"), [("checkpoints", "ReadWriteMany"),
                                                  ("checkpoints-rwo", "ReadWriteOnce")])
def test_the_checkpoint_volume_is_a_component_mounted_where_it_is_read(component: str, mode: str) -> None:
    objects = files.render(f"resources: [../k8s]\ncomponents: [../k8s/{component}]\n")
    claim = files.named(objects, "PersistentVolumeClaim", "ddpm-checkpoints")
    assert claim["spec"]["accessModes"] == [mode] and claim["metadata"]["namespace"] == NAMESPACE
    for name in ("ddpm-api", "ddpm-worker"):
        mounts = {m["mountPath"]: m for m in _container(objects, "Deployment", name)["volumeMounts"]}
        assert mounts["/checkpoints"]["readOnly"] is True, name
    if mode == "ReadWriteOnce":  # one node holds the volume: the API follows the worker there
        api = files.named(objects, "Deployment", "ddpm-api")["spec"]["template"]["spec"]
        (term,) = api["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": "ddpm-worker"}
        assert term["topologyKey"] == "kubernetes.io/hostname"
    assert "ddpm-checkpoints" not in str(files.render()), "the base mounts no checkpoint volume"


def test_training_writes_to_the_components_claim_on_any_gpu_node() -> None:
    job = files.render(target="k8s/train")
    spec = files.named(job, "Job", "ddpm-train")["spec"]["template"]["spec"]
    assert "nodeSelector" not in spec and spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    component = files.render("resources: [../k8s]\ncomponents: [../k8s/checkpoints]\n")
    assert claims == {files.named(component, "PersistentVolumeClaim", "ddpm-checkpoints")["metadata"]["name"]}


# ---- 3. disruptions --------------------------------------------------------------------------------------------
def test_budgets_never_block_a_drain_on_pods_that_are_not_ready(base: list[dict[str, Any]]) -> None:
    budgets = [o for o in base if o["kind"] == "PodDisruptionBudget"]
    assert {b["metadata"]["name"] for b in budgets} == {"ddpm-api", "ddpm-worker"}
    for budget in budgets:
        assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow", budget["metadata"]["name"]


# ---- 4. the API keys ---------------------------------------------------------------------------------------------
def test_the_api_key_secret_is_generated_from_a_file_git_never_tracks(base: list[dict[str, Any]]) -> None:
    (secret,) = [o for o in base if o["kind"] == "Secret"]
    assert secret["metadata"]["name"].startswith("ddpm-api-keys-"), "a content hash rolls the API on a key change"
    api = _container(base, "Deployment", "ddpm-api")
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in api["envFrom"]
    ignored = subprocess.run(["git", "check-ignore", "-q", f"k8s/{files.API_KEYS_FILE}"], cwd=files.ROOT,
                             timeout=30)
    assert ignored.returncode == 0, f"k8s/{files.API_KEYS_FILE} must be git-ignored"
    committed = subprocess.run(["git", "ls-files", "k8s"], cwd=files.ROOT, capture_output=True, text=True,
                               timeout=30).stdout.split()
    for path in committed:
        text = (files.ROOT / path).read_text()
        assert not re.search(r"^\s*(stringData|data):\s*\n\s+DDPM_API_KEYS", text, re.M), f"{path} holds a key"
    with pytest.raises(subprocess.CalledProcessError) as missing:
        files.render(api_keys=None)
    assert "api-keys.env" in missing.value.stderr, "without the file, apply stops and names it"


# ---- 5. images -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["k8s", "k8s/train"])
def test_images_come_from_a_registry_at_immutable_tags(target: str) -> None:
    objects = files.render(target=target)
    for where, spec in files.rendered_pods(objects).items():
        for c in spec["containers"]:
            name, _, tag = c["image"].partition(":")
            if where == "StatefulSet/redis":
                assert name == "redis" and re.fullmatch(r"\d+\.\d+\.\d+-alpine", tag), c["image"]
                continue
            registry = name.split("/")[0]
            assert "/" in name and ("." in registry or ":" in registry), f"{where}: {c['image']} names no registry"
            variant = "cpu" if where == "Deployment/ddpm-api" else "cuda"
            assert tag == f"{VERSION}-{variant}" or "@sha256:" in c["image"], f"{where}: {c['image']}"
            assert c["imagePullPolicy"] == "IfNotPresent"


def test_compose_and_k8s_pin_the_same_redis_patch_release(base: list[dict[str, Any]]) -> None:
    compose = yaml.safe_load(files.COMPOSE.read_text())["services"]["redis"]["image"]
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+-alpine", compose), f"{compose} floats"
    assert _container(base, "StatefulSet", "redis")["image"] == compose


# ---- 7. an existing HA Redis ---------------------------------------------------------------------------------
def test_the_readme_points_the_service_at_an_existing_sentinel_redis() -> None:
    from service.redis_url import parse_sentinel_url

    objects = files.render(readme_overlay("external-redis"))
    assert not [o for o in objects if o["metadata"]["name"] == "redis"], "the bundled Redis is left out"
    url = files.named(objects, "ConfigMap", "ddpm-config")["data"]["DDPM_REDIS_URL"]
    parsed = parse_sentinel_url(url)
    assert len(parsed.sentinels) == 3 and parsed.service_name == "mymaster"
    Settings(redis_url=url)


def test_the_readme_checkpoint_overlay_names_a_storage_class() -> None:
    objects = files.render(readme_overlay("checkpoints"))
    claim = files.named(objects, "PersistentVolumeClaim", "ddpm-checkpoints")
    assert claim["spec"]["storageClassName"] and claim["spec"]["accessModes"] == ["ReadWriteMany"]
