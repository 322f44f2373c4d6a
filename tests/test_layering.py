"""Imports of the package only point down its layers, and none of its own imports is lazy.

Layers, bottom up (docs/design.md "Layers"); a module may import its own layer or lower,
and within a layer the module graph has no cycle:

  0  config, _optional
  1  parallel (layout, groups, serving transport, liveness)
  2  attention.kernels
  3  attention.dilated
  4  attention.pool, moe
  5  attention (the core-attention module), models
  6  data, training, inference
  7  runtime, testing
  8  convert (checkpoint conversion: reads and writes every format, runs training's engines)

launch/, tools/ and tests/ sit on top; nothing in the package imports them. Imports of
other libraries (megatron, deepspeed, transformers) may be lazy; the package's own may not.
"""

from __future__ import annotations

import ast
import os
import textwrap

PACKAGE = "megatron_fapool"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYERS = {
    "megatron_fapool": 0,
    "megatron_fapool._optional": 0,
    "megatron_fapool.config": 0,
    "megatron_fapool.parallel": 1,
    "megatron_fapool.attention.kernels": 2,
    "megatron_fapool.attention.dilated": 3,
    "megatron_fapool.attention.pool": 4,
    "megatron_fapool.moe": 4,
    "megatron_fapool.attention": 5,
    "megatron_fapool.models": 5,
    "megatron_fapool.data": 6,
    "megatron_fapool.training": 6,
    "megatron_fapool.inference": 6,
    "megatron_fapool.runtime": 7,
    "megatron_fapool.testing": 7,
    "megatron_fapool.convert": 8,
}


def layer_of(module: str, layers=LAYERS) -> int:
    """The layer of the longest prefix of ``module`` in ``layers`` (a module not listed fails)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in layers and (i > 1 or module == prefix):
            return layers[prefix]
    raise AssertionError(f"{module}: no layer for it; add its subpackage to LAYERS (and docs/design.md)")


def _modules(root: str, package: str):
    """``{module name: (path, is_package)}`` of every .py file under ``root/package``."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(root, package)):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].split(os.sep)
            is_pkg = rel[-1] == "__init__"
            name = ".".join(rel[:-1] if is_pkg else rel)
            out[name] = (os.path.join(dirpath, f), is_pkg)
    return out


def _imports(path: str, module: str, is_pkg: bool, package: str, known):
    """``[(imported internal module, line, is_lazy)]`` of one file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    top = set(map(id, tree.body))
    found = []

    def add(name, node):
        if name == package or name.startswith(package + "."):
            found.append((name, node.lineno, id(node) not in top))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = ".".join(base[: len(base) - node.level + 1])
                src = f"{parent}.{node.module}" if node.module else parent
            else:
                src = node.module
            for a in node.names:  # `from .pkg import submodule` imports the submodule
                sub = f"{src}.{a.name}"
                add(sub if sub in known else src, node)
    return found


def scan(root: str = ROOT, package: str = PACKAGE, layers=LAYERS) -> list[str]:
    """Every violation of the rules above, one line each."""
    mods = _modules(root, package)
    problems, edges = [], {m: set() for m in mods}
    for mod, (path, is_pkg) in sorted(mods.items()):
        for target, line, lazy in _imports(path, mod, is_pkg, package, mods):
            where = f"{os.path.relpath(path, root)}:{line}"
            if lazy:
                problems.append(f"{where}: lazy import of {target} (import it at the top of the module)")
            if layer_of(target, layers) > layer_of(mod, layers):
                problems.append(f"{where}: {mod} (layer {layer_of(mod, layers)}) imports {target}"
                                f" (layer {layer_of(target, layers)}): imports must point down")
            if target in edges and target != mod:
                edges[mod].add(target)
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(edges)]
    return problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_package_imports_point_down_and_are_not_lazy():
    problems = scan()
    assert not problems, "\n".join(problems)


def test_scan_catches_upward_lazy_and_cyclic_imports(tmp_path):
    """The scanner itself fails on each kind of violation (so the test above can fail)."""
    def write(rel, text=""):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))

    layers = {"pkg": 0, "pkg.low": 0, "pkg.high": 1}
    write("pkg/__init__.py")
    write("pkg/low/__init__.py")
    write("pkg/low/a.py", "from ..high import b\n")  # upward
    write("pkg/low/c.py", "from . import d\n")  # cycle c <-> d
    write("pkg/low/d.py", "from . import c\n")
    write("pkg/high/__init__.py")
    write("pkg/high/b.py", "def f():\n    from ..low import c\n")  # lazy
    problems = scan(str(tmp_path), "pkg", layers)
    assert any("pkg.low.a (layer 0) imports pkg.high.b (layer 1)" in p for p in problems), problems
    assert any("lazy import of pkg.low.c" in p for p in problems), problems
    assert any(p.startswith("import cycle: pkg.low.c -> pkg.low.d") for p in problems), problems
    write("pkg/low/a.py", "import os\n")
    write("pkg/high/b.py", "from ..low import c\n")
    write("pkg/low/d.py", "")
    assert scan(str(tmp_path), "pkg", layers) == []
