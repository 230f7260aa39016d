"""The layering: utilities/ is the ground, datasets/, model/ and evaluation/ stand side by side on it without
importing each other, epoch_loops/ wires them, main.py sits on top; no import cycles. Each system's own files live
in `captioning/` or `ranking/` subpackages and never import the other system's."""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO

PACKAGES = ("utilities", "datasets", "model", "evaluation", "epoch_loops")
ALLOWED = {
    "utilities": {"utilities"},
    "datasets": {"utilities", "datasets"},
    "model": {"utilities", "model"},
    "evaluation": {"utilities", "evaluation"},
    "epoch_loops": {"utilities", "datasets", "model", "evaluation", "epoch_loops"},
}


def first_party_imports() -> dict[str, set[str]]:
    """module name → the first-party modules it imports (at any depth of the file: lazy imports count)."""
    graph = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            imported = set()
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                imported |= {name for name in names if name.split(".")[0] in (*PACKAGES, "main")}
            graph[module] = imported
    return graph


def test_arrows_point_one_way_between_packages():
    wrong = [
        f"{module} imports {target}"
        for module, targets in first_party_imports().items()
        for target in targets
        if target.split(".")[0] not in ALLOWED[module.split(".")[0]]
    ]
    assert not wrong


def test_no_import_cycles():
    graph = first_party_imports()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    assert not [m for m in graph if reaches(m, m, set())]


def test_one_segment_class():
    definitions = [
        path.relative_to(REPO).as_posix()
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if re.search(r"^class Segment\b", path.read_text(), re.MULTILINE)
    ]
    assert definitions == ["datasets/captioning/activitynet.py"]


SYSTEMS = ("captioning", "ranking")


def system_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in SYSTEMS else None


def test_no_system_imports_the_other():
    wrong = [
        f"{module} imports {target}"
        for module, targets in first_party_imports().items()
        for target in targets
        if system_of(module) and system_of(target) and system_of(module) != system_of(target)
    ]
    assert not wrong


def test_no_system_prefixes_at_the_top():
    """What one system owns lives in its subpackage: no `ranking_*.py` or `captioning_*.py` beside them."""
    prefixed = [
        path.relative_to(REPO).as_posix()
        for package in PACKAGES
        for path in (REPO / package).glob("*.py")
        if path.stem.startswith(tuple(f"{s}_" for s in SYSTEMS))
    ]
    assert not prefixed
