"""The package's shape (issue 21): rooms by stage, imports one way, no cycle, short functions.

Every import of the package is read from the source (imports inside functions included) and
held against the declared direction; `python tests/unit/test_layers.py` prints the figures.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "gpte_ray"

# the modules at the edges: config, storage and console below everything, cli and the public
# API above everything
BASE = {"gpte_ray.config", "gpte_ray.storage", "gpte_ray.console"}
EDGE = {"gpte_ray", "gpte_ray.cli"}
# what each room may import besides itself and the base (the flow: input -> plan -> run -> store)
ALLOWED = {
    "model": set(),
    "input": set(),
    "store": {"model"},
    "report": {"model", "store"},
    "plan": {"input", "store", "report"},
    "run": {"model", "input", "store", "report", "plan"},
    "query": {"model", "store"},
    "demo": set(),
}
RUN_PATH = ("run",)  # functions here read as steps: at most RUN_MAX_LINES
MAX_LINES, RUN_MAX_LINES, MAX_POSITIONAL = 80, 60, 8


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Package modules `path` imports, anywhere in it (a `from pkg import mod` names the module)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # a name inside a module: the module itself
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t.startswith("gpte_ray") and t != name:
                out.add(t)
    return out


def room(name: str) -> str:
    if name in BASE:
        return "base"
    if name in EDGE:
        return "edge"
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or name.replace("gpte_ray.", "") in ALLOWED else "top-level"


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports(p, n, set(mods)) for n, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index:
            visit(v)
    return out


def against_direction(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for a, targets in g.items():
        ra = room(a)
        for b in targets:
            rb = room(b)
            if ra == "edge" or rb == "base" or ra == rb:
                continue
            if ra == "base" or rb == "edge" or ra == "top-level" or rb == "top-level" or rb not in ALLOWED[ra]:
                bad.append(f"{a} ({ra}) imports {b} ({rb})")
    return sorted(bad)


def functions() -> list[tuple[str, int, int]]:
    """(module:qualname, lines, positional parameters without self/cls) of every function."""
    out = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        todo = [(tree, "")]
        while todo:
            node, prefix = todo.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    args = [a.arg for a in child.args.posonlyargs + child.args.args]
                    positional = len([a for a in args if a not in ("self", "cls")])
                    qual = f"{prefix}{child.name}"
                    out.append((f"{name}:{qual}", child.end_lineno - child.lineno + 1, positional))
                    todo.append((child, qual + "."))
                elif isinstance(child, ast.ClassDef):
                    todo.append((child, f"{prefix}{child.name}."))
    return out


def figures() -> dict:
    g = graph()
    fns = functions()
    longest = max(fns, key=lambda f: f[1])
    widest = max(fns, key=lambda f: f[2])
    return {
        "modules": len(g),
        "top_level_modules": sum(1 for n, p in modules().items() if p.parent == ROOT and p.name != "__init__.py"),
        "sub_packages": sorted({n.split(".")[1] for n in g if n.count(".") >= 2}),
        "import_cycles": len(cycles(g)),
        "imports_against_direction": len(against_direction(g)),
        "longest_function": f"{longest[0]} ({longest[1]} lines)",
        "widest_signature": f"{widest[0]} ({widest[2]} positional)",
        "lines": sum(len(p.read_text().splitlines()) for p in modules().values()),
    }


def in_run_path(function: str) -> bool:
    parts = function.split(":")[0].split(".")
    return len(parts) > 1 and parts[1] in RUN_PATH


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_imports_follow_the_declared_direction():
    assert against_direction(graph()) == []


def test_every_module_lives_in_a_room():
    loose = [n for n in modules() if room(n) == "top-level"]
    assert loose == [], f"modules outside the rooms and edges: {loose}"


def test_functions_are_short_and_narrow():
    too_long = [(f, n) for f, n, _ in functions() if n > (RUN_MAX_LINES if in_run_path(f) else MAX_LINES)]
    too_wide = [(f, p) for f, _, p in functions() if p > MAX_POSITIONAL]
    assert too_long == [] and too_wide == []


def test_the_checks_catch_what_they_are_for():
    """The walker sees lazy imports, finds a cycle, and flags an import against the direction."""
    src = "def f():\n    from gpte_ray.run.pipeline import run_index\n"
    tree_imports = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ImportFrom):
            tree_imports.add(node.module)
    assert tree_imports == {"gpte_ray.run.pipeline"}
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert against_direction({"gpte_ray.store.table": {"gpte_ray.plan.reference.diff"}}) == \
        ["gpte_ray.store.table (store) imports gpte_ray.plan.reference.diff (plan)"]


if __name__ == "__main__":
    import json

    print(json.dumps(figures(), indent=1))
    for line in against_direction(graph()):
        print("against:", line)
    for c in cycles(graph()):
        print("cycle:", " <-> ".join(c))
