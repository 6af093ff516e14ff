"""The deployment files against the code they run: settings, `ddpm` commands, ports and probe paths.

Every DDPM_* variable that docker/, docker-compose.yml or k8s/ sets must be a field of service.settings.Settings
and parse; every command a container runs must be a real `ddpm` subcommand with real flags (the real parser of
service.cli); the ports and paths the probes and Prometheus use must be the ones the processes serve.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import PurePosixPath
from types import SimpleNamespace
from typing import Any

import pytest

from service.settings import Settings, settings_from_args
from tests.deploy import files
from tests.deploy.files import Container

SETTINGS_FIELDS = set(Settings.model_fields)
CONTAINERS = files.all_containers()


def _ddpm_names_in(text: str) -> set[str]:
    return set(re.findall(r"\bDDPM_[A-Z0-9_]+\b", text))


def _deployment_texts() -> dict[str, str]:
    paths = [files.DOCKERFILE, files.COMPOSE, files.COMPOSE_CPU, *files.k8s_manifests()]
    return {str(p.relative_to(files.ROOT)): p.read_text() for p in paths}


def parse_ddpm(container: Container) -> tuple[str, Any]:
    """(module, parsed args) of a container's ddpm argv, with the real parser; skips only for unwritten modules."""
    from service.cli import COMMANDS, build_parser

    argv = container.argv
    assert argv and argv[0] in COMMANDS, f"{container.where}: {argv} is not a ddpm subcommand ({sorted(COMMANDS)})"
    module = COMMANDS[argv[0]][0]
    try:
        parser = build_parser(argv)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            pytest.skip(f"{module} (ddpm {argv[0]}) is not written yet")
        raise
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{container.where}: `ddpm {' '.join(argv)}` is rejected: {err.getvalue().strip()}")
    return module, args


SettingsOf = Callable[[Container], Settings]


@pytest.fixture
def effective_settings(monkeypatch: pytest.MonkeyPatch) -> SettingsOf:
    """The Settings a container's process ends up with: its DDPM_* environment, then its flags on top."""

    def settings_for(container: Container) -> Settings:
        for name in [n for n in os.environ if n.startswith("DDPM_")]:
            monkeypatch.delenv(name)
        for name, value in container.env.items():
            monkeypatch.setenv(name, value)
        module, args = parse_ddpm(container)
        command = importlib.import_module(module)
        return settings_from_args(args, command.SETTINGS_FLAGS)  # each command: its flag -> setting table

    return settings_for


def _one(where: str) -> Container:
    found = [c for c in CONTAINERS if c.where == where]
    assert len(found) == 1, f"expected one container {where!r}, found {[c.where for c in CONTAINERS]}"
    return found[0]


# ---- settings ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(_deployment_texts()))
def test_every_ddpm_variable_is_a_setting(path: str) -> None:
    names = _ddpm_names_in(_deployment_texts()[path])
    unknown = sorted(n for n in names if n.removeprefix("DDPM_").lower() not in SETTINGS_FIELDS)
    assert not unknown, f"{path} sets {unknown}, which service/settings.py does not read"


@pytest.mark.parametrize("container", CONTAINERS, ids=lambda c: f"{c.where}:{c.argv[0]}")
def test_every_container_environment_parses(container: Container, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("DDPM_")]:
        monkeypatch.delenv(name)
    for name, value in container.env.items():
        monkeypatch.setenv(name, value)
    Settings()  # raises on a bad value (a device that does not exist, a malformed NAME=FILE...)


def _copied_into_image() -> set[str]:
    dests = set()
    for ins in files.dockerfile_instructions():
        if ins.keyword == "COPY" and "--from" not in ins.args:
            dests.add(ins.args.split()[-1])
    return dests


@pytest.mark.parametrize("container", [c for c in CONTAINERS if c.argv[0] in ("serve", "worker")],
                         ids=lambda c: f"{c.where}:{c.argv[0]}")
def test_served_checkpoints_are_in_the_image_or_on_the_checkpoint_volume(
        container: Container, effective_settings: SettingsOf) -> None:
    settings = effective_settings(container)
    for name, path in settings.checkpoints.items():
        in_image = path in _copied_into_image()
        on_volume = PurePosixPath(path).is_relative_to("/checkpoints")
        assert in_image or on_volume, f"{container.where}: checkpoint {name}={path} is neither baked nor mounted"


# ---- commands ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("container", CONTAINERS, ids=lambda c: f"{c.where}:{c.argv[0]}")
def test_every_command_is_a_real_ddpm_subcommand_with_real_flags(container: Container) -> None:
    module, args = parse_ddpm(container)
    assert args._module == module


def test_the_image_runs_ddpm_in_exec_form() -> None:
    entrypoint = [i for i in files.dockerfile_instructions() if i.keyword == "ENTRYPOINT"][-1]
    assert entrypoint.exec_form() == ["ddpm"]
    for name, svc in files.compose()["services"].items():
        assert "entrypoint" not in svc, f"compose {name} replaces the image's ddpm entrypoint"


# ---- ports and probe paths -------------------------------------------------------------------------------------
def test_the_api_serves_the_probe_and_metrics_paths() -> None:
    api = pytest.importorskip("service.api", reason="service/api.py is not written yet")
    paths = set(api.create_app(Settings()).openapi()["paths"])
    assert {"/healthz", "/readyz", "/metrics"} <= paths


