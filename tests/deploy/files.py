"""Readers for the deployment files (docker/, docker-compose.yml, k8s/) shared by the deploy tests.

Most helpers need no Docker engine, Compose or kubectl: they turn the files into plain data (YAML documents,
Dockerfile instructions, the `ddpm` command lines each container runs, the DDPM_* environment each one gets) so
the tests can hold them against the schemas and against the real CLI and settings. ``render`` runs the real
``kubectl kustomize`` on a copy of k8s/ (with the API-keys file an operator would create) and an overlay, as an
operator's ``kubectl apply -k`` would; tests that need it skip where kubectl is missing.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker" / "compose.cpu.yml"
K8S = ROOT / "k8s"
COMPOSE_SCHEMA = Path(__file__).with_name("compose-spec.json")
DDPM_SERVICES = ("api", "worker", "train")  # compose services that run the ddpm image
DDPM_IMAGES = ("ddpm-service-cpu", "ddpm-service-cuda")  # the image names k8s/ uses; kustomize `images` maps them
API_KEYS_FILE = "secrets/api-keys.env"  # under k8s/: the git-ignored file k8s/kustomization.yaml generates from
SAMPLE_API_KEY = "3c9d6f0e8b7a41d2a5f6c7b8e9d0a1b2"  # what an operator's file might hold (32 hex characters)


# ---- YAML ------------------------------------------------------------------------------------------------------
class _Reset:
    """Compose's ``!reset`` tag: the key goes back to its default when files are merged."""


class _ComposeLoader(yaml.SafeLoader):
    pass


_ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)  # a SafeLoader that knows one more tag


def merge_compose(base: Any, override: Any) -> Any:
    """Compose's merge of an override file: mappings merge key by key, ``!reset`` deletes, the rest replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            if isinstance(value, _Reset):
                out.pop(key, None)
            else:
                out[key] = merge_compose(base.get(key), value)
        return out
    return override


def compose(*, cpu: bool = False) -> dict[str, Any]:
    doc = load_yaml(COMPOSE)
    return merge_compose(doc, load_yaml(COMPOSE_CPU)) if cpu else doc


def compose_schema() -> dict[str, Any]:
    return json.loads(COMPOSE_SCHEMA.read_text())


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def kustomize_configurations() -> set[Path]:
    """Files the kustomizations name under ``configurations:`` (kustomize settings, not Kubernetes objects)."""
    out = set()
    for k in kustomizations():
        out |= {k.parent / c for c in yaml.safe_load(k.read_text()).get("configurations", [])}
    return out


def k8s_manifests() -> list[Path]:
    skip = kustomize_configurations()
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and p not in skip)


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in k8s_manifests() for d in yaml.safe_load_all(p.read_text()) if d]


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in k8s_documents() if d["kind"] == kind]


def k8s_named(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in k8s_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def pod_templates() -> list[tuple[str, dict[str, Any]]]:
    """(``Kind/name``, pod spec) of every workload in k8s/."""
    out = []
    for doc in k8s_kind("Deployment") + k8s_kind("StatefulSet") + k8s_kind("Job"):
        out.append((f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]))
    return out


# ---- Dockerfile ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form instruction (after any ``--option=...`` flags)."""
        text = re.sub(r"^(--[\w-]+=\S+\s+)*", "", self.args.strip())
        if self.keyword == "HEALTHCHECK":
            text = re.sub(r"^CMD\s+", "", text)
        value = json.loads(text)
        assert isinstance(value, list), f"line {self.line}: {self.keyword} is not in exec form"
        return [str(v) for v in value]


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or not (line or buffer):
            continue
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        keyword, _, args = buffer.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buffer = ""
    return out


def dockerfile_env() -> dict[str, str]:
    """ENV of the final stage (``KEY=value`` pairs)."""
    stages: list[list[Instruction]] = [[]]
    for ins in dockerfile_instructions():
        if ins.keyword == "FROM":
            stages.append([])
        stages[-1].append(ins)
    env: dict[str, str] = {}
    for ins in stages[-1]:
        if ins.keyword == "ENV":
            for token in shlex.split(ins.args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


# ---- .dockerignore ---------------------------------------------------------------------------------------------
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's ignore-pattern syntax (Go filepath.Match plus ``**``) as a regex over a relative path."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out, i = out + "(?:/|)", i + 1
            continue
        out += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last pattern matching it (or a parent) wins."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _pattern_regex(raw.lstrip("!").strip("/"))
        if any(regex.match(c) for c in candidates):
            ignored = not negate
    return ignored


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


# ---- what each container runs --------------------------------------------------------------------------------
@dataclass
class Container:
    """One process the deployment starts from the ddpm image: where, its ``ddpm`` argv and its DDPM_* env."""

    where: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)  # port name -> container port (k8s)


