"""The structure docs/ARCHITECTURE.md promises: no import cycles, layers that do not reach
upwards, small modules and short functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "usae"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every ``usae`` module a file imports, at any depth (lazy imports count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("usae"):
            out.add(node.module)
            for alias in node.names:  # `from usae import run` imports the module usae.sae.run
                out.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("usae"))
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    return {name: {m for m in imports_of(p) if m in files and m != name}
            for name, p in files.items()}


def test_no_import_cycle_inside_usae():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g[node]):
            if nxt == "usae":  # the package's lazy __getattr__ table, not a real edge
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)


# Layers: a module must not import what sits above it in the data flow.
FORBIDDEN = {
    "usae.sae.trainer": {"usae.analysis.evaluate", "usae.analysis.controls",
                         "usae.explorer.build", "usae.analysis.plots", "usae.data.cache",
                         "usae.demo"},
    "usae.sae.step": {"usae.sae.trainer", "usae.analysis.evaluate", "usae.store.store"},
    # the objective seam: strategies the SAE and the step call, never the reverse
    "usae.sae.objectives": {"usae.sae.model", "usae.sae.step", "usae.sae.trainer",
                            "usae.store.store", "usae.analysis.evaluate"},
    "usae.sae.fused": {"usae.sae.trainer", "usae.analysis.evaluate", "usae.store.store",
                       "usae.sae.model", "usae.sae.step"},
    "usae.sae.sparse": {"usae.sae.trainer", "usae.analysis.evaluate", "usae.store.store",
                        "usae.sae.model", "usae.sae.step"},
    "usae.sae.model": {"usae.sae.trainer", "usae.sae.step", "usae.store.store",
                       "usae.analysis.evaluate"},
    "usae.store.store": {"usae.data.images", "usae.sae.trainer", "usae.sae.model",
                         "usae.data.backbones"},
    "usae.analysis.controls": {"usae.analysis.evaluate"},
    # readers of a finished eval go through usae.analysis.eval_folder, not the eval command
    "usae.analysis.concepts": {"usae.analysis.evaluate"},
    "usae.sae.run": {"usae.sae.model", "usae.sae.trainer", "usae.analysis.evaluate"},
    "usae.hub": {"usae.sae.model", "usae.sae.trainer", "usae.analysis.evaluate"},
    "usae.analysis.eval_folder": {"usae.sae.model", "usae.sae.trainer", "usae.analysis.evaluate"},
    "usae.analysis.synth": {"usae.sae.trainer", "usae.analysis.evaluate", "usae.explorer.build",
                            "usae.sae.model"},
    "usae.analysis.truth": {"usae.sae.trainer", "usae.analysis.evaluate", "usae.explorer.build"},
    "usae.locks": {"usae.store.store", "usae.sae.model", "usae.sae.trainer", "usae.files"},
    "usae.threads": {"usae.store.store", "usae.sae.model", "usae.sae.trainer"},
    "usae.cam.maximize": {"usae.sae.trainer", "usae.store.writer", "usae.analysis.evaluate"},
    "usae.distributed": {"usae.sae.trainer", "usae.sae.training", "usae.sae.model",
                         "usae.store.store",
                         "usae.data.cache", "usae.store.writer"},
}


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_layers_do_not_import_upwards(module):
    g = graph()
    assert not (g[module] & FORBIDDEN[module]), f"{module} imports {g[module] & FORBIDDEN[module]}"


def test_objectives_sit_below_the_sae_and_the_step():
    """Every strategy module of the seam: a rule or criterion is called by the SAE and the
    step, and imports neither (nor anything above them)."""
    g = graph()
    for name in (m for m in g if m.startswith("usae.sae.objectives")):
        assert not (g[name] & FORBIDDEN["usae.sae.objectives"]), name


# Packages by stage: nothing in a package imports a later stage.
PACKAGE_FORBIDDEN = {
    # (the store may use the data stage's pure helpers: splits and grid arithmetic)
    "usae.store": ("usae.data.images", "usae.data.backbones", "usae.data.image_decoding",
                   "usae.data.cache", "usae.data.streaming", "usae.data.sources", "usae.sae",
                   "usae.analysis", "usae.cam", "usae.explorer"),
    "usae.sae": ("usae.cam", "usae.explorer", "usae.analysis.evaluate"),
    "usae.analysis": ("usae.cam", "usae.explorer"),
    "usae.cam": ("usae.explorer",),
}


@pytest.mark.parametrize("package", sorted(PACKAGE_FORBIDDEN))
def test_packages_do_not_import_later_stages(package):
    g = graph()
    for name in (m for m in g if m == package or m.startswith(package + ".")):
        bad = {m for m in g[name] if m.startswith(PACKAGE_FORBIDDEN[package])}
        assert not bad, f"{name} imports {bad}"


def test_distribution_lives_in_one_module():
    """Process groups, collectives and rank variables belong to usae.distributed alone."""
    offenders = [p.name for p in SRC.rglob("*.py") if p.name != "distributed.py" and
                 any(word in p.read_text() for word in ("torch.distributed", '"RANK"',
                                                        "WORLD_SIZE", "all_reduce"))]
    assert offenders == []


def test_the_library_never_imports_the_test_oracles():
    g = graph()
    users = [m for m, deps in g.items() if "usae.sae.oracles" in deps]
    assert users == []


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: p.name)
def test_modules_are_small(path):
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES


def long_functions(path: Path) -> list[str]:
    """Functions over the limit whose first body line is not a comment saying why."""
    lines = path.read_text().splitlines()
    out = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            justified = any(line.strip().startswith("# long:")
                            for line in lines[node.lineno - 3:node.lineno + 3])
            if length > MAX_FUNCTION_LINES and not justified:
                out.append(f"{node.name} ({length} lines)")
    return out


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: p.name)
def test_functions_are_short_or_say_why(path):
    assert long_functions(path) == []
