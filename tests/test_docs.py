"""The project's docs match the tree: every path the layout in docs/ARCHITECTURE.md names exists,
every module of the library and the nodes is in it, and no document points outside the repository."""

from __future__ import annotations

import re
import subprocess

from conftest import REPO_ROOT

DOCS = REPO_ROOT / "docs"


def layout_paths() -> list[str]:
    """The paths of the layout block (the first code block of ARCHITECTURE.md), as written."""
    text = (DOCS / "ARCHITECTURE.md").read_text()
    block = text.split("```")[1]
    paths, parents = [], {}
    for line in block.splitlines():
        match = re.match(r"^( *)(\S+?/?)(?:\s|$)", line)
        depth, name = (len(match.group(1)) // 2, match.group(2)) if match else (0, "")
        if depth > 1 or not ("." in name or name.endswith("/")):
            continue  # a continuation line of a description
        path = (parents.get(depth - 1, "") + name) if depth else name
        if name.endswith("/"):
            parents[depth] = path
        paths.append(path)
    return paths


def test_every_path_in_the_architecture_layout_exists() -> None:
    paths = layout_paths()
    assert "steadydancer/model.py" in paths and "nodes/validation.py" in paths  # the parser reads nesting
    missing = [p for p in paths if not (REPO_ROOT / p).exists()]
    assert not missing, f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"


def test_every_library_and_node_module_is_in_the_layout() -> None:
    paths = set(layout_paths())
    tracked = subprocess.run(["git", "ls-files", "steadydancer", "pose", "nodes", "benchmarks"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    modules = [p for p in tracked if p.endswith(".py") and not p.endswith("__init__.py") and p.count("/") == 1]
    unnamed = [m for m in modules if m not in paths]
    assert not unnamed, f"modules missing from docs/ARCHITECTURE.md's layout: {unnamed}"


def test_docs_and_code_point_inside_the_repository() -> None:
    # the pattern is assembled so that this file does not match it itself
    notes = "|".join((r"\.\./" + "shared", "spec/(MODEL|PIPELINE)" + r"\.md", "CONTR" + "ACTS"))
    hits = subprocess.run(["git", "grep", "-nE", notes, "--", "*.py", "*.md", "*.sh"],
                          cwd=REPO_ROOT, capture_output=True, text=True).stdout  # fmt: skip
    assert not hits, hits