def test_the_worker_healthz_turns_200_once_the_model_is_loaded() -> None:
    """What the worker's startup and liveness probes rely on (the real server of service.worker, on loopback)."""
    worker_module = pytest.importorskip("service.worker", reason="service/worker.py is not written yet")
    state = SimpleNamespace(loaded=False)
    server = worker_module.serve_metrics(SimpleNamespace(healthy=lambda: state.loaded), "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(urllib.error.HTTPError) as starting:
            urllib.request.urlopen(f"{base}/healthz", timeout=5)
        assert starting.value.code == 503
        state.loaded = True
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as ready:
            assert ready.status == 200
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as scraped:
            assert b"# TYPE" in scraped.read()
    finally:
        server.shutdown()
        server.server_close()


def test_settings_defaults_are_the_ports_the_deployment_uses() -> None:
    defaults = Settings()
    assert (defaults.port, defaults.worker_metrics_port) == (8000, 9100)


@pytest.mark.parametrize("where", ["compose:api", "compose+cpu:api", "k8s:Deployment/ddpm-api"])
def test_the_api_listens_where_it_is_published_and_probed(where: str, effective_settings: SettingsOf) -> None:
    settings = effective_settings(_one(where))
    assert settings.host == "0.0.0.0", f"{where}: the API must listen on all interfaces inside its container"
    assert settings.port == 8000
    if where.startswith("k8s"):
        assert _one(where).ports["http"] == settings.port


@pytest.mark.parametrize("where", ["compose:worker", "compose+cpu:worker", "k8s:Deployment/ddpm-worker"])
def test_the_worker_metrics_port_is_where_it_is_probed_and_scraped(where: str, effective_settings: SettingsOf) -> None:
    settings = effective_settings(_one(where))
    assert settings.worker_metrics_port == 9100
    if where.startswith("k8s"):
        assert _one(where).ports["metrics"] == settings.worker_metrics_port


def test_the_cpu_override_runs_the_worker_on_the_cpu(effective_settings: SettingsOf) -> None:
    assert effective_settings(_one("compose+cpu:worker")).device == "cpu"
    assert effective_settings(_one("compose:worker")).device == "cuda"


def test_the_keda_trigger_reads_a_metric_the_api_serves() -> None:
    from urllib.parse import urlsplit

    from service import metrics
    from service.api import create_app

    trigger = files.k8s_named("ScaledObject", "ddpm-worker")["spec"]["triggers"][0]["metadata"]
    exported = {m._name for m in vars(metrics).values() if hasattr(m, "_name")}
    assert trigger["valueLocation"] in exported, f"{trigger['valueLocation']} is not a metric of service/metrics.py"
    assert urlsplit(trigger["url"]).path in create_app(Settings()).openapi()["paths"]


# ---- graceful stop ----------------------------------------------------------------------------------------------
def _grace_seconds(where: str) -> int:
    if where.startswith("k8s:"):
        name = where.split("/", 1)[1]
        return int(files.k8s_named("Deployment", name)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])
    service = files.compose(cpu="+cpu" in where)["services"][where.split(":", 1)[1]]
    return int(str(service["stop_grace_period"]).removesuffix("s"))


@pytest.mark.parametrize("where", ["compose:worker", "compose+cpu:worker", "k8s:Deployment/ddpm-worker"])
def test_a_stopping_worker_finishes_its_jobs_before_it_is_killed(where: str, effective_settings: SettingsOf) -> None:
    container = _one(where)
    settings = effective_settings(container)
    _, args = parse_ddpm(container)
    # SIGTERM: running jobs get --stop-grace seconds (enough for the longest job), then are handed back; the
    # platform's grace period must leave time after that for the hand-back and the last writes.
    assert args.stop_grace >= settings.job_timeout_seconds
    assert _grace_seconds(where) >= args.stop_grace + 30


# ---- the deployment guide ------------------------------------------------------------------------------------
def test_the_deployment_guide_names_files_that_exist() -> None:
    assert "(docs/DEPLOYMENT.md)" in (files.ROOT / "README.md").read_text(), "the README does not link the guide"
    section = (files.ROOT / "docs" / "DEPLOYMENT.md").read_text()
    for command in ("make run", "docker compose up", "kubectl apply -k k8s/", "kubectl apply -k k8s/train"):
        assert command in section, f"docs/DEPLOYMENT.md does not show `{command}`"
    named = set(re.findall(r"(?<![\w/.])((?:docker|k8s)/[\w./-]*\w|docker-compose\.yml)", section))
    assert named, "expected paths of the deployment files"
    operator_made = {f"k8s/{files.API_KEYS_FILE}"}  # git-ignored: each operator creates it
    missing = sorted(p for p in named if not (files.ROOT / p).exists() and p not in operator_made)
    assert not missing, f"docs/DEPLOYMENT.md names deployment files that do not exist: {missing}"
    unknown = sorted(n for n in _ddpm_names_in(section) if n.removeprefix("DDPM_").lower() not in SETTINGS_FIELDS)
    assert not unknown, f"docs/DEPLOYMENT.md names settings that do not exist: {unknown}"
