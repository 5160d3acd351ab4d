"""The package layout as the code states it: which subpackage may import which, and no cycles.

Read from the source with ``ast`` (every import, at module level or inside a function), so a
new import that runs against the one-way flow fails here rather than in a reviewer's head.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sinq_ops", "pipeline", "jobs")
# What each part may import from the project; anything else it imports from the project is a wrong way.
ALLOWED = {
    "sinq_ops": ("sinq_ops",),
    "pipeline.io": ("pipeline.io",),
    "pipeline.sources.base": ("pipeline.io",),
    "pipeline.sources": ("pipeline.io", "pipeline.sources", "pipeline.architecture"),
    "pipeline.output": ("pipeline.io", "pipeline.output", "sinq_ops"),
    "pipeline.architecture": (),
    "pipeline.conversion": (),
    "pipeline.quantized": ("pipeline.architecture", "sinq_ops"),
    "pipeline.forward_check": ("pipeline.architecture", "pipeline.quantized", "sinq_ops"),
    "pipeline.job": ("pipeline.io", "pipeline.sources", "pipeline.output", "pipeline.architecture",
                     "pipeline.conversion", "pipeline.quantized", "pipeline.forward_check", "pipeline.job", "sinq_ops"),
    "pipeline": ("pipeline", "sinq_ops"),
    "jobs": ("jobs", "pipeline", "sinq_ops"),
}
# Libraries the pure tensor code never touches.
NOT_IN_SINQ_OPS = ("ray", "fsspec", "s3fs", "huggingface_hub", "transformers", "pipeline", "jobs")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _project_imports() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(name, path) if m in modules} for name, path in modules.items()}


def _rule(module: str) -> tuple[str, ...]:
    key = max((k for k in ALLOWED if module == k or module.startswith(k + ".")), key=len)
    return ALLOWED[key]


def test_every_import_follows_the_one_way_flow() -> None:
    wrong = []
    for module, targets in _project_imports().items():
        allowed = _rule(module)
        for target in targets:
            if target != module and not any(target == a or target.startswith(a + ".") for a in allowed):
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_no_import_cycles() -> None:
    graph = {m: {t for t in ts if t != m} for m, ts in _project_imports().items()}
    # A package's __init__ re-exporting its own submodules is not a cycle of the flow.
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_sinq_ops_stays_pure_tensor_code() -> None:
    modules = _modules()
    for name, path in modules.items():
        if name.split(".")[0] == "sinq_ops":
            bad = {m for m in _imports(name, path) if m.split(".")[0] in NOT_IN_SINQ_OPS}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_nothing_in_the_package_exists_only_for_the_tests() -> None:
    imported = set().union(*_project_imports().values())
    shipped = {m for m in _modules() if m.startswith("pipeline.") and not m.endswith("__init__")}
    used_by_product = imported | {m for m in shipped if m.count(".") == 1}  # entry modules: loader, nightly, ...
    only_tests = sorted(m for m in shipped if m not in used_by_product and not any(i.startswith(m + ".") for i in imported))
    assert not only_tests, f"modules no product code imports: {only_tests}"