def _shell_ddpm_calls(script: str, env: dict[str, str]) -> Iterator[list[str]]:
    """The argv of every ``ddpm`` call in a small sh script (variables from ``env`` expanded)."""
    for line in script.splitlines():
        words = shlex.split(line.strip(), comments=True)
        if "ddpm" in words:
            argv = words[words.index("ddpm") + 1:]
            yield [re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), w) for w in argv]


def interpolate(value: str) -> str:
    """A compose value as it is with no variable set on the host: ``${X:-default}`` -> default, ``${X}`` -> ''."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def compose_containers(*, cpu: bool = False) -> list[Container]:
    """ddpm containers of compose; their env includes the image's DDPM_* ENV, which compose's values override."""
    doc = compose(cpu=cpu)
    image_env = dockerfile_container().env
    out = []
    for name, svc in doc["services"].items():
        if name not in DDPM_SERVICES:
            continue
        env = image_env | {k: interpolate(str(v)) for k, v in (svc.get("environment") or {}).items()}
        out.append(Container(f"compose{'+cpu' if cpu else ''}:{name}", list(svc["command"]), env))
    return out


def generated_secrets() -> dict[str, list[str]]:
    """Secret name -> env files of k8s/kustomization.yaml's secretGenerator."""
    doc = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return {g["name"]: list(g.get("envs", [])) for g in doc.get("secretGenerator", [])}


def _k8s_env(container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= k8s_named("ConfigMap", source["configMapRef"]["name"])["data"]
        if "secretRef" in source:
            assert generated_secrets().get(source["secretRef"]["name"]) == [API_KEYS_FILE]
            env |= {"DDPM_API_KEYS": SAMPLE_API_KEY}  # what the operator's file holds
    for item in container.get("env", []):
        env[item["name"]] = str(item.get("value", ""))
    return env


def k8s_containers() -> list[Container]:
    out = []
    for where, spec in pod_templates():
        for c in spec["containers"]:
            if c["image"] not in DDPM_IMAGES:
                continue
            env = dockerfile_container().env | _k8s_env(c)
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            command, args = c.get("command"), c.get("args", [])
            if command in (None, ["ddpm"]):
                out.append(Container(f"k8s:{where}", list(args), env, ports))
            else:
                assert command[:2] == ["/bin/sh", "-c"], f"{where}: run ddpm or a /bin/sh -c script"
                for argv in _shell_ddpm_calls(args[0], env):
                    out.append(Container(f"k8s:{where}", argv, env, ports))
    return out


def dockerfile_container() -> Container:
    cmd = [i for i in dockerfile_instructions() if i.keyword == "CMD"][-1].exec_form()
    env = {k: v for k, v in dockerfile_env().items() if k.startswith("DDPM_")}
    return Container("Dockerfile:CMD", cmd, env)


def all_containers() -> list[Container]:
    return [dockerfile_container(), *compose_containers(), *compose_containers(cpu=True), *k8s_containers()]


# ---- kubectl kustomize ---------------------------------------------------------------------------------------
def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(overlay: str | None = None, *, api_keys: str | None = f"DDPM_API_KEYS={SAMPLE_API_KEY}\n",
           target: str = "k8s") -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize`` renders from a copy of k8s/: ``target`` (a folder of the copy), or an
    overlay folder beside the copy whose kustomization.yaml is ``overlay`` (it names the copy as ``../k8s``).
    ``api_keys`` is the content of k8s/secrets/api-keys.env (None: the file is missing). Raises
    ``subprocess.CalledProcessError`` (with kustomize's message in ``stderr``) when rendering fails."""
    binary = kubectl()
    assert binary, "kubectl is not installed"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(K8S, root / "k8s")
        if api_keys is not None:
            (root / "k8s" / API_KEYS_FILE).parent.mkdir(exist_ok=True)
            (root / "k8s" / API_KEYS_FILE).write_text(api_keys)
        folder = root / target
        if overlay is not None:
            folder = root / "overlay"
            folder.mkdir()
            (folder / "kustomization.yaml").write_text(overlay)
        result = subprocess.run([binary, "kustomize", str(folder)], capture_output=True, text=True, timeout=120,
                                check=True)
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} among the rendered objects, found {len(found)}"
    return found[0]


def rendered_pods(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``Kind/name`` -> pod spec of every rendered workload."""
    return {f"{o['kind']}/{o['metadata']['name']}": o["spec"]["template"]["spec"] for o in objects
            if o["kind"] in ("Deployment", "StatefulSet", "Job")}
