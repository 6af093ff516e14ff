"""docker/healthcheck.py, the image's HEALTHCHECK: it finds the ddpm process, probes the right /healthz, and its
exit status follows the answer (run against a real HTTP server on loopback)."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest

from service.settings import Settings
from tests.deploy import files


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ddpm_healthcheck", files.ROOT / "docker" / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hc = _load()
VENV_DDPM = ["/opt/venv/bin/python", "/opt/venv/bin/ddpm"]


def test_its_default_ports_are_the_settings_defaults() -> None:
    defaults = Settings()
    assert (defaults.port, defaults.worker_metrics_port) == (hc.API_PORT, hc.WORKER_METRICS_PORT)


@pytest.mark.parametrize(("argv", "env", "port"), [
    ([*VENV_DDPM, "serve"], {}, 8000),
    ([*VENV_DDPM, "serve", "--port", "9000"], {"DDPM_PORT": "8100"}, 9000),
    ([*VENV_DDPM, "serve", "--port=9001"], {}, 9001),
    ([*VENV_DDPM, "serve"], {"DDPM_PORT": "8100"}, 8100),
    ([*VENV_DDPM, "worker"], {}, 9100),
    ([*VENV_DDPM, "worker", "--metrics-port", "9200"], {}, 9200),
    ([*VENV_DDPM, "worker"], {"DDPM_WORKER_METRICS_PORT": "9300"}, 9300),
    ([*VENV_DDPM, "worker"], {"DDPM_WORKER_METRICS_PORT": "0"}, None),  # metrics server off: nothing to probe
    ([*VENV_DDPM, "train", "--preset", "digits"], {}, None),  # training has no server
])
def test_it_probes_the_port_of_the_process_the_container_runs(argv: list[str], env: dict[str, str],
                                                              port: int | None) -> None:
    assert hc.probe_target(argv, env) == port


def _fake_proc(root: Path, processes: dict[int, list[str]]) -> Path:
    for pid, argv in processes.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cmdline").write_bytes("\0".join(argv).encode() + b"\0")
    (root / "self").mkdir()  # not a pid: skipped
    return root


def test_it_finds_ddpm_as_pid_1_or_under_an_init(tmp_path: Path) -> None:
    direct = _fake_proc(tmp_path / "a", {1: [*VENV_DDPM, "worker"], 40: ["python", "/app/docker/healthcheck.py"]})
    assert hc.ddpm_argv(direct)[-1] == "worker"
    tini = _fake_proc(tmp_path / "b", {1: ["/sbin/docker-init", "--", "ddpm", "serve"], 7: ["ddpm", "serve"]})
    assert "serve" in hc.ddpm_argv(tini)
    nothing = _fake_proc(tmp_path / "c", {1: ["sleep", "infinity"]})
    assert hc.ddpm_argv(nothing) == []


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == hc.HEALTH_PATH else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[ThreadingHTTPServer, type[_Health]]]:
    handler = type("Handler", (_Health,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def test_exit_status_follows_the_healthz_answer(health_server: tuple[ThreadingHTTPServer, type[_Health]]) -> None:
    server, handler = health_server
    port = str(server.server_address[1])
    assert hc.main(["ddpm", "serve", "--port", port]) == 0
    handler.status = 503  # e.g. the worker's model is not loaded yet
    assert hc.main(["ddpm", "worker", "--metrics-port", port]) == 1


def test_nothing_listening_is_unhealthy_and_training_is_healthy() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    closed_port = str(server.server_address[1])
    server.server_close()
    assert hc.main(["ddpm", "serve", "--port", closed_port]) == 1
    assert hc.main(["ddpm", "train", "--preset", "digits"]) == 0
