"""The README and docs/ point at what exists: every `file.py:name` they cite (the lecture's map first of all) is a
function, class or method of that file, and every relative link is a file of the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CITED = re.compile(r"`([\w/]+\.py):([\w.]+)`")  # `train_gpt2.py:DataLoader.next_batch`
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")  # [text](docs/x.md#anchor), not http(s) links


def defined(path: Path, dotted: str) -> bool:
    """Whether a module-level function, class or constant (then a method or attribute of a class) has this name."""
    body = ast.parse(path.read_text()).body
    for name in dotted.split("."):
        found = None
        for node in body:
            names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
                [t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)]
            if name in names:
                found = node
        if found is None:
            return False
        body = getattr(found, "body", [])
    return True


def citations() -> list[tuple[str, str, str]]:
    return [(page.name, file, name) for page in PAGES for file, name in CITED.findall(page.read_text())]


def test_the_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_the_lecture_map_cites_the_lecture_in_the_scripts():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## The lecture, step by step"):text.index("## What is different")]
    cited = CITED.findall(table)
    assert len(cited) >= 30 and {f for f, _ in cited} >= {"train_gpt2.py", "gpt2.py"}


@pytest.mark.parametrize("page, file, name", citations())
def test_every_cited_name_exists(page, file, name):
    path = ROOT / file
    assert path.is_file(), f"{page} cites {file}, which does not exist"
    assert defined(path, name), f"{page} cites {file}:{name}, which {file} does not define"


def test_every_relative_link_exists():
    for page in PAGES:
        for target, _ in LINK.findall(page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
