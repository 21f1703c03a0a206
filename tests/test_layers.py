"""The package's architecture, checked from its source: layers import downwards only, no
module imports itself back through others, the training loop names no method, no module
outgrows a reader (docs/design.md draws the layers), and no script's module hides a library."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import sysconfig
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dskd"
# Folders whose modules sit first on sys.path when their scripts run (`python bench/x.py`) or
# when pytest collects them; a module there named like a library hides that library.
SCRIPT_FOLDERS = [PACKAGE.parent / "bench", PACKAGE.parent / "tests"]

# Each top-level part of dskd and its layer: a module may import from lower layers and from
# its own part, never from a higher layer or a sibling of the same layer.
LAYERS = {
    "__init__": 0, "errors": 0, "registry": 0,
    "config": 1, "kernels": 1, "runtime": 1,
    "data": 2, "models": 2,
    "teacher": 3,
    "losses": 4,
    "methods": 5,
    "training": 6,
    "commands": 7,
    "cli": 8, "__main__": 9,
}
METHOD_NAMES = re.compile(r"glitter|kronecker|swa|pro_kd|rw_kd|mate|codir|universal", re.IGNORECASE)
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """Every dskd module ``path`` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from dskd.x import y` imports dskd.x, and dskd.x.y when y is a module
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(path, known) - {name} for name, path in mods.items()}


def test_every_part_of_the_package_has_a_layer():
    assert {part(m) for m in modules()} <= set(LAYERS), {part(m) for m in modules()} - set(LAYERS)


def test_no_module_imports_from_a_higher_layer_or_a_sibling():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            if target == "dskd" or part(target) == part(module):
                continue
            if LAYERS[part(target)] >= LAYERS[part(module)]:
                wrong.append(f"{module} (layer {LAYERS[part(module)]}) imports {target} "
                             f"(layer {LAYERS[part(target)]})")
    assert not wrong, "\n".join(sorted(wrong))


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_inside_the_package():
    edges = graph()
    # A package's __init__ re-exporting its own modules is not a cycle of ideas; a module of
    # the package importing the package (its __init__) back is, so only the first is dropped.
    edges = {m: {t for t in ts if not (m == t.rpartition(".")[0])} for m, ts in edges.items()}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_training_layer_names_no_method():
    hits = [f"{path.relative_to(PACKAGE.parent)}:{i}: {line.strip()}"
            for path in sorted((PACKAGE / "training").rglob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1) if METHOD_NAMES.search(line)]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_readable(path):
    lines = len(path.read_text().splitlines())
    assert lines < MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines; split it by idea"


def script_modules() -> dict[str, Path]:
    return {path.stem: path for folder in SCRIPT_FOLDERS for path in sorted(folder.glob("*.py"))}


def importers_of(names: set[str]) -> dict[str, list[str]]:
    """Installed files that import one of ``names`` as a top-level module, optional imports
    included: transformers 5.25 imports the `kernels` package, and a bench/kernels.py hid it
    from every bench script (CI, 2026-12-03)."""
    alternatives = "|".join(sorted(map(re.escape, names)))
    statement = re.compile(rf"^[ \t]*(?:from[ \t]+({alternatives})[ \t]+import\b|import[ \t]+({alternatives})[ \t]*$)",
                           re.MULTILINE)
    site = Path(sysconfig.get_paths()["purelib"])
    found: dict[str, set[str]] = {}
    for path in site.rglob("*.py"):
        where = path.relative_to(site)
        for match in statement.finditer(path.read_text(errors="ignore")):
            name = match.group(1) or match.group(2)
            if name != where.parts[0].split(".")[0]:  # a package importing itself
                found.setdefault(name, set()).add(str(where))
    return {name: sorted(paths) for name, paths in found.items()}


def test_no_script_module_hides_a_library():
    scripts = script_modules()
    distributions = importlib.metadata.packages_distributions()
    clashes = {name: "Python's own module" for name in set(scripts) & set(sys.stdlib_module_names)}
    clashes |= {name: f"the top-level module of {', '.join(distributions[name])}"
                for name in set(scripts) & set(distributions) if name not in clashes}
    clashes |= {name: f"imported by {', '.join(paths[:3])}"
                for name, paths in importers_of(set(scripts)).items() if name not in clashes}
    assert not clashes, "rename these script modules:\n" + "\n".join(
        f"{scripts[name].relative_to(PACKAGE.parent)}: {name} is {why}" for name, why in sorted(clashes.items()))


def test_the_library_check_sees_an_optional_import(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "somelib").mkdir(parents=True)
    (site / "somelib" / "hub.py").write_text("try:\n    from kernels import CUDAProperties\nexcept ImportError:\n    pass\n")
    (site / "kernels").mkdir()
    (site / "kernels" / "__init__.py").write_text("import kernels\n")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"purelib": str(site)})
    assert importers_of({"kernels", "common"}) == {"kernels": ["somelib/hub.py"]}
