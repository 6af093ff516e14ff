"""The layering of ``model/``: the paper's model knows nothing of the service. No module of ``model/`` imports
``service``, Redis, RQ, FastAPI, Starlette, uvicorn, httpx or the Prometheus client, neither in its source nor
by what it pulls in when imported; and every public name of ``model`` resolves to the object of its home module."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import model

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(f"model.{p.stem}" for p in (ROOT / "model").glob("*.py") if p.stem != "__init__")
FORBIDDEN = {"service", "redis", "rq", "fastapi", "starlette", "uvicorn", "httpx", "prometheus_client"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", sorted((ROOT / "model").glob("*.py")), ids=lambda p: p.name)
def test_no_model_module_names_the_service_or_its_libraries(path: Path) -> None:
    assert not _imported_roots(path) & FORBIDDEN


def test_importing_every_model_module_loads_none_of_the_service_libraries() -> None:
    code = ("import importlib, json, sys\n"
            f"for name in {MODULES!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          check=True)
    loaded = set(json.loads(proc.stdout.splitlines()[-1]))
    assert "torch" in loaded and not loaded & FORBIDDEN, sorted(loaded & FORBIDDEN)


def test_every_public_name_is_the_object_of_its_home_module() -> None:
    import importlib

    for name in model.__all__:
        home = importlib.import_module(model._HOMES[name])  # after the home module itself was imported
        assert getattr(model, name) is getattr(home, name), name
