"""Layout contract (issue 13): `import sgdet` loads no detection or training code (nor triton),
the package graph has no import cycles, and no source file grows past the style guide's 600
lines."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("sgdet", "classification", "transfer")


def _modules_loaded_by(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return set(run.stdout.split())


def test_import_sgdet_has_no_side_imports():
    loaded = _modules_loaded_by("import sgdet")
    unwanted = [m for m in loaded if m in ("torchvision", "triton") or m.startswith(
        ("torchvision.", "triton.", "sgdet.detection", "sgdet.engine", "pycocotools"))]
    assert not unwanted, unwanted


def test_detection_names_load_on_first_use():
    loaded = _modules_loaded_by("import sgdet; sgdet.BACKBONE_REGISTRY")
    assert "sgdet.detection" in loaded and "torchvision.models.detection" in loaded


def _source_files():
    for package in PACKAGES + ("tools", "benchmarks"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    yield os.path.join(folder, name)


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _top_level_imports(path: str) -> set[str]:
    """Modules of our packages that ``path`` imports when it is imported (function-level imports
    are deliberate lazy loads and are not edges)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    name = _module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def test_no_import_cycles_between_modules():
    graph = {}
    for path in _source_files():
        if os.path.relpath(path, ROOT).split(os.sep)[0] in PACKAGES:
            graph[_module_name(path)] = _top_level_imports(path)
    # a module depends on its parent package's __init__ only through real edges
    edges = {m: {d for d in deps if d in graph and d != m and not m.startswith(d + ".")}
             for m, deps in graph.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_no_file_over_600_lines():
    long = {os.path.relpath(p, ROOT): n for p in _source_files()
            if (n := sum(1 for _ in open(p, encoding="utf-8"))) > 600}
    assert not long, long


def _all_imports(path: str) -> set[str]:
    """Every module ``path`` names in an import statement, lazy ones included."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_package_boundaries():
    """sgdet imports neither pipeline; classification never imports transfer; transfer uses
    classification's public modules only, never its entry point."""
    for path in _source_files():
        part = os.path.relpath(path, ROOT).split(os.sep)[0]
        roots = {m.split(".")[0] for m in _all_imports(path)}
        if part == "sgdet":
            assert not roots & {"classification", "transfer"}, path
        elif part == "classification":
            assert "transfer" not in roots, path
        elif part == "transfer":
            assert not any(m.startswith("classification.__main__") for m in _all_imports(path)), path


def test_deploy_is_both_the_call_and_the_package():
    """sgdet.deploy(model) deploys, and sgdet.deploy's submodules import by their full names
    (the function's name used to hide the package)."""
    loaded = _modules_loaded_by("import sgdet, sgdet.deploy.native as native; "
                                "assert callable(sgdet.deploy) and sgdet.deploy.native is native; "
                                "assert sgdet.deploy.plans.plan_label(None) == 'per-group'")
    assert "sgdet.deploy.native" in loaded
