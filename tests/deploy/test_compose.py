"""docker-compose.yml (and its CPU override) against the Compose specification schema, and what `docker compose
up` must give a user: Redis that keeps jobs, services that wait for a healthy Redis, a GPU worker (a CPU one with
the override), training and Prometheus under profiles, and scrape targets that match the app's ports."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy import files

BASE = files.compose()
CPU = files.compose(cpu=True)


def _errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(files.compose_schema())
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]


def _devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    return svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_the_vendored_schema_is_the_compose_specification() -> None:
    schema = files.compose_schema()
    assert schema["title"] == "Compose Specification"
    assert (files.COMPOSE_SCHEMA.parent / "compose-spec.LICENSE").is_file()


@pytest.mark.parametrize("doc", [BASE, CPU], ids=["docker-compose.yml", "with docker/compose.cpu.yml"])
def test_compose_files_follow_the_compose_specification(doc: dict[str, Any]) -> None:
    assert _errors(doc) == []


def test_the_schema_check_catches_a_misspelt_key() -> None:
    broken = yaml.safe_load(files.COMPOSE.read_text())
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilites"] = ["gpu"]
    broken["services"]["api"]["dependson"] = ["redis"]
    assert len(_errors(broken)) >= 2


def test_redis_keeps_queued_jobs_across_restarts() -> None:
    redis = BASE["services"]["redis"]
    image, _, tag = redis["image"].partition(":")
    assert image == "redis" and tag and tag != "latest"
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    volume = redis["volumes"][0].split(":")
    assert volume[1] == "/data" and volume[0] in BASE["volumes"], "Redis data lives in a named volume"
    assert redis["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]


@pytest.mark.parametrize("name", ["api", "worker"])
def test_services_start_once_redis_is_healthy(name: str) -> None:
    assert BASE["services"][name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_every_named_volume_is_declared() -> None:
    for name, svc in BASE["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "$")):
                assert source in BASE["volumes"], f"{name}: volume {source} is not declared"


def test_the_worker_reserves_a_gpu_and_the_cpu_override_removes_every_reservation() -> None:
    gpu = _devices(BASE["services"]["worker"])
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert _devices(BASE["services"]["train"]), "training on a GPU by default"
    for name, svc in CPU["services"].items():
        assert not _devices(svc), f"{name} still reserves a GPU with the CPU override"
    for name in files.DDPM_SERVICES:
        assert CPU["services"][name]["build"]["args"]["VARIANT"] == "cpu"
        assert CPU["services"][name]["image"].endswith(":cpu")
        assert BASE["services"][name]["build"]["args"]["VARIANT"] == ("cpu" if name == "api" else "cuda")
        assert CPU["services"][name]["build"]["args"]["BASE_IMAGE"] == BASE["services"]["api"]["build"]["args"][
            "BASE_IMAGE"], "one CPU base"


def test_the_api_runs_the_cpu_image_and_reserves_no_gpu() -> None:
    api = BASE["services"]["api"]
    assert api["image"].endswith(":cpu") and api["build"]["args"]["VARIANT"] == "cpu"
    assert not _devices(api) and "cuda" not in api["build"]["args"]["BASE_IMAGE"]


def test_ddpm_containers_run_under_an_init_that_forwards_sigterm() -> None:
    for name in files.DDPM_SERVICES:
        assert BASE["services"][name].get("init") is True, name


def test_training_and_monitoring_are_opt_in_profiles() -> None:
    services = BASE["services"]
    assert services["train"]["profiles"] == ["train"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert all("profiles" not in services[n] for n in ("redis", "api", "worker"))
    tag = services["prometheus"]["image"].partition(":")[2]
    assert tag and tag != "latest"


def test_the_api_is_published_on_loopback_port_8000_and_redis_is_not_published() -> None:
    ports = [files.interpolate(p) for p in BASE["services"]["api"]["ports"]]
    assert ports == ["127.0.0.1:8000:8000"]
    assert "ports" not in BASE["services"]["redis"]


def test_api_and_worker_run_with_a_read_only_root_and_a_writable_tmp() -> None:
    for name in ("api", "worker"):
        svc = BASE["services"][name]
        assert svc["read_only"] is True and "/tmp" in svc["tmpfs"]


def test_prometheus_scrapes_the_api_and_the_worker_where_they_serve_metrics() -> None:
    config = yaml.safe_load((files.ROOT / "docker" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {(sd["names"][0], sd["port"], job["metrics_path"])
               for job in jobs.values() for sd in job["dns_sd_configs"]}
    assert targets == {("api", 8000, "/metrics"), ("worker", 9100, "/metrics")}
    mount = BASE["services"]["prometheus"]["volumes"][0]
    assert mount.startswith("./docker/prometheus.yml:/etc/prometheus/prometheus.yml")
