"""One direction of dependence (issue 17), read from the imports with the standard library's ``ast``.

Layers, lowest first:
- engine: ``bench/`` except ``bench/cli.py`` (the contracts, the model and loops, measures, runs, reports);
- methods: ``baselines/`` (detectors, mitigators, explainers): may import the engine;
- worlds: ``tasks/`` except ``tasks/studies/`` (prompt sets, MemWorld, the organism): may import the engine;
- studies: ``tasks/studies/`` (experiments combining a world with methods): may import everything;
- face: ``bench/cli.py``: may import everything.

Forbidden: engine -> methods, engine -> worlds, engine -> studies, methods -> worlds, methods -> studies,
worlds -> methods, worlds -> studies; and any import circle among the package modules. Imports inside
functions count as much as module-level ones.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "tasks", "baselines")
FORBIDDEN = {"engine": {"methods", "worlds", "studies", "face"}, "methods": {"worlds", "studies", "face"},
             "worlds": {"methods", "studies", "face"}, "studies": {"face"}, "face": set()}


def layer(module: str) -> str:
    if module == "bench.cli":
        return "face"
    if module == "tasks.studies" or module.startswith("tasks.studies."):
        return "studies"
    return {"bench": "engine", "baselines": "methods", "tasks": "worlds"}[module.split(".")[0]]


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every package module: dotted name -> file (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            if "data" in f.relative_to(root).parts[:2]:        # tasks/data: shipped data scripts, not modules
                continue
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def imports(name: str, f: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported package module, line) for every import in ``f``, module level or inside functions.
    ``from a.b import c`` names ``a.b.c`` when that is a module, else ``a.b``."""
    tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
    pkg = name if f.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                                      # relative: from . / .. import
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:                       # a.b.c (attribute) -> a.b
                t = t.rpartition(".")[0]
            if t and t.split(".")[0] in PACKAGES and t != name:
                found.append((t, node.lineno))
    return found


def graph(root: Path = ROOT) -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    modules = module_files(root)
    return modules, {m: imports(m, f, modules) for m, f in modules.items()}


def layer_violations(root: Path = ROOT) -> list[str]:
    modules, edges = graph(root)
    bad = []
    for m, outs in edges.items():
        for t, line in outs:
            if layer(t) in FORBIDDEN[layer(m)]:
                bad.append(f"{modules[m].relative_to(root)}:{line}: {m} ({layer(m)}) imports {t} ({layer(t)}): "
                           f"the {layer(m)} may not import the {layer(t)}")
    return list(dict.fromkeys(bad))              # one line per import statement and target


def cycles(root: Path = ROOT) -> list[list[str]]:
    """Every import circle (one per strongly connected component of more than one module, or a self-loop),
    as the modules of one circle through it."""
    _, edges = graph(root)
    succ = {m: sorted({t for t, _ in outs}) for m, outs in edges.items()}
    index, low, stack, on, comps, n = {}, {}, [], set(), [], [0]

    def strong(v):                                            # Tarjan
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in succ.get(v, []):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(succ):
        if v not in index:
            strong(v)
    out = []
    for comp in comps:                                        # a concrete circle inside the component
        members, start = set(comp), sorted(comp)[0]
        path, seen, v = [start], {start}, start
        while True:
            v = next(w for w in succ[v] if w in members)
            if v in seen:
                out.append(path[path.index(v):] + [v])
                break
            path.append(v)
            seen.add(v)
    return out


def _where(a: str, b: str, root: Path = ROOT) -> str:
    modules, edges = graph(root)
    lines = sorted({str(line) for t, line in edges[a] if t == b}, key=int)
    return f"{modules[a].relative_to(root)}:{','.join(lines)}"


def test_no_lower_layer_imports_a_higher_one():
    bad = layer_violations()
    assert not bad, "imports against the direction of dependence:\n  " + "\n  ".join(bad)


def test_no_import_circles():
    circles = cycles()
    msg = ["import circle: " + " -> ".join(c) + "  (" + "; ".join(_where(a, b) for a, b in zip(c, c[1:])) + ")"
           for c in circles]
    assert not circles, "\n".join(msg)


def test_the_checks_see_imports_inside_functions(tmp_path):
    """The rules catch a function-level import of a method from the engine, and a circle through one."""
    for pkg, body in {"bench": "", "baselines": "", "tasks": ""}.items():
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text(body)
    (tmp_path / "baselines" / "det.py").write_text("from bench import core\n")
    (tmp_path / "bench" / "core.py").write_text("def f():\n    from baselines.det import X\n")
    assert any("bench/core.py:2" in b and "engine" in b and "methods" in b for b in layer_violations(tmp_path))
    assert cycles(tmp_path) == [["baselines.det", "bench.core", "baselines.det"]]
