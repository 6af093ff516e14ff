"""The guides point at things that exist: links, file paths and the tests they name as proof.

docs/RELIABILITY.md names a test for every promise, and the other guides name modules and files; a rename that
forgets them leaves a promise proved by nothing. These checks read the Markdown as text, so they run anywhere.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDES = sorted([ROOT / "README.md", *ROOT.glob("docs/*.md"), ROOT / "benchmarks" / "README.md"])
TOP = ("service", "model", "tests", "benchmarks", "docker", "k8s", "docs")

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
PATH = re.compile(r"`((?:" + "|".join(TOP) + r")/[\w./-]+\.(?:py|md|yaml|yml|sh|json|txt|png|env))(?:::[^`]*)?`")
# `tests/x.py::test_a`, then `::test_b` for more tests of the same file (the guides' way of listing them)
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)|`::(\w+)")


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


@pytest.mark.parametrize("guide", GUIDES, ids=_ids(GUIDES))
def test_links_and_paths_exist(guide: Path) -> None:
    text = guide.read_text()
    missing = [link for link in LINK.findall(text) if not link.startswith(("http://", "https://", "mailto:"))
               and not (guide.parent / link).exists()]
    missing += [path for path in PATH.findall(text) if not (ROOT / path).exists()]
    assert not missing, f"{guide.relative_to(ROOT)} points at what does not exist: {missing}"


@pytest.mark.parametrize("guide", GUIDES, ids=_ids(GUIDES))
def test_the_tests_named_as_proof_exist(guide: Path) -> None:
    missing, current = [], None
    for file, name, more in TEST_REF.findall(guide.read_text()):
        if file:
            current = ROOT / file
        name = name or more
        if current is None or not current.exists():
            continue  # a missing file is test_links_and_paths_exist's finding
        if not re.search(rf"^\s*(async )?def {re.escape(name)}\b", current.read_text(), re.M):
            missing.append(f"{current.relative_to(ROOT)}::{name}")
    assert not missing, f"{guide.relative_to(ROOT)} names tests that do not exist: {missing}"


def test_every_markdown_file_the_project_cites_is_in_it() -> None:
    """A guide or docstring that names a Markdown file names a file of this repository: the project must not
    lean on documents it does not ship (a reader of a clone cannot open them)."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    shipped = {Path(p).name for p in tracked if p.endswith(".md")}
    cited: dict[str, set[str]] = {}
    for path in tracked:
        if path.endswith((".md", ".py", ".yaml", ".yml", ".toml", ".sh", "Makefile", "Dockerfile")):
            for name in re.findall(r"\b([\w-]+\.md)\b", (ROOT / path).read_text(errors="replace")):
                cited.setdefault(name, set()).add(path)
    foreign = {name: sorted(where) for name, where in cited.items() if name not in shipped}
    assert not foreign, f"cited but not in the repository: {foreign}"
