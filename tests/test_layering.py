"""The package's layering: no import cycles among krunch's modules (at import time), a runtime that imports
torch only, and a library that never imports the operator or Kubernetes code."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"krunch": ROOT / "pipeline", "krunch.operator": ROOT / "operators"}


def module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if package == "krunch" and name.startswith("krunch.operator"):
                continue
            modules[name] = path
    return modules


def absolute(name: str, path: Path, node: ast.ImportFrom) -> str:
    """The module a `from ... import` names, relative ones resolved against the importing module's package."""
    if node.level == 0:
        return node.module or ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def import_time_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """krunch modules each module imports when it is imported: module-level statements, not those inside
    functions or under `if TYPE_CHECKING`."""
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else []:
                if isinstance(sub, ast.ImportFrom):
                    base = absolute(name, path, sub)
                    targets.add(base)
                    targets |= {f"{base}.{alias.name}" for alias in sub.names}
                elif isinstance(sub, ast.Import):
                    targets |= {alias.name for alias in sub.names}
        parents = {".".join(t.split(".")[:i]) for t in targets for i in range(2, t.count(".") + 1)}  # importing a.b.c runs a.b
        edges[name] = {t for t in targets | parents if t in modules and t != name and not name.startswith(f"{t}.")}
    return edges


def test_no_import_cycles():
    modules = module_files()
    edges = import_time_edges(modules)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def loaded_after(statement: str) -> list[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, cwd="/")
    return json.loads(done.stdout)


def test_the_runtime_imports_torch_and_nothing_else_of_krunch():
    loaded = loaded_after("import krunch.runtime")
    krunch_modules = [m for m in loaded if m.startswith("krunch")]
    assert all(m == "krunch" or m.startswith("krunch.runtime") for m in krunch_modules), krunch_modules
    assert not {"pydantic", "yaml", "tensorly", "ray", "mlflow", "transformers"} & set(loaded)


def test_import_krunch_is_light_and_the_library_never_loads_the_operator():
    assert not {"torch", "pydantic", "kopf"} & set(loaded_after("import krunch"))
    loaded = loaded_after("import krunch.api, krunch.cli, krunch.job")
    assert not [m for m in loaded if m.startswith(("krunch.operator", "kopf", "kubernetes"))]


def test_nothing_installs_a_top_level_pipeline_or_operators_module():
    code = "import importlib.util as u; print(u.find_spec('pipeline'), u.find_spec('operators'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, cwd="/")
    assert done.stdout.split() == ["None", "None"]


def test_validating_a_job_loads_the_methods_but_no_torch():
    rules = "s.Rule(match='*', method='svd', rank={'fixed': 4}); s.Rule(match='*', method='cp', rank={'fixed': 4})"
    loaded = loaded_after(f"import krunch.spec as s; {rules}")
    assert {"krunch.methods.svd", "krunch.methods.cp"} <= set(loaded)
    assert not {"torch", "tensorly"} & set(loaded)


def test_the_registry_reads_the_typed_report_never_the_compression_stage():
    edges = import_time_edges(module_files())
    seen, stack = set(), [m for m in edges if m.startswith("krunch.registry")]
    while stack:
        module = stack.pop()
        if module not in seen:
            seen.add(module)
            stack += edges[module]
    stage = ("krunch.run", "krunch.api", "krunch.execution", "krunch.calibration", "krunch.plan", "krunch.decompose")
    assert sorted(m for m in seen if any(m == s or m.startswith(f"{s}.") for s in stage)) == []
    assert "krunch.results" in seen


def test_the_shipped_runtime_names_itself_only_relatively():
    """A registered model ships krunch.runtime under a versioned name: an absolute `krunch.` import inside
    it would load whichever krunch the consumer has (or none)."""
    absolute_imports = []
    for name, path in module_files().items():
        if name.startswith(("krunch.runtime", "krunch.architectures")):
            body = [n for n in ast.parse(path.read_text(encoding="utf-8")).body
                    if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]  # fmt: skip
            for node in (sub for top in body for sub in ast.walk(top)):
                modules = [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                modules += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                absolute_imports += [f"{name}: {m}" for m in modules if m.split(".")[0] == "krunch"]
    assert absolute_imports == [], absolute_imports
